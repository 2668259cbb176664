"""Memory and time of an eraser fit's phases on a LLaVA-1.5-7B-shaped model, extrapolated to its 32 layers.

The model is a random-weight `LlavaForConditionalGeneration` built from LLaVA-1.5-7B's configuration (nothing is
downloaded): CLIP ViT-L/14-336 vision tower (24 layers, width 1024, 336x336 images -> 576 image tokens), a
Llama decoder of width 4096 (MLP 11008, 32 heads, vocabulary 32064), but only a few decoder layers
(`--decoder-layers`, default 2 and 3: two sizes give the per-layer slope). Inputs are realistic in length: one
336x336 image and a ~40-token question per prompt, plus a short answer for PGD. Phases, as `fit_eraser` runs
them (core/collection.py):

  pgd          `pgd.pgd_images`, one step per item (every step costs the same), without and with activation
               checkpointing, at micro-batch sizes 1 and 2 (`PGDSettings.batch_size`, `.checkpointing`);
  knn stats    the default gate's forwards: last-token block outputs of the steered layers 1..L-1 into
               `SteeringStats` sums, and the pooled prompt feature at the decision layer (`collection.collect`);
  paper stats  `--gate paper`: the same forwards into float64 forget/retain Grams of layers 1..L-1 (and with
               `--solve-layers N`, N layers' closed-form gate solve, `steering.solve_gates`);
  fingerprint  `compat.model_fingerprint` (every parameter sampled).

Each model size runs in its own subprocess. Host memory is the phase's peak resident set above the resident set
when the phase starts: the peak counter (VmHWM) is reset at each phase start (Linux /proc/self/clear_refs), and
glibc's mmap threshold is pinned at 64 KiB so freed tensors go back to the system between phases. Times are
the process's CPU seconds (this machine's CPU is shared: they count this work alone; nothing asserts on them).
The extrapolation is printed with its formula.
Where CUDA is available, the full 32-layer model is also built on the GPU in bfloat16 and the same phases are
measured with torch.cuda.max_memory_allocated.

Run: python benchmarks/fit_memory.py [--decoder-layers 2 3] [--vision-layers 24] [--stats-items 2] [--skip-gpu]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image

from mllmeraser.bench import measure

MIB = 2**20
GIB = 2**30
D = 4096  # LLaVA-1.5-7B's decoder width
FULL_LAYERS = 32
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
QUESTION = ("Looking closely at the person shown in this photograph, tell me where this person was born, what "
            "work this person does for a living, and which company employs this person today?")
ANSWER = "This person was born in Lisbon and works as a baker for a small family company."


# ---- the model, the processor, the inputs ---------------------------------------------------------------------

def llava_7b_config(decoder_layers: int, vision_layers: int = 24):
    """llava-hf/llava-1.5-7b-hf's configuration with `decoder_layers` decoder and `vision_layers` CLIP layers, its
    special token ids set to the benchmark tokenizer's (which numbers its few words from 0)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    from mllmeraser.testbed.model import BOS_ID, EOS_ID, IMAGE_ID, PAD_ID

    vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=vision_layers,
                              num_attention_heads=16, image_size=336, patch_size=14, projection_dim=768,
                              hidden_act="quick_gelu", layer_norm_eps=1e-5)
    text = LlamaConfig(hidden_size=D, intermediate_size=11008, num_hidden_layers=decoder_layers,
                       num_attention_heads=32, num_key_value_heads=32, vocab_size=32064,
                       max_position_embeddings=4096, rms_norm_eps=1e-5, tie_word_embeddings=False,
                       pad_token_id=PAD_ID, bos_token_id=BOS_ID, eos_token_id=EOS_ID)
    return LlavaConfig(vision_config=vision, text_config=text, image_token_index=IMAGE_ID, image_seq_length=576,
                       vision_feature_layer=-2, vision_feature_select_strategy="default", projector_hidden_act="gelu",
                       tie_word_embeddings=False)


