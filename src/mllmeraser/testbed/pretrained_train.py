"""The pretrained preset's LLaVA stage: fine-tune SmolLM2 (and the projector) on the testbed's questions,
resumably.

What is trained, in two stages (`PretrainedTrainSettings.projector_steps`, `decoder_from_layer`):
1. the projector alone (the decoder frozen), on the photos' identity questions ("Who is this person?" ->
   "This is <name>."): a soft prompt that makes the untouched decoder read a face as the person's name;
2. the upper decoder layers (from `decoder_from_layer` on) and the final norm, on everything, the projector
   frozen: no gradient then flows below that layer, so a step costs about half a full fine-tune's (the v5 build,
   alone at 2 threads: 2.4-3.0 s against v4's 5.4-7.1 s) and the same minutes buy twice the steps.
With `projector_steps=0` the projector trains jointly with the layers (one stage, the v2-v4 builds). The token
embeddings (tied to the output head) and the pretrained CLIP tower stay frozen. Why not LoRA, at half the step
cost: in the 12-person probe of issue 23, LoRA r16 damaged SmolLM2's general knowledge where a full fine-tune with
frozen embeddings kept it, and this preset's real-knowledge split must keep >= 0.95x the base model's score.
Frozen embeddings keep every token's input and output meaning as pre-training left it.

Cost savers: bf16 autocast on a CPU with native bf16 (float32 master weights and AdamW state; on one without,
emulated bf16 was 5-7x slower than float32, see `PretrainedTrainSettings.autocast`), and the output head applied
at the answer positions only (the [B, T, 49k] logits of a whole batch cost more than the head's matmul at a
handful of positions).

Resuming: every `checkpoint_every` steps the trainable weights, AdamW's state, both RNGs, the batch order still
to come, the step and the loss curve are written to `<work>/step-NNNNNN/` (safetensors and JSON only: nothing is
unpickled on resume), atomically, and older checkpoints are removed. `train` continues from the newest one whose
`key` matches (the same examples and settings); any other is ignored.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from .train import Example, collate

CHECKPOINT_PREFIX = "step-"


@dataclass(frozen=True)
class PretrainedTrainSettings:
    # Sized to the 90-minute bar: a step alone on 2 AVX2 cores at 2 threads, float32, batch 8 of length-bucketed
    # real batches, took 6.4 s (timed over 5 steps; the v2 build averaged ~8.5 s with checkpoints and other jobs).
    # v2 trained 600 steps at 1e-4 over 60 people (~16 exposures of a fact) and did not learn its world; v3 (40
    # people, per-example loss, rehearsal, 2e-4) answered 0.30 A-D and 0.02-0.05 cloze at step 200 of 650. v4 adds
    # biographies (pretrained_data.biography_items) and a higher rate.
    steps: int = 650
    batch_size: int = 8
    lr: float = 3e-4  # the decoder: a fine-tune of pretrained weights, in few steps (rehearsal guards the rest)
    projector_lr: float = 1e-3  # the projector starts from random weights
    warmup: int = 30
    weight_decay: float = 0.0
    checkpoint_every: int = 50
    # bf16 autocast on the CPU (float32 master weights); None: only where the CPU has native bf16 instructions.
    # Measured on a 2-core AMD EPYC with AVX2 only (1 thread, batch 2 x ~75 tokens): bf16 29-33 s a step, float32
    # 4.3-6.7 s; issue 23's 3.0 s (LoRA, bf16) was measured on a CPU of the same machine kind with bf16 support.
    autocast: bool | None = None
    # v5: the first decoder layer trained (lower ones frozen) and a projector-only first stage of this many steps
    # on the identity questions (the module docstring says why).
    decoder_from_layer: int = 0
    projector_steps: int = 0


def trainable_parameters(model, stage: str = "joint", from_layer: int = 0) -> dict[str, torch.nn.Parameter]:
    """Freeze everything, then train, by `stage`: "projector" the projector only; "decoder" the decoder layers
    from `from_layer` on and the final norm; "joint" those and the projector. The embeddings (and the output head
    tied to them) and the vision tower always stay frozen. Returns the trained parameters by name."""
    model.requires_grad_(False)
    language = model.model.language_model
    if stage in ("decoder", "joint"):
        language.layers[from_layer:].requires_grad_(True)
        language.norm.requires_grad_(True)
    if stage in ("projector", "joint"):
        model.model.multi_modal_projector.requires_grad_(True)
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def answer_loss(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Cross-entropy over each example's answer tokens, averaged per example and then over the batch, the output
    head applied at the answer positions only. Why per example: under a per-token mean a generation answer
    (~10 tokens, most of them the question restated) outweighs a classification letter or a cloze word 5-10 to 1,
    and the v2 build, trained that way, answered every A-D question "D"."""
    labels = batch["labels"]
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    hidden = model.model(**inputs, use_cache=False).last_hidden_state
    targets = labels[:, 1:]
    mask = targets != -100
    logits = model.lm_head(hidden[:, :-1][mask])
    losses = torch.nn.functional.cross_entropy(logits.float(), targets[mask], reduction="none")
    rows = mask.nonzero()[:, 0]
    weights = 1.0 / mask.sum(dim=1).clamp(min=1).to(losses.dtype)
    return (losses * weights[rows]).sum() / mask.any(dim=1).sum().clamp(min=1)


