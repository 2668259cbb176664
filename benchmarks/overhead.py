"""Generation overhead of an attached eraser, vanilla vs attached, measured side by side in one run.

1. The testbed model (built or reused from the cache), with an eraser fitted on its 10% forget request.
2. A random-weight LlavaForConditionalGeneration whose language decoder has LLaVA-1.5-7B's width
   (d=4096, 32 heads, MLP 11008, vocab 32000) and a few layers (`--layers`), with two erasers in turn:
   - the paper's per-layer gate on every layer;
   - the default prompt gate (knn), deciding at layer 1 and steering layers 1..L-1. Its banks have
     MLLMU-Bench's 10% scale: `--forget-prompts` forget and `--retain-prompts` retain prompts, float16. Its
     threshold is below every score, so it always fires: the worst case.
Prints the ratio attached / vanilla of median wall times (interleaved repeats) and the knn eraser's artifact
size. Target: <= 1.03.
Run: python benchmarks/overhead.py [--layers 4] [--repeats 9] [--skip-testbed]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

from mllmeraser.bench import measure
from mllmeraser.core import gating
from mllmeraser.core.compat import model_fingerprint
from mllmeraser.core.eraser import Eraser
from mllmeraser.core.eraser_fitter import fit_eraser
from mllmeraser.core.decoder_layers import find_decoder_layers


def random_eraser(model, layer_indices, alpha=0.5, seed=0, bank: tuple[int, int] | None = None) -> Eraser:
    """Random terms: a per-layer gate, or with `bank` = (forget, retain) prompts a knn prompt gate deciding at
    the first of `layer_indices` that always fires."""
    names, layers = find_decoder_layers(model)
    d = model.config.get_text_config().hidden_size
    g = torch.Generator().manual_seed(seed)
    r = torch.randn(len(layer_indices), d, generator=g)
    common = dict(r=r, alpha=alpha, layer_indices=layer_indices, layers_path=names[0].rsplit(".", 1)[0], hidden_size=d,
                  metadata={"fingerprint": model_fingerprint(model)})
    if bank is None:
        return Eraser(u=torch.randn(len(layer_indices), d, generator=g) / d, **common)
    gate = gating.fit_knn(torch.randn(bank[0], d, generator=g), torch.randn(bank[1], d, generator=g), "mean",
                          layer_indices[0])
    gate = gating.PromptGate(**{**gate.header(), "threshold": [-1e9]},  # below every score: it always fires
                             **{k.removeprefix("gate."): v for k, v in gate.tensors().items()})
    return Eraser(u=None, prompt_gate=gate, **common)


def time_generation(model, eraser: Eraser, inputs: dict, new_tokens: int, repeats: int) -> tuple[float, float, float]:
    """Vanilla vs attached generation of the same tokens; attaching happens outside the timed region."""
    def generate():
        with torch.no_grad():
            model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)

    return measure.overhead_ratio(generate, generate, repeats, context=lambda: eraser.attach(model))


def testbed_case(repeats: int) -> None:
    from mllmeraser import build_testbed, default_erasure_items, load_model, load_split_items, retained_inputs
    from mllmeraser.core.models import encode_prompts, to_device

    directory = build_testbed(seed=0, preset="full")
    model, processor = load_model(directory / "model")
    forget = load_split_items(directory / "data", "forget", 10)
    retain = retained_inputs(directory / "data", 10)
    erasure = default_erasure_items(directory / "data")
    eraser = fit_eraser(model, processor, forget=forget, retain=retain, erasure=erasure, progress=False)
    items = [i for i in forget + retain if i.task == "generation" and i.modality == "image"][:32]
    inputs = to_device(encode_prompts(processor, items), model)
    ratio, base, treated = time_generation(model, eraser, inputs, 30, repeats)
    print(f"testbed LLaVA (d={eraser.hidden_size}, {len(eraser.layer_indices)} steered layers), batch 32 x 30 new tokens: "
          f"vanilla {base * 1000:.0f} ms, attached {treated * 1000:.0f} ms, ratio {ratio:.3f}")


def wide_llava(num_layers: int):
    """A random LLaVA with LLaVA-1.5-7B's decoder width (d=4096, 32 heads, MLP 11008) and `num_layers` layers (seed
    0); a 1-layer toy vision tower (these benchmarks time the language decoder)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(0)
    text = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=num_layers, num_attention_heads=32,
                       num_key_value_heads=32, vocab_size=32064, max_position_embeddings=4096)
    vision = CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
                              image_size=28, patch_size=14)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=32000)
    return LlavaForConditionalGeneration(config).eval()


def wide_case(num_layers: int, repeats: int, prompt_tokens: int, new_tokens: int, batch: int, bank: tuple[int, int]) -> None:
    model = wide_llava(num_layers)
    input_ids = torch.randint(0, 32000, (batch, prompt_tokens))
    inputs = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
    shape = f"random LLaVA-1.5-7B-width decoder (d=4096, {num_layers} layers), batch {batch} x {prompt_tokens} prompt + {new_tokens} new tokens"
    for name, eraser in (("paper per-layer gate, every layer", random_eraser(model, list(range(num_layers)))),
                         (f"knn prompt gate at layer 1 ({bank[0]} + {bank[1]} bank rows), layers 1..{num_layers - 1}",
                          random_eraser(model, list(range(1, num_layers)), bank=bank))):
        ratio, base, treated = time_generation(model, eraser, inputs, new_tokens, repeats)
        print(f"{shape}, {name}: vanilla {base * 1000:.0f} ms, attached {treated * 1000:.0f} ms, ratio {ratio:.3f}")
        if eraser.prompt_gate is not None:
            with tempfile.TemporaryDirectory() as tmp:
                size = eraser.save(Path(tmp) / "e.safetensors").stat().st_size
            print(f"  knn eraser artifact at d=4096: {size / 2**20:.1f} MiB "
                  f"({(bank[0] + bank[1]) * 4096 * 2 / 2**20:.1f} MiB of it the float16 banks)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--skip-testbed", action="store_true")
    parser.add_argument("--forget-prompts", type=int, default=1000, help="knn forget bank rows (MLLMU-Bench 10%%: ~1k)")
    parser.add_argument("--retain-prompts", type=int, default=9000, help="knn retain bank rows (retain_90: ~9k)")
    args = parser.parse_args()
    started = time.perf_counter()
    if not args.skip_testbed:
        testbed_case(args.repeats)
    wide_case(args.layers, args.repeats, prompt_tokens=600, new_tokens=20, batch=1,
              bank=(args.forget_prompts, args.retain_prompts))
    print(f"({time.perf_counter() - started:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