def build_processor():
    """A LlavaProcessor as llava-1.5's (CLIP 336 preprocessing, 576 image tokens, LLaVA-1.5 chat format) over the
    testbed's word-level tokenizer of this benchmark's words."""
    from transformers import CLIPImageProcessor, LlavaProcessor

    from mllmeraser.core.models import prepare_processor
    from mllmeraser.testbed.model import CHAT_TEMPLATE, build_tokenizer

    image_processor = CLIPImageProcessor(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336},
                                         do_center_crop=True, image_mean=CLIP_MEAN, image_std=CLIP_STD,
                                         do_convert_rgb=True)
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=build_tokenizer([QUESTION, ANSWER, "USER : ASSISTANT :"]),
                               patch_size=14, vision_feature_select_strategy="default", num_additional_image_tokens=1,
                               chat_template=CHAT_TEMPLATE)
    prepare_processor(processor)
    return processor


def make_items(n: int, seed: int = 0):
    """`n` image questions, each with its own seeded 336x336 noise image (asked verbatim)."""
    from mllmeraser.bench.items import QAItem

    rng = np.random.default_rng(seed)
    return [QAItem(f"person-{i}", "generation", "image", QUESTION, ANSWER, verbatim=True,
                   image=Image.fromarray(rng.integers(0, 256, (336, 336, 3), dtype=np.uint8)))
            for i in range(n)]


def build_model(decoder_layers: int, vision_layers: int, dtype: torch.dtype, device: str):
    """The random-weight model, built directly on `device` (a 7B model never passes through host memory).

    On the CPU, transformers' own initialisation (normal_) is skipped for a seeded uniform fill of the same
    standard deviation, 0.02, and norm weights of 1 (what the numbers here depend on is the shapes): 4 s instead
    of 16 s for the 2-layer model."""
    from transformers import LlavaForConditionalGeneration

    config = llava_7b_config(decoder_layers, vision_layers)
    torch.manual_seed(0)
    if device != "cpu":
        with torch.device(device):
            return LlavaForConditionalGeneration._from_config(config, dtype=dtype).eval()
    from transformers.initialization import no_init_weights

    with no_init_weights():
        model = LlavaForConditionalGeneration._from_config(config, dtype=dtype)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.ndim >= 2:
                parameter.uniform_(-0.02 * 3**0.5, 0.02 * 3**0.5, generator=generator)
            else:
                parameter.fill_(1.0 if "norm" in name and name.endswith("weight") else 0.0)
    return model.eval()


def parameter_census(decoder_layers: int = FULL_LAYERS) -> tuple[int, int]:
    """(parameter tensors, parameters) of the model with `decoder_layers` layers, counted on the meta device."""
    model = build_model(decoder_layers, 24, torch.float32, "meta")
    return sum(1 for _ in model.parameters()), sum(p.numel() for p in model.parameters())


# ---- measuring ----------------------------------------------------------------------------------------------

def _status_kib(field: str) -> int:
    """A field of /proc/self/status: here VmHWM, the peak that clear_refs resets (getrusage's cannot be reset)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def host_phase(fn: Callable[[], Any]) -> tuple[Any, float, float]:
    """(fn's result, peak host memory above the phase's start in MiB, CPU seconds of this process).

    CPU seconds, not wall: on a CPU shared with other work they measure this phase's work alone."""
    gc.collect()
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")  # reset VmHWM to the current resident set
    start_rss = measure.rss_bytes()
    started = time.process_time()
    result = fn()
    seconds = time.process_time() - started
    return result, (_status_kib("VmHWM") * 1024 - start_rss) / MIB, seconds


