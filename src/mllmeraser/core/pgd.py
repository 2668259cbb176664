"""PGD on the forget questions' images: the knowledge-recall inputs of a fit.

Each image is perturbed by the model's own gradient (L-inf budget, pixels kept in range, eval mode, no parameter
touched; in micro-batches of `PGDSettings.batch_size` under activation checkpointing, micro_batches.py and
checkpointing.py) so that the model recalls the question's answer as strongly as it can; an item already
recalled at mean answer NLL <= stop_nll keeps its image. The pass is also where the fit reads the forget set's
activations (`pgd_recall` with a RecallRead): PGD's own teacher-forced forwards give the answer NLL and, read at
the prompt's positions, the block outputs and pooled features (capture.reading_prompt).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Sequence

import torch

from . import gating, models
from .capture import reading_prompt
from .checkpointing import activation_checkpointing
from .inputs import PromptLike
from .micro_batches import micro_batches, pixel_offsets
from .settings import PGDSettings


@dataclass(frozen=True)
class RecallRead:
    """What PGD's forwards also read, so no other forward is needed (capture.reading_prompt): the block outputs at
    `layers` of each item's last prompt token, and the pooled prompt feature of `layers[pooled_layer]` (of
    `first_layer`'s input, the decoder's first layer, for a pooling of the input embeddings)."""
    layers: Sequence[torch.nn.Module]
    pooled_layer: int | None = None
    pooling: str = "mean"
    first_layer: torch.nn.Module | None = None


@dataclass
class PGDResult:
    """`images`: the perturbed pixel values (normalised, as the model takes them). With a RecallRead: `recall`
    [N, len(layers), d], the last-prompt-token outputs at each item's final image (the knowledge-recall
    activations); `clean` the same at the clean image; `clean_pooled` [N, d] the clean prompts' pooled
    features (or None). Float32 on CPU."""
    images: torch.Tensor
    recall: torch.Tensor | None = None
    clean: torch.Tensor | None = None
    clean_pooled: torch.Tensor | None = None


def pgd_images(model, processor, items: Sequence[PromptLike], settings: PGDSettings) -> torch.Tensor:
    """Adversarially perturbed pixel values (normalised, as the model takes them) that maximise the
    likelihood of each item's ground-truth answer (see pgd_recall)."""
    return pgd_recall(model, processor, items, settings).images


def pgd_recall(model, processor, items: Sequence[PromptLike], settings: PGDSettings,
               read: RecallRead | None = None) -> PGDResult:
    """PGD on the images of `items` and, with `read`, the activations the fit needs, read from PGD's own forwards.

    Parameters are never updated; only the pixels get gradients. The forward/backward passes take
    `settings.batch_size` items at a time, under activation checkpointing where `settings.checkpointing` and the
    model allow it; the result is the same per item.

    Every forward is teacher-forced (prompt, then answer): its logits give the answer's NLL, which the early
    stop reads, and under causal attention its prompt positions are a forward of the prompt alone (up to float
    rounding), which is where the fit's activations are read (capture.reading_prompt). So the first forward, at
    the clean images, gives the clean activations and pooled features; a forward after each step gives the
    activations at the new images, kept for the items that stop there; the last step's forward gives the rest.
    Without an early stop only the first and the last of these run; without `read` and without an early stop,
    none do."""
    settings = settings.resolved(model, len(items))
    inputs = models.encode_with_answers(processor, items)
    labels = inputs.pop("labels")
    columns = models.prompt_width(labels)
    inputs = models.forward_inputs(model, inputs)
    clean = inputs.pop("pixel_values").detach().float()
    labels = labels.to(clean.device)
    low, high, scale = (t.to(clean.device) for t in models.pixel_value_bounds(processor, clean))
    eps, step = settings.eps * scale, settings.step * scale
    # The loss is the answer NLL summed over answer tokens, divided by the whole batch's answer-token count
    # (what its mean divides by), so a micro-batch's gradient is the slice of the whole batch's gradient, not a
    # rescaled one.
    answer_tokens = int((labels[:, 1:] != -100).sum())
    offsets = pixel_offsets(inputs, len(items), clean.shape[0])
    adversarial = clean.clone()
    param_dtype = next(model.parameters()).dtype
    result = PGDResult(images=clean)
    early_stop = settings.stop_nll is not None

    def forward(ids: list[int]) -> torch.Tensor:
        """The answer NLL of items `ids` at their current images; with `read`, their activations into result.recall
        (and, the first time, result.clean and result.clean_pooled)."""
        nll, last, pooled = _answer_forward(model, adversarial, labels, inputs, len(items), offsets, ids,
                                            settings.batch_size, param_dtype, read, columns)
        if read is not None:
            if result.recall is None:
                result.recall, result.clean, result.clean_pooled = last.clone(), last, pooled
            else:
                result.recall[torch.tensor(ids)] = last
        return nll

    def still_moving(ids: list[int], nll: torch.Tensor) -> list[int]:
        # An item whose answer the model already recalls strongly (mean answer-token NLL at its current image at
        # most stop_nll) has what PGD is for: its image stays as it is now, and so do its activations.
        return [i for i, value in zip(ids, nll.tolist()) if not early_stop or value > settings.stop_nll]

    active = list(range(len(items)))  # the items PGD still moves
    if read is not None or (early_stop and settings.steps > 0):
        active = still_moving(active, forward(active))
    requires = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        with activation_checkpointing(model, settings.checkpointing and settings.steps > 0):
            for index in range(settings.steps):
                if not active:
                    break
                gradient = torch.zeros_like(adversarial)  # sign(0) = 0: a stopped item's pixels do not move
                for rows, pixels, part in micro_batches(inputs, len(items), offsets, settings.batch_size, active):
                    x = adversarial[pixels].requires_grad_(True)
                    # use_cache=False: no KV cache is built for a loss (checkpointed blocks would drop it anyway)
                    nll_sums, _ = _answer_nll_sums(model, part, x.to(param_dtype), labels[rows])
                    (gradient[pixels],) = torch.autograd.grad(nll_sums.sum() / answer_tokens, x)
                with torch.no_grad():  # descend the answer's loss = ascend its likelihood
                    adversarial = adversarial - step * gradient.sign()
                    adversarial = torch.maximum(torch.minimum(adversarial, clean + eps), clean - eps)
                    adversarial = torch.maximum(torch.minimum(adversarial, high), low)
                last_step = index == settings.steps - 1
                if (early_stop and not last_step) or (read is not None and last_step):
                    active = still_moving(active, forward(active))
    finally:
        for p, flag in zip(model.parameters(), requires):
            p.requires_grad_(flag)
    result.images = adversarial.detach()
    return result