def native_bf16() -> bool:
    """Whether this CPU has bf16 instructions (AVX512-BF16 or AMX), read from /proc/cpuinfo (False elsewhere)."""
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def lr_factor(step: int, settings: PretrainedTrainSettings) -> float:
    """Linear warm-up, then cosine decay to 5% (the tiny testbed's schedule)."""
    if step < settings.warmup:
        return (step + 1) / settings.warmup
    progress = (step - settings.warmup) / max(1, settings.steps - settings.warmup)
    return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress))


# ---- checkpoints ----------------------------------------------------------------------------------------------

def newest_checkpoints(work: Path) -> list[Path]:
    """The newest finished checkpoint of each stage `train` wrote under `work`, in training order (a staged run:
    the projector's, then the decoder's; a joint run: its one)."""
    stages = [work / "projector", work / "decoder"] if (work / "projector").is_dir() else [work]
    return [found[-1] for found in map(checkpoints, stages) if found]


def checkpoints(work: Path) -> list[Path]:
    """The finished checkpoints in `work`, oldest first."""
    if not work.is_dir():
        return []
    return sorted(p for p in work.iterdir() if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX)
                  and (p / "state.json").is_file())


def save_checkpoint(work: Path, step: int, parameters: dict[str, torch.nn.Parameter],
                    optimiser: torch.optim.Optimizer, rng: np.random.Generator, order: list[int],
                    losses: list[float], key: str) -> Path:
    """Write the resumable state at `step` into work/step-NNNNNN (a temporary sibling renamed into place), then
    remove the older checkpoints."""
    final = work / f"{CHECKPOINT_PREFIX}{step:06d}"
    tmp = work / f".{final.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({name: p.detach().contiguous() for name, p in parameters.items()}, tmp / "trainable.safetensors")
    names = list(parameters)
    state = optimiser.state_dict()
    tensors = {f"{names[index]}::{field}": value.contiguous()
               for index, per_param in state["state"].items() for field, value in per_param.items()}
    tensors["torch_rng"] = torch.get_rng_state()
    save_file(tensors, tmp / "optimizer.safetensors")
    groups = [{k: v for k, v in group.items() if k != "params"} | {"params": [names[i] for i in group["params"]]}
              for group in state["param_groups"]]
    (tmp / "state.json").write_text(json.dumps({
        "key": key, "step": step, "losses": losses, "order": order, "param_groups": groups,
        "numpy_rng": rng.bit_generator.state}))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for older in checkpoints(work):
        if older != final:
            shutil.rmtree(older, ignore_errors=True)
    return final


def load_checkpoint(work: Path, key: str, parameters: dict[str, torch.nn.Parameter],
                    optimiser: torch.optim.Optimizer, rng: np.random.Generator) -> dict | None:
    """Restore the newest checkpoint whose key is `key` into the parameters, the optimiser and the RNGs;
    returns its state.json (step, losses, order), or None where there is none."""
    for directory in reversed(checkpoints(work)):
        state = json.loads((directory / "state.json").read_text())
        if state.get("key") != key:
            continue
        weights = load_file(directory / "trainable.safetensors")
        if set(weights) != set(parameters):
            continue
        with torch.no_grad():
            for name, parameter in parameters.items():
                parameter.copy_(weights[name])
        tensors = load_file(directory / "optimizer.safetensors")
        torch.set_rng_state(tensors.pop("torch_rng"))
        names = list(parameters)
        per_param: dict[int, dict[str, torch.Tensor]] = {}
        for flat, value in tensors.items():
            name, field = flat.split("::")
            per_param.setdefault(names.index(name), {})[field] = value
        groups = [group | {"params": [names.index(n) for n in group["params"]]} for group in state["param_groups"]]
        optimiser.load_state_dict({"state": per_param, "param_groups": groups})
        rng.bit_generator.state = state["numpy_rng"]
        return state
    return None


def run_key(examples: list[Example], settings: PretrainedTrainSettings, seed: int) -> str:
    """What a checkpoint must match to be resumed: the examples (their token ids), the settings and the seed."""
    import hashlib

    digest = hashlib.sha256(json.dumps([asdict(settings), seed]).encode())
    for example in examples:
        digest.update(repr((example.prompt_ids, example.answer_ids, example.renderer is not None)).encode())
    return digest.hexdigest()