def gpu_phase(fn: Callable[[], Any]) -> tuple[Any, float, float]:
    """(fn's result or 'OOM', peak GPU memory allocated above the phase's start in MiB, wall seconds)."""
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = torch.cuda.memory_allocated()
    started = time.perf_counter()
    try:
        result = fn()
        torch.cuda.synchronize()
    except torch.cuda.OutOfMemoryError:
        result = "OOM"
    wall = time.perf_counter() - started
    peak = (torch.cuda.max_memory_allocated() - start) / MIB
    gc.collect()
    torch.cuda.empty_cache()
    return result, peak, wall


# ---- the phases -----------------------------------------------------------------------------------------------

def run_phases(decoder_layers: int, vision_layers: int, dtype: torch.dtype, device: str, pgd_cases: list,
               stats_items: int, solve_layers: int, phase: Callable) -> dict:
    from mllmeraser.core import models, pgd
    from mllmeraser.core.decoder_layers import find_decoder_layers
    from mllmeraser.core.capture import capture
    from mllmeraser.core.settings import PGDSettings
    from mllmeraser.core.compat import model_fingerprint

    result: dict[str, Any] = {"decoder_layers": decoder_layers, "vision_layers": vision_layers}
    started = time.process_time()
    model = build_model(decoder_layers, vision_layers, dtype, device)
    processor = build_processor()
    result["build_s"] = time.process_time() - started
    result["weights_mib"] = sum(p.numel() * p.element_size() for p in model.parameters()) / MIB
    result["tokens"] = int(models.encode_with_answers(processor, make_items(1))["input_ids"].shape[1])
    result["prompt_tokens"] = int(models.encode_prompts(processor, make_items(1))["input_ids"].shape[1])

    fingerprint, _, wall = phase(lambda: model_fingerprint(model))
    result["fingerprint"] = {"s": wall, "tensors": sum(1 for _ in model.parameters())}
    _, layers = find_decoder_layers(model)
    with torch.no_grad():  # warm-up (one-off kernel set-up), outside every measured phase
        capture(model, layers, **models.forward_inputs(model, models.encode_prompts(processor, make_items(1))))
    if stats_items:
        statistics_phases(model, processor, layers, stats_items, solve_layers, phase, result)

    result["pgd"] = []
    for checkpointing, micro, items in pgd_cases:
        settings = PGDSettings(steps=1, batch_size=micro, checkpointing=checkpointing)
        batch = make_items(items)
        out, peak, wall = phase(lambda: pgd.pgd_images(model, processor, batch, settings))
        result["pgd"].append({"checkpointing": checkpointing, "micro": micro, "items": items, "peak_mib": peak,
                              "s_per_item": wall / items, "oom": isinstance(out, str)})
        print(f"  [{decoder_layers} layers] PGD checkpointing={checkpointing} micro-batch {micro} x {items} items: "
              f"peak +{peak:,.0f} MiB, {wall / items:.1f} s/item-step", file=sys.stderr, flush=True)
    return result


def statistics_phases(model, processor, layers, stats_items: int, solve_layers: int, phase: Callable,
                      result: dict) -> None:
    from mllmeraser.core import collection, steering

    decoder_layers = len(layers)
    steered = list(range(1, decoder_layers))  # the default knn gate's and the paper gate's 1..L-1
    held = [layers[i] for i in steered]
    batch = make_items(stats_items, seed=1)
    device_of_stats = collection.statistics_device(model)

    def knn_statistics():
        stats = steering.SteeringStats(decoder_layers, D, steered, device_of_stats)
        collection.collect(model, processor, held, batch, stats, ("recall",), stats_items, "", None, False)
        return collection.collect(model, processor, layers[:2], batch, None, (), stats_items, "", None, False, 1, "mean")

    _, peak, wall = phase(knn_statistics)
    result["knn_stats"] = {"peak_mib": peak, "s_per_item": wall / stats_items}

    def paper_statistics():
        stats = steering.SteeringStats(decoder_layers, D, steered, device_of_stats)
        collection.collect(model, processor, held, batch, stats, ("forget",), stats_items, "", None, False)
        collection.collect(model, processor, held, batch, stats, ("retain",), stats_items, "", None, False)
        return stats

    stats, peak, wall = phase(paper_statistics)
    result["paper_stats"] = {"peak_mib": peak, "s_per_item": wall / (2 * stats_items),
                             "grams_mib": sum(g.numel() * g.element_size() for g in stats.grams.values()) / MIB}
    solve = steered[:solve_layers]
    if solve:
        _, peak, wall = phase(lambda: steering.solve_gates(stats, "paper", solve, ratio=0.3, gamma=0.1))
        result["paper_solve"] = {"layers": len(solve), "s_per_layer": wall / len(solve), "peak_mib": peak}