@torch.no_grad()
def _answer_nll(model, pixel_values: torch.Tensor, labels: torch.Tensor, inputs: dict[str, torch.Tensor], batch: int,
                offsets: list[int], ids: Sequence[int], size: int, param_dtype: torch.dtype) -> torch.Tensor:
    """Mean answer-token NLL [len(ids)] of items `ids` at `pixel_values` (labels shifted by one, as the loss)."""
    return _answer_forward(model, pixel_values, labels, inputs, batch, offsets, ids, size, param_dtype)[0]


@torch.no_grad()
def _answer_forward(model, pixel_values: torch.Tensor, labels: torch.Tensor, inputs: dict[str, torch.Tensor],
                    batch: int, offsets: list[int], ids: Sequence[int], size: int, param_dtype: torch.dtype,
                    read: RecallRead | None = None, columns: int | None = None,
                    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(mean answer-token NLL [len(ids)] of items `ids` at `pixel_values` (labels shifted by one, as the loss);
    with `read`, their last-prompt-token outputs [len(ids), len(read.layers), d] and pooled prompt features,
    read from the same forwards over the first `columns` positions, the prompt; else None, None)."""
    values, lasts, pooled = [], [], []
    for rows, pixels, part in micro_batches(inputs, batch, offsets, size, ids):
        with contextlib.ExitStack() as stack:
            reading = None if read is None else stack.enter_context(reading_prompt(
                read.layers, part.get("attention_mask"), read.pooled_layer, read.pooling, columns,
                first_layer=read.first_layer))
            sums, counts = _answer_nll_sums(model, part, pixel_values[pixels].to(param_dtype), labels[rows])
        if reading is not None:
            lasts.append(reading.last)
            pooled.append(reading.pooled)
        values.append(sums / counts.clamp(min=1))
    if read is None:
        return torch.cat(values).cpu(), None, None
    features = gating.concat_features(pooled) if read.pooled_layer is not None else None
    return torch.cat(values).cpu(), torch.cat(lasts), features


def _answer_nll_sums(model, part: dict[str, torch.Tensor], pixel_values: torch.Tensor,
                     labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per item, the answer's token NLL summed ([B], float32, differentiable) and its token count ([B]), from one
    teacher-forced forward whose logits cover only the answer's positions (models.answer_logits)."""
    logits, kept = models.answer_logits(model, {**part, "pixel_values": pixel_values, "labels": labels})
    nll, mask = models.answer_token_nll(logits, kept)
    return nll.sum(dim=1), mask.sum(dim=1)