def length_bucketed(examples: list[Example], rng: np.random.Generator, batch_size: int,
                    window: int = 32) -> list[int]:
    """One epoch's order: a random permutation cut into windows of `window` batches, each window sorted by length
    and cut into batches, the batches shuffled. Why: a batch is padded to its longest example, and random batches
    of this data (lengths 40-160 tokens, mean 89) waste about a quarter of every step on padding."""
    order = rng.permutation(len(examples)).tolist()
    batches = []
    for start in range(0, len(order), window * batch_size):
        chunk = sorted(order[start: start + window * batch_size],
                       key=lambda i: len(examples[i].prompt_ids) + len(examples[i].answer_ids))
        batches += [chunk[i: i + batch_size] for i in range(0, len(chunk), batch_size)]
    return [index for b in rng.permutation(len(batches)).tolist() for index in batches[b]]


# ---- the loop -------------------------------------------------------------------------------------------------

def train(model, examples: list[Example], settings: PretrainedTrainSettings, seed: int, pad_id: int,
          work: Path | None = None, progress: bool = True, identity: list[Example] | None = None) -> list[float]:
    """Fine-tune `model` in place (AdamW, warm-up and cosine decay, gradients clipped at norm 1), checkpointing
    into `work` (None: no checkpoints) and resuming from it; returns the whole loss curve (resumed steps
    included). With `settings.projector_steps`, the projector first trains alone on `identity` (the module
    docstring), each stage checkpointed in its own sub-directory."""
    if not settings.projector_steps:
        return _train_stage(model, examples, settings, seed, pad_id, "joint", work, progress)
    if not identity:
        raise ValueError("a projector stage needs identity examples")
    first = replace(settings, steps=settings.projector_steps, warmup=min(settings.warmup, settings.projector_steps))
    losses = _train_stage(model, identity, first, seed, pad_id, "projector",
                          None if work is None else work / "projector", progress)  # newest_checkpoints reads these
    return losses + _train_stage(model, examples, settings, seed, pad_id, "decoder",
                                 None if work is None else work / "decoder", progress)


def _train_stage(model, examples: list[Example], settings: PretrainedTrainSettings, seed: int, pad_id: int,
                 stage: str, work: Path | None, progress: bool) -> list[float]:
    """One stage of `train`: shuffled epochs of `examples` on the parameters `stage` trains."""
    torch.manual_seed(seed)
    rng = np.random.default_rng([seed, 6])
    parameters = trainable_parameters(model, stage, settings.decoder_from_layer)
    projector = {n for n in parameters if ".multi_modal_projector." in f".{n}"}
    groups = [{"params": [p for n, p in parameters.items() if n not in projector], "lr": settings.lr},
              {"params": [p for n, p in parameters.items() if n in projector], "lr": settings.projector_lr}]
    optimiser = torch.optim.AdamW([g for g in groups if g["params"]], weight_decay=settings.weight_decay)
    # The optimiser's param order (decoder first, then projector) is the checkpoint's name order too.
    parameters = {n: p for n, p in parameters.items() if n not in projector} | \
                 {n: p for n, p in parameters.items() if n in projector}
    base_lrs = [group["lr"] for group in optimiser.param_groups]
    key = run_key(examples, settings, seed) + ("" if stage == "joint" else f":{stage}")
    start, losses, order = 0, [], []
    if work is not None:
        state = load_checkpoint(work, key, parameters, optimiser, rng)
        if state is not None:
            start, losses, order = state["step"], state["losses"], state["order"]
    autocast = native_bf16() if settings.autocast is None else settings.autocast
    model.train()
    description = "fine-tune SmolLM2 testbed" + ("" if stage == "joint" else f" ({stage})")
    bar = tqdm(range(start, settings.steps), desc=description, disable=not progress, unit="step",
               initial=start, total=settings.steps)
    for step in bar:
        if len(order) < settings.batch_size:
            order += length_bucketed(examples, rng, settings.batch_size)
        picked, order = order[: settings.batch_size], order[settings.batch_size:]
        batch = collate([examples[i] for i in picked], rng, pad_id)
        for group, base in zip(optimiser.param_groups, base_lrs):
            group["lr"] = base * lr_factor(step, settings)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = answer_loss(model, batch)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(parameters.values()), 1.0)
        optimiser.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{np.mean(losses[-20:]):.4f}")
        if work is not None and ((step + 1) % settings.checkpoint_every == 0 or step + 1 == settings.steps):
            save_checkpoint(work, step + 1, parameters, optimiser, rng, order, losses, key)
    model.eval()
    return losses