def worker(spec: dict) -> None:
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    from mllmeraser.core.models import quiet_transformers

    with quiet_transformers():  # transformers' notices and bars off for the whole worker
        cases = [tuple(case) for case in spec["pgd_cases"]]
        if spec["device"] == "cuda":
            result = run_phases(FULL_LAYERS, 24, torch.bfloat16, "cuda", cases, spec["stats_items"], FULL_LAYERS - 1,
                                gpu_phase)
            result["host_peak_mib"] = measure.peak_rss_bytes() / MIB
            result["gpu_name"] = torch.cuda.get_device_name()
        else:
            result = run_phases(spec["decoder_layers"], spec["vision_layers"], torch.float32, "cpu", cases,
                                spec["stats_items"], spec["solve_layers"], host_phase)
    print(json.dumps(result))


def spawn(spec: dict) -> dict:
    # glibc hands freed blocks of at least this size straight back to the system: a phase's peak is its own
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(64 * 1024), "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], env=env, check=True,
                          stdout=subprocess.PIPE, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


# ---- the report ------------------------------------------------------------------------------------------------

def pgd_case(result: dict, checkpointing: bool, micro: int) -> dict:
    return next(c for c in result["pgd"] if c["checkpointing"] == checkpointing and c["micro"] == micro)


def mode(checkpointing: bool) -> str:
    return "checkpointing" if checkpointing else "no checkpointing"


def report(runs: dict[int, dict], gpu: dict | None, stats_items: int) -> None:
    small, large = min(runs), max(runs)
    first = runs[small]
    tensors, parameters = parameter_census()
    print(f"LLaVA-1.5-7B-shaped random model, float32, on this CPU ({torch.get_num_threads()} threads): CLIP "
          f"ViT-L/14-336 ({first['vision_layers']} layers), decoder d={D}, MLP 11008, vocabulary 32064; "
          f"{first['prompt_tokens']}-token prompts (576 image tokens), {first['tokens']} with the answer. "
          f"The full model: {parameters / 1e9:.2f}B parameters in {tensors} tensors "
          f"({parameters * 2 / GIB:.1f} GiB in bfloat16).\n")
    print("| decoder layers | phase | peak host memory above the phase's start | CPU time |")
    print("|---|---|---|---|")
    for layers, run in sorted(runs.items()):
        print(f"| {layers} | build (weights {run['weights_mib']:,.0f} MiB) | - | {run['build_s']:.1f} s |")
        print(f"| {layers} | fingerprint ({run['fingerprint']['tensors']} tensors) | - | "
              f"{run['fingerprint']['s'] * 1000:.0f} ms |")
        if "knn_stats" in run:
            print(f"| {layers} | knn gate statistics, {stats_items} prompts in one batch | "
                  f"{run['knn_stats']['peak_mib']:,.0f} MiB | {run['knn_stats']['s_per_item']:.1f} s/prompt |")
            print(f"| {layers} | paper gate statistics, 2 x {stats_items} prompts (Grams "
                  f"{run['paper_stats']['grams_mib']:,.0f} MiB) | {run['paper_stats']['peak_mib']:,.0f} MiB | "
                  f"{run['paper_stats']['s_per_item']:.1f} s/prompt |")
        if "paper_solve" in run:
            print(f"| {layers} | paper gate solve, {run['paper_solve']['layers']} layer(s) | "
                  f"{run['paper_solve']['peak_mib']:,.0f} MiB | {run['paper_solve']['s_per_layer']:.1f} s/layer |")
        for case in run["pgd"]:
            print(f"| {layers} | PGD step, {mode(case['checkpointing'])}, micro-batch {case['micro']} | "
                  f"{case['peak_mib']:,.0f} MiB | {case['s_per_item']:.1f} s/item |")

    print("\nRatios measured in this run (PGD peak memory; CPU time per item-step):")
    for layers, run in sorted(runs.items()):
        for micro in sorted({c["micro"] for c in run["pgd"]}):
            plain, checkpointed = pgd_case(run, False, micro), pgd_case(run, True, micro)
            print(f"  {layers} layers, micro-batch {micro}: checkpointing / none: memory "
                  f"{checkpointed['peak_mib'] / plain['peak_mib']:.2f}, time "
                  f"{checkpointed['s_per_item'] / plain['s_per_item']:.2f}")
    for checkpointing in (False, True):
        ratio = pgd_case(first, checkpointing, 2)["peak_mib"] / pgd_case(first, checkpointing, 1)["peak_mib"]
        print(f"  {small} layers, {mode(checkpointing)}: micro-batch 2 / micro-batch 1: memory {ratio:.2f}")

    print(f"\nExtrapolation to the full {FULL_LAYERS} decoder layers (float32), from this run: with p(L, m) the PGD "
          f"peak at L layers and micro-batch m, i = p({small}, 2) - p({small}, 1) (one more item), "
          f"b = (p({large}, 1) - p({small}, 1)) / {large - small} (one more layer, per item), "
          f"c = p({small}, 1) - i:\n  p(L, m) = c + m (i + (L - {small}) b)")
    for checkpointing in (False, True):
        one, two = pgd_case(first, checkpointing, 1), pgd_case(first, checkpointing, 2)
        deeper = pgd_case(runs[large], checkpointing, 1)
        item = two["peak_mib"] - one["peak_mib"]
        per_layer = (deeper["peak_mib"] - one["peak_mib"]) / (large - small)
        constant = one["peak_mib"] - item
        per_item = item + (FULL_LAYERS - small) * per_layer

        def peak(m: int) -> float:
            return (constant + m * per_item) / 1024

        seconds = (deeper["s_per_item"] - one["s_per_item"]) / (large - small)
        print(f"  {mode(checkpointing)}: c = {round(constant) + 0:,} MiB, i = {item:,.0f} MiB, b = {per_layer:,.1f} MiB -> "
              f"{per_item / 1024:,.2f} GiB per item at L={FULL_LAYERS}: p({FULL_LAYERS}, 1) = {peak(1):,.1f} GiB, "
              f"p({FULL_LAYERS}, 8) = {peak(8):,.1f} GiB, p({FULL_LAYERS}, 32) = {peak(32):,.1f} GiB; "
              f"CPU time per item-step + {seconds:.1f} s a layer -> "
              f"{one['s_per_item'] + (FULL_LAYERS - small) * seconds:.0f} s")
    grams_per_layer = 2 * D * D * 8 / MIB
    print(f"  paper gate statistics: Grams 2 x d^2 x 8 bytes = {grams_per_layer:.0f} MiB a steered layer -> "
          f"{(FULL_LAYERS - 1) * grams_per_layer / 1024:.2f} GiB for layers 1..{FULL_LAYERS - 1} (before: every layer, "
          f"{FULL_LAYERS * grams_per_layer / 1024:.2f} GiB, and merging two shards made a third copy); knn gate: "
          f"sums only, {(FULL_LAYERS - 1) * 2 * D * 8 / MIB:.1f} MiB")
    if "paper_solve" in first:
        solve = first["paper_solve"]["s_per_layer"]
        print(f"  paper gate solve on this CPU: {FULL_LAYERS - 1} layers x {solve:.1f} s = "
              f"{(FULL_LAYERS - 1) * solve / 60:.1f} min")
    fingerprint = first["fingerprint"]
    print(f"  fingerprint: {fingerprint['s'] * 1000:.0f} ms for {fingerprint['tensors']} tensors, 256 elements each "
          f"whatever their size -> {fingerprint['s'] / fingerprint['tensors'] * tensors:.2f} s for the full model's "
          f"{tensors}")

    if gpu is not None:
        print(f"\nThe full {FULL_LAYERS}-layer model in bfloat16 on {gpu['gpu_name']} (weights "
              f"{gpu['weights_mib'] / 1024:.1f} GiB; peak GPU memory above them per phase; host peak of the whole "
              f"process {gpu['host_peak_mib'] / 1024:.1f} GiB):")
        for case in gpu["pgd"]:
            peak = "out of memory" if case["oom"] else f"{case['peak_mib'] / 1024:,.1f} GiB"
            print(f"  PGD step, {mode(case['checkpointing'])}, micro-batch {case['micro']}: {peak}, "
                  f"{case['s_per_item']:.2f} s/item")
        print(f"  knn gate statistics: {gpu['knn_stats']['peak_mib'] / 1024:.1f} GiB, "
              f"{gpu['knn_stats']['s_per_item']:.2f} s/prompt")
        print(f"  paper gate statistics on the GPU: {gpu['paper_stats']['peak_mib'] / 1024:.1f} GiB (Grams "
              f"{gpu['paper_stats']['grams_mib'] / 1024:.2f} GiB), {gpu['paper_stats']['s_per_item']:.2f} s/prompt; "
              f"solve {gpu['paper_solve']['s_per_layer']:.2f} s/layer x {gpu['paper_solve']['layers']}")
        print(f"  fingerprint: {gpu['fingerprint']['s']:.2f} s")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--decoder-layers", type=int, nargs=2, default=[2, 3], metavar=("SMALL", "LARGE"),
                        help="the two decoder depths measured (the slope per layer); SMALL >= 2")
    parser.add_argument("--vision-layers", type=int, default=24, help="CLIP layers (24: ViT-L/14-336)")
    parser.add_argument("--stats-items", type=int, default=2, help="prompts per statistics phase")
    parser.add_argument("--solve-layers", type=int, default=0,
                        help="paper gate layers to solve on the CPU (~20-60 s each here; the GPU run solves all)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--skip-gpu", action="store_true")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(json.loads(args.worker))
        return 0
    small, large = sorted(args.decoder_layers)
    if small < 2 or small == large:
        parser.error("--decoder-layers needs two different depths of at least 2 (layers 1..L-1 are steered)")
    started = time.perf_counter()
    # micro-batch m of m items: a batch of several micro-batches peaks as one does (they run one after another)
    every_case = [(False, 1, 1), (True, 1, 1), (False, 2, 2), (True, 2, 2)]
    runs = {}
    for layers, cases, stats_items in ((small, every_case, args.stats_items), (large, every_case[:2], 0)):
        print(f"{layers} decoder layers ...", file=sys.stderr, flush=True)
        runs[layers] = spawn({"device": "cpu", "decoder_layers": layers, "vision_layers": args.vision_layers,
                              "pgd_cases": cases, "stats_items": stats_items, "solve_layers": args.solve_layers,
                              "threads": args.threads})
    gpu = None
    if torch.cuda.is_available() and not args.skip_gpu:
        print(f"{FULL_LAYERS} decoder layers on the GPU ...", file=sys.stderr, flush=True)
        gpu = spawn({"device": "cuda", "stats_items": 8, "threads": args.threads,
                     "pgd_cases": [(False, 1, 1), (True, 1, 1), (False, 8, 8), (True, 8, 8), (True, 32, 32),
                                   (False, 32, 32)]})
    report(runs, gpu, args.stats_items)
    print(f"\n({time.perf_counter() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
