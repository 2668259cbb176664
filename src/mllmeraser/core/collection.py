"""Fitting an eraser: contrast sets -> activations -> sufficient statistics / pooled features -> closed forms.

1. Knowledge-recall inputs: the forget questions, their images perturbed by PGD (the model's own gradient,
   L-inf budget, pixels kept in range, eval mode, no parameter touched; in micro-batches of
   `PGDSettings.batch_size` under activation checkpointing) so the model recalls the fact as strongly as it can;
   an item already recalled at mean answer NLL <= stop_nll keeps its image. Knowledge-erasure inputs: questions
   the model refuses (on the testbed, questions about strangers) or any user-supplied set. Their
   last-prompt-token block outputs give the direction r_l = mean(erasure) - mean(recall)
   (`steering.SteeringStats.direction`). A request's pass over its forget set is one pass (`pgd_recall`): PGD's
   own teacher-forced forwards give the answer NLL and, read at the prompt's positions, the activations.
2. The gate. Default, a prompt gate (`gating.py`): the pooled prompt feature at the decision layer of the
   clean forget questions (fire) and of the retained questions (stay off) make a knn (or ridge) scorer; its
   threshold is calibrated on held-out calibration prompts, people outside the fit (on a benchmark: its
   validation hold-out), so that at most `max_fpr` of them pass. Those forwards stop at the decision layer.
   `gate="paper"`: the paper's per-layer null-space gate on the last token (`steering.solve_gate_paper`),
   from the Grams of the steered layers' last-token outputs of forget (clean and PGD) and retain questions.
The equations are in steering.py and gating.py; this module only gathers their inputs and packs the result as an
Eraser. What runs it all is `eraser_fitter.EraserFitter` (the shared part through the model cache, cache.py, which
calls `shared_inputs` here; this module reads a cache entry, never the cache itself).
"""

from __future__ import annotations

import contextlib
import functools
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Sequence

import torch
import torch.utils.checkpoint
from tqdm import tqdm

from ..errors import UserInputError
from . import attachment, gating, models, steering
from . import distributed  # torchrun: sharded batches, all-reduced statistics
from .eraser import Eraser
from .inputs import PromptLike, occluded_copies

if TYPE_CHECKING:
    from .cache import SharedStatistics

GATES = ("knn", "ridge", "paper")


@dataclass(frozen=True)
class PGDSettings:
    eps: float = 8 / 255  # L-inf budget in pixel units ([0, 1] images)
    step: float = 2 / 255
    steps: int = 10
    # Items per forward/backward pass. PGD's step is the sign of each item's own gradient, so splitting a batch
    # changes the peak memory (activations grow with it) and nothing else: each micro-batch's loss is divided by
    # the whole batch's answer-token count, so its gradient is the unsplit gradient's slice. None: 8 at scale
    # (without checkpointing, 32 image prompts of ~600 tokens hold ~90 GB of activations at 7B), the whole batch
    # on a small model, where splitting only costs time (see `resolved`).
    batch_size: int | None = None
    # Activation checkpointing for the PGD loop (where the model has transformers' checkpointable blocks): each
    # block keeps only its input and recomputes the rest in the backward, ~one extra forward a step for a
    # fraction of the memory. Switched on for the loop only; the model's own flags are restored afterwards.
    # None: on at scale, off on a small model (see `resolved`).
    checkpointing: bool | None = None
    # Early stop: before each step, an item whose mean answer-token NLL is at most stop_nll keeps its current
    # image and leaves the loop (PGD is there so the model recalls strongly; where it already does, more steps
    # buy nothing and cost a forward and a backward each). None: every item runs every step (the paper's PGD).
    # 0.1 nats is a mean answer-token probability of ~0.9, fixed before measuring anything with it; against the
    # paper's 10 steps it changes the testbed's direction by cosine >= 0.9995 per layer (README, "Scale").
    stop_nll: float | None = 0.1

    def __post_init__(self) -> None:
        if self.stop_nll is not None and not self.stop_nll >= 0:
            raise UserInputError(None, f"PGD stop_nll must be >= 0, got {self.stop_nll}")
        if self.batch_size is not None and self.batch_size < 1:
            raise UserInputError(None, f"PGD batch_size must be >= 1, got {self.batch_size}")
        if self.steps < 0:
            raise UserInputError(None, f"PGD steps must be >= 0, got {self.steps}")

    def resolved(self, model, batch: int) -> PGDSettings:
        """These settings with `batch_size` and `checkpointing` decided for `model` and a batch of `batch` items
        where they are None. At scale (a text decoder at least AT_SCALE_WIDTH wide: 7B models are 3,584-4,096)
        micro-batches of 8 under checkpointing: PGD's activations then take a quarter of the memory (measured on
        LLaVA-1.5-7B's shape, benchmarks/fit_memory.py). Below it, activations are small and splitting or
        recomputing only costs time (the small testbed's fit: 9.2 s against 3.0 s), so one batch, no
        checkpointing. Either way the images are the same (tests/test_fit_memory.py)."""
        at_scale = int(model.config.get_text_config().hidden_size) >= AT_SCALE_WIDTH
        return replace(self, batch_size=self.batch_size or (8 if at_scale else max(batch, 1)),
                       checkpointing=at_scale if self.checkpointing is None else self.checkpointing)


AT_SCALE_WIDTH = 1024
"""Text-decoder width from which PGD defaults to micro-batches under activation checkpointing."""


@dataclass(frozen=True)
class FitSettings:
    # Defaults chosen on the testbed's validation people only (README, "Selective erasure").
    gate: str = "knn"  # "knn" (default), "ridge" (linear, on the pooled prompt), "paper" (per-layer, last token)
    # prompt gates: "mean" (attention-masked mean over the prompt), "last", or "windows:W" (the means of W-token
    # windows at stride W // 2, scored each, the max deciding: gating.py, "segments")
    pooling: str = "mean"
    # prompt gates: the decoder layer whose output decides; steering from there on. An int is that layer; a float in
    # (0, 1) a fraction of the decoder's depth (gating.decision_layer_index: the layer nearest f * L), so one default
    # fits every depth: a quarter, layer 1 of the testbed's 4 (where the defaults were chosen) and 8 of a 30-layer
    # decoder (gating.DECISION_DEPTH says why). A fit resolves it first (`at_depth`): the model cache's key and the
    # eraser's record hold the absolute layer, so the default names the same entries as layer 1 on the testbed.
    decision_layer: int | float = gating.DECISION_DEPTH
    neighbours: int = 1  # knn: similarities averaged over this many nearest forget (and retain) prompts
    max_fpr: float = 0.01  # prompt gates: the fraction of calibration prompts the threshold lets through
    # knn: a floor under the calibrated threshold, tau >= log(min_ratio): the nearest forget prompt must be at least
    # min_ratio times nearer than the nearest retained one. Why: calibration only sees the validation people; where
    # all of them are far from the forget people (a small request: 3 people at 5% on the testbed), the quantile
    # falls to ~0 and a look-alike outside the validation people passes (7.9% of real-people prompts there).
    # 2 is the plain "twice as near" of a ratio test, set before measuring, not tuned.
    min_ratio: float = 2.0
    ratio: float = 0.3  # paper: fraction of retain eigen-directions kept as the null space
    gamma: float = 0.1  # paper: ridge on the projected system
    beta: float = 16.0  # ridge: retain weight per sample relative to forget
    lam: float = 1e-5  # ridge: L2 penalty relative to the mean eigenvalue
    alpha: float = 1.0  # steering strength (positive erases: r points from recall to erasure)
    layers: tuple[int, ...] | None = None  # steered decoder layers; None: decision layer..L-1 (paper: 1..L-1)
    floor: float = -math.inf  # paper gate shaping (steering.shape_gate): below the floor 0, above the cap clipped
    cap: float = math.inf
    normalise_gate: bool = False  # paper: rescale u_l so the mean gate over forget inputs is 1
    # prompt gates: both banks also hold each photo four times, one edge covered by a white band of this fraction
    # of the side (inputs.occluded_copies; 0: off). Why: writing over a photo (a caption, a name: the typographic
    # attack) moves its pooled feature away from the clean photo's, and the knn ratio test then finds no forget
    # prompt near; with covered copies in both banks a covered prompt is compared with covered prompts on both
    # sides. Off by default: a request's fit then runs 4 more forwards (to the decision layer) per forget photo and
    # the banks grow by 4 rows per photo, ~2x the fit time and ~4x the artifact on the testbed (README, Threat
    # model). 0.15, the value to turn it on with, was set before measuring; measured on the seed-2 testbed world.
    occlusion: float = 0.0
    mode: str = "prefill"
    pgd: PGDSettings = field(default_factory=PGDSettings)
    batch_size: int = 32

    def __post_init__(self) -> None:
        if self.gate not in GATES:
            raise UserInputError(None, f"gate must be one of {GATES}, got {self.gate!r}")
        try:
            gating.window_width(self.pooling)
        except ValueError as error:
            raise UserInputError(None, str(error)) from None
        if not 0.0 <= self.max_fpr < 1.0:
            raise UserInputError(None, f"max_fpr must be in [0, 1), got {self.max_fpr}")
        if self.min_ratio < 1.0:
            raise UserInputError(None, f"min_ratio must be >= 1, got {self.min_ratio}")
        if self.neighbours < 1:
            raise UserInputError(None, f"neighbours must be >= 1, got {self.neighbours}")
        gating.check_decision_layer(self.decision_layer)
        if not 0.0 <= self.occlusion < 0.5:
            raise UserInputError(None, f"occlusion must be in [0, 0.5), got {self.occlusion}")
        if not math.isfinite(self.alpha):  # the eraser would refuse it after the whole fit
            raise UserInputError(None, f"alpha must be finite, got {self.alpha}")

    def at_depth(self, num_layers: int) -> FitSettings:
        """These settings with `decision_layer` the absolute layer it names on a decoder of `num_layers` layers
        (gating.decision_layer_index; an absolute layer stays as it is, if the decoder has it). Every fit step
        reads resolved settings, so a fraction and the layer it names fit, cache and record alike."""
        return replace(self, decision_layer=gating.decision_layer_index(self.decision_layer, num_layers))

    def for_model(self, model, layers_path: str | None = None) -> FitSettings:
        """`at_depth` for `model`'s decoder (its layer list at `layers_path`, or the family's)."""
        _, layers = attachment.find_decoder_layers(model, layers_path)
        return self.at_depth(len(layers))


@dataclass(frozen=True)
class RecallRead:
    """What PGD's forwards also read, so no other forward is needed (attachment.reading_prompt): the block outputs at
    `layers` of each item's last prompt token, and the pooled prompt feature of `layers[pooled_layer]`."""
    layers: Sequence[torch.nn.Module]
    pooled_layer: int | None = None
    pooling: str = "mean"


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
    rounding), which is where the fit's activations are read (attachment.reading_prompt). So the first forward, at
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
    offsets = _pixel_offsets(inputs, len(items), clean.shape[0])
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
                for rows, pixels, part in _micro_batches(inputs, len(items), offsets, settings.batch_size, active):
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
    for rows, pixels, part in _micro_batches(inputs, batch, offsets, size, ids):
        with contextlib.ExitStack() as stack:
            reading = None if read is None else stack.enter_context(attachment.reading_prompt(
                read.layers, part.get("attention_mask"), read.pooled_layer, read.pooling, columns))
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


def _pixel_offsets(inputs: dict[str, torch.Tensor], batch: int, num_pixel_rows: int) -> list[int]:
    """Item i's pixel-value rows are offsets[i]:offsets[i + 1]: one image per item, either a row each
    ([batch, C, H, W], LLaVA) or image_grid_thw[i].prod() flattened patches each (Qwen-VL)."""
    grid = inputs.get("image_grid_thw")
    if grid is not None:
        offsets = [0] + torch.cumsum(grid.prod(dim=-1), 0).tolist()
    elif num_pixel_rows == batch:
        offsets = list(range(batch + 1))
    else:
        raise ValueError(f"cannot split {num_pixel_rows} pixel-value rows among {batch} items")
    if len(offsets) != batch + 1 or offsets[-1] != num_pixel_rows:
        raise ValueError(f"pixel values hold {num_pixel_rows} rows, the image grid {offsets[-1]} in "
                         f"{len(offsets) - 1} images, for {batch} items")
    return offsets


def _micro_batches(inputs: dict[str, torch.Tensor], batch: int, offsets: list[int], size: int,
                   ids: Sequence[int] | None = None) -> list[tuple[slice | torch.Tensor, slice | torch.Tensor, dict]]:
    """(item rows, pixel-value rows, the other inputs of those items) per micro-batch of `size` of the items
    `ids` (default all, in order). Rows are slices where the micro-batch's items are consecutive, index
    tensors otherwise. Every input is per item along dim 0 except the pixel values (see _pixel_offsets)."""
    ids = list(range(batch)) if ids is None else list(ids)
    parts = []
    for start in range(0, len(ids), size):
        chunk = ids[start:start + size]
        if chunk == list(range(chunk[0], chunk[-1] + 1)):
            rows, pixels = slice(chunk[0], chunk[-1] + 1), slice(offsets[chunk[0]], offsets[chunk[-1] + 1])
        else:
            rows = torch.tensor(chunk)
            pixels = torch.tensor([p for i in chunk for p in range(offsets[i], offsets[i + 1])])
        part = {}
        for key, value in inputs.items():
            if isinstance(value, torch.Tensor) and value.ndim > 0:
                if value.shape[0] != batch:
                    raise ValueError(f"input {key!r} has {value.shape[0]} rows, not one per item ({batch})")
                value = value[rows.to(value.device) if isinstance(rows, torch.Tensor) else rows]
            part[key] = value
        parts.append((rows, pixels, part))
    return parts


@contextmanager
def activation_checkpointing(model, enabled: bool = True) -> Iterator[int]:
    """Within the block, checkpoint every block of `model` that transformers can checkpoint; yields how many.

    transformers 5 checkpoints a `GradientCheckpointingLayer` when its own `gradient_checkpointing` and
    `training` flags are set and gradients are on. Its `activation_checkpointing_enable` /
    `gradient_checkpointing_enable` would need the whole model in train mode for that (dropout on) and leave a
    hook on the input embeddings behind, so instead only these blocks' flags are set: `training` on the block
    module alone, not its children, so the attention and MLP modules stay in eval mode and no dropout runs
    (the blocks of LLaVA, Qwen2-VL and Qwen2.5-VL read `training` only in their attention children).
    A block already checkpointed keeps its own checkpoint function. Every flag is restored on exit.
    """
    blocks = []
    if enabled and getattr(model, "supports_gradient_checkpointing", False):
        from transformers.modeling_layers import GradientCheckpointingLayer

        blocks = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    # non-reentrant: inputs need not require grad, and it composes with torch.autograd.grad
    function = functools.partial(torch.utils.checkpoint.checkpoint, use_reentrant=False)
    saved = [(block, {name: block.__dict__[name] for name in _CHECKPOINT_FLAGS if name in block.__dict__})
             for block in blocks]
    try:
        for block in blocks:
            if not block.gradient_checkpointing:
                block.gradient_checkpointing = True
                block._gradient_checkpointing_func = function
            block.training = True
        yield len(blocks)
    finally:
        for block, flags in saved:
            for name in _CHECKPOINT_FLAGS:
                if name in flags:
                    setattr(block, name, flags[name])
                elif name in block.__dict__:
                    delattr(block, name)  # it was the class default


_CHECKPOINT_FLAGS = ("gradient_checkpointing", "_gradient_checkpointing_func", "training")


def collect(model, processor, layers, items: Sequence[PromptLike], stats: steering.SteeringStats | None,
            groups: Sequence[str], batch_size: int, desc: str, pgd: PGDSettings | None = None, progress: bool = True,
            pooled_layer: int | None = None, pooling: str = "mean", clean_groups: Sequence[str] = (),
            ) -> torch.Tensor | None:
    """Feed the last-prompt-token block outputs of `items` at `layers` into `stats` under each of `groups`;
    with `pooled_layer`, also return the pooled prompt features of that entry of `layers` [N, d] (segments:
    [N, S, d], gating.concat_features) in the order of `models.batches`, grouped by modality and answer cap.

    With `pgd`, image questions are first perturbed (the knowledge-recall inputs), and the activations come from
    PGD's own forwards (pgd_recall): `groups` get those at each item's final image, `clean_groups` those at its
    clean image, and the pooled features are the clean prompts'. Text questions and image questions without
    PGD take one forward that stops after the last of `layers`, and feed both.

    Under torchrun (`distributed.world()` size P > 1) this rank runs every P-th batch; the ranks' statistics
    are summed and their features gathered back into the single-process order, so every rank returns what
    one process would (`distributed.py`). A single process runs every batch and communicates nothing."""
    rank, size = distributed.world()
    every_batch = models.batches(items, batch_size)
    # Under torchrun this call's activations go into fresh statistics first: `stats` already holds earlier calls'
    # all-reduced sums, which reducing `stats` itself would count once per rank.
    into = stats if size == 1 or stats is None else steering.SteeringStats(stats.num_layers, stats.hidden_size,
                                                                            stats.layers, stats.device)
    pooled = []
    for indices in tqdm(distributed.shard(every_batch, rank, size), desc=desc, disable=not progress or rank != 0,
                        unit="batch", leave=False):
        chunk = [items[i] for i in indices]
        if pgd is not None and chunk[0].modality == "image" and pgd.steps > 0:
            recall = pgd_recall(model, processor, chunk, pgd, RecallRead(layers, pooled_layer, pooling))
            acts, clean, features = recall.recall, recall.clean, recall.clean_pooled
        else:
            batch = models.forward_inputs(model, models.encode_prompts(processor, chunk))
            acts, features = attachment.capture(model, layers, pooled_layer, pooling, **batch)
            clean = acts
        for group in groups:
            into.update(group, acts)
        for group in clean_groups:
            into.update(group, clean)
        if features is not None:
            pooled.append(features)
    if size > 1:
        if stats is not None:
            stats.merge_(distributed.all_reduce_stats(into, tuple(dict.fromkeys((*groups, *clean_groups)))))
        return distributed.gather_rows(pooled, every_batch) if pooled_layer is not None else None
    return gating.concat_features(pooled) if pooled else None


def fit_statistics(model, processor, *, forget: Sequence[PromptLike], retain: Sequence[PromptLike] | None = None,
                   erasure: Sequence[PromptLike] | None = None, settings: FitSettings,
                   calibration: Sequence[PromptLike] | None = None, layers_path: str | None = None,
                   progress: bool = True, shared: SharedStatistics | None = None, timings: dict[str, float] | None = None,
                   ) -> tuple[steering.SteeringStats, str, dict[str, torch.Tensor]]:
    """The activations part: the contrast sets through the model into one SteeringStats (recall and erasure
    sums; forget and retain Grams for the paper gate), and, for a prompt gate, the pooled features of the
    forget, retain and calibration prompts at the decision layer. Also returns the decoder-layer path.

    The retain, erasure and calibration part is the same for every request on a model (cache.py): pass it as
    `shared` (then retain, erasure and calibration are not read) or it is computed here. `timings` (a dict)
    gets the seconds of each stage."""
    timings = {} if timings is None else timings
    names, layers = attachment.find_decoder_layers(model, layers_path)
    path = names[0].rsplit(".", 1)[0]
    settings = settings.at_depth(len(layers))
    if shared is not None:
        shared.check(settings, path, steered_layers(settings, len(layers)))
        shared_stats, shared_features = shared.stats, shared.features
    else:
        if not retain or not erasure:
            raise UserInputError(None, "fitting needs non-empty forget, retain and erasure sets "
                                       "(or, for retain and erasure, their shared statistics)")
        started = time.perf_counter()
        shared_stats, shared_features = shared_inputs(model, processor, retain=retain, erasure=erasure,
                                                      calibration=calibration, settings=settings,
                                                      layers_path=layers_path, progress=progress)
        timings["shared (computed)"] = time.perf_counter() - started
    stats, features = request_inputs(model, processor, forget=forget, settings=settings, layers_path=layers_path,
                                     progress=progress, timings=timings)
    stats.merge_(shared_stats)  # the groups are disjoint: each sum is the one a single pass would give, bit for bit
    features.update(shared_features)
    return stats, path, features


def _decoder(model, settings: FitSettings, layers_path: str | None
             ) -> tuple[list, steering.SteeringStats, FitSettings]:
    """The decoder layers, empty statistics of the steered ones (the closed forms of one layer read that
    layer's statistics alone) on the statistics device, and `settings` resolved at the decoder's depth."""
    _, layers = attachment.find_decoder_layers(model, layers_path)
    settings = settings.at_depth(len(layers))
    stats = steering.SteeringStats(len(layers), model.config.get_text_config().hidden_size,
                                   steered_layers(settings, len(layers)), statistics_device(model))
    return layers, stats, settings


def _pooled(model, processor, layers, items: Sequence[PromptLike], settings: FitSettings, desc: str,
            progress: bool) -> torch.Tensor:
    """Pooled prompt features of `items` at the decision layer; the forwards stop there."""
    upto = layers[: settings.decision_layer + 1]
    return collect(model, processor, upto, items, None, (), settings.batch_size, desc, None, progress,
                   settings.decision_layer, settings.pooling)


def _pool_occluded(model, processor, layers, items: Sequence[PromptLike], group: str, settings: FitSettings,
                   features: dict[str, torch.Tensor], progress: bool) -> bool:
    """features[group + "_occluded"]: the pooled features of `items`' photos with each edge covered
    (FitSettings.occlusion; the forwards stop at the decision layer). False where there are none to add."""
    covered = occluded_copies(items, settings.occlusion)
    if covered:
        features[f"{group}_occluded"] = _pooled(model, processor, layers, covered, settings, f"{group} (occluded)",
                                                progress)
    return bool(covered)


def _with_occluded(features: dict[str, torch.Tensor], group: str) -> torch.Tensor:
    """A gate bank: the clean prompts' features of `group`, then their occluded copies' where there are some."""
    copies = features.get(f"{group}_occluded")
    return features[group] if copies is None else gating.concat_features([features[group], copies])


def shared_inputs(model, processor, *, retain: Sequence[PromptLike], erasure: Sequence[PromptLike],
                  calibration: Sequence[PromptLike] | None, settings: FitSettings, layers_path: str | None = None,
                  progress: bool = True) -> tuple[steering.SteeringStats, dict[str, torch.Tensor]]:
    """What every request on the model shares (cache.py): retain statistics (paper: Grams at the steered layers)
    or pooled features (prompt gates), erasure sums, calibration features."""
    layers, stats, settings = _decoder(model, settings, layers_path)
    held = [layers[i] for i in stats.layers]
    bs = settings.batch_size
    features: dict[str, torch.Tensor] = {}
    if settings.gate == "paper":
        collect(model, processor, held, retain, stats, ("retain",), bs, "retain", None, progress)
    else:
        features["retain"] = _pooled(model, processor, layers, retain, settings, "retain", progress)
        _pool_occluded(model, processor, layers, retain, "retain", settings, features, progress)
        if calibration:
            features["calibration"] = _pooled(model, processor, layers, calibration, settings, "calibration", progress)
    collect(model, processor, held, erasure, stats, ("erasure",), bs, "erasure", None, progress)
    return stats, features


def request_inputs(model, processor, *, forget: Sequence[PromptLike], settings: FitSettings,
                   layers_path: str | None = None, progress: bool = True, timings: dict[str, float] | None = None,
                   ) -> tuple[steering.SteeringStats, dict[str, torch.Tensor]]:
    """What one deletion request adds: its forget questions' recall statistics (PGD images), and the forget
    Grams (paper gate) or pooled features (prompt gates)."""
    timings = {} if timings is None else timings
    layers, stats, settings = _decoder(model, settings, layers_path)
    held = [layers[i] for i in stats.layers]
    bs = settings.batch_size
    started = time.perf_counter()
    features: dict[str, torch.Tensor] = {}
    if settings.gate != "paper" and settings.decision_layer not in stats.layers:
        # The decision layer is not steered (--layers leaves it out): the gate's features take their own forwards.
        collect(model, processor, held, forget, stats, ("recall",), bs, "recall (PGD)", settings.pgd, progress)
        timings["recall (PGD)"] = time.perf_counter() - started
        started = time.perf_counter()
        features["forget"] = _pooled(model, processor, layers, forget, settings, "forget", progress)
        timings["forget"] = time.perf_counter() - started
    else:
        # One pass over the forget set: PGD's own forwards give the recall statistics and the clean prompts' gate
        # features (prompt gates: pooled at the decision layer; paper: the forget Gram, of clean and PGD inputs).
        pooled = None if settings.gate == "paper" else stats.layers.index(settings.decision_layer)
        groups, clean_groups = (("recall", "forget"), ("forget",)) if settings.gate == "paper" else (("recall",), ())
        forget_features = collect(model, processor, held, forget, stats, groups, bs, "forget (PGD recall)",
                                  settings.pgd, progress, pooled, settings.pooling, clean_groups)
        if forget_features is not None:
            features["forget"] = forget_features
        timings["forget (PGD recall, gate features)"] = time.perf_counter() - started
    started = time.perf_counter()
    if settings.gate != "paper" and _pool_occluded(model, processor, layers, forget, "forget", settings, features,
                                                   progress):
        timings["forget (occluded copies)"] = time.perf_counter() - started
    return stats, features


def steered_layers(settings: FitSettings, num_layers: int) -> list[int]:
    """The decoder layers a fit steers, in the order given: settings.layers, or the decision layer..L-1 for a
    prompt gate, or the paper's 1..L-1."""
    first = gating.decision_layer_index(settings.decision_layer, num_layers) if settings.gate != "paper" else 1
    steered = list(settings.layers) if settings.layers is not None else list(range(first, num_layers))
    if not steered or any(not first <= i < num_layers for i in steered) or len(set(steered)) != len(steered):
        raise UserInputError(None, f"--layers must name distinct decoder layers {first}..{num_layers - 1}, "
                                   f"got {steered}")
    return steered


def statistics_device(model) -> torch.device:
    """Where a fit's statistics accumulate and its gates are solved: the model's GPU if it is on one (float64
    there is orders of magnitude faster than on the host CPU, and the paper gate's Grams then take no host
    memory), else the CPU."""
    device = next(model.parameters()).device
    return device if device.type == "cuda" else torch.device("cpu")


def fit_prompt_gate(features: dict[str, torch.Tensor], settings: FitSettings) -> tuple[gating.PromptGate, dict]:
    """The prompt gate from pooled features, its threshold calibrated (see gating.calibrate), and a record of
    the calibration for the eraser's metadata."""
    forget, retain = features["forget"], features["retain"]
    forget_bank, retain_bank = _with_occluded(features, "forget"), _with_occluded(features, "retain")
    if settings.gate == "knn":
        gate = gating.fit_knn(forget_bank, retain_bank, settings.pooling, settings.decision_layer, settings.neighbours)
    else:
        gate = gating.fit_ridge(forget_bank, retain_bank, settings.pooling, settings.decision_layer, settings.beta,
                                settings.lam)
    if "calibration" in features:
        scores, source = gate.scores(features["calibration"])[:, 0], "held-out calibration prompts"
    elif settings.gate == "knn":
        # Left out of a bank without the occluded retain copies: a left-out prompt's own copies would stand in
        # for it. Fewer retain rows only raise a score, so the threshold errs high (fewer false positives).
        clean = gating.fit_knn(forget_bank, retain, settings.pooling, settings.decision_layer, settings.neighbours)
        scores = gating.leave_one_out_retain_scores(clean, gating.segment_rows(retain)[1])
        source = "retain prompts, each left out of the bank"
    else:
        scores, source = gate.scores(retain)[:, 0], "retain prompts (in-sample)"
    tau, fpr = gating.calibrate(scores, settings.max_fpr)
    floor = math.log(settings.min_ratio) if settings.gate == "knn" else -math.inf
    if floor > tau:
        tau, fpr = floor, float((scores > floor).double().mean())
    record = {"threshold": tau, "threshold_floor": floor if math.isfinite(floor) else None,
              "max_fpr": settings.max_fpr, "calibration_fpr": fpr,
              "calibration_prompts": int(scores.numel()), "calibration_source": source,
              "forget_fire_rate": float((gate.scores(forget)[:, 0] > tau).double().mean())}
    return replace(gate, threshold=[tau], _device_cache={}), record


def solve_eraser(stats: steering.SteeringStats, settings: FitSettings, layers_path: str, fingerprint: dict,
                 request: str = "forget", features: dict[str, torch.Tensor] | None = None) -> Eraser:
    """The closed-form part: gates and directions for the steered layers, packed as an Eraser."""
    settings = settings.at_depth(stats.num_layers)  # the record names the layer the gate reads, as before fractions
    steered = steered_layers(settings, stats.num_layers)
    fit_record = {k: v for k, v in asdict(settings).items() if k not in ("floor", "cap", "alpha")}
    request_meta = {"name": request, "counts": dict(stats.counts), "fit": fit_record}
    common = dict(r=stats.direction(steered).float(), alpha=settings.alpha, layer_indices=steered,
                  layers_path=layers_path, hidden_size=stats.hidden_size, mode=settings.mode)
    if settings.gate != "paper":
        gate, record = fit_prompt_gate(features, settings)
        # Sorted: a cache entry gives its features back in another order than a cold fit computes them.
        request_meta["counts"].update({group: int(features[group].shape[0]) for group in sorted(features)})
        request_meta["gate"] = record
        return Eraser(u=None, prompt_gate=gate, metadata={"fingerprint": fingerprint, "requests": [request_meta]},
                      **common)
    gates = steering.solve_gates(stats, "paper", steered, ratio=settings.ratio, gamma=settings.gamma)
    if settings.normalise_gate:
        # Rescaling so the forget mean is exactly 1 gives alpha, floor and cap one meaning across settings.
        sums = stats.sums["forget"][stats.rows(steered)]
        forget_means = torch.stack([sums[i] @ gates[i] for i in range(len(steered))]) / stats.counts["forget"]
        gates = gates / forget_means[:, None]
    return Eraser(u=gates.float(), floor=settings.floor, cap=settings.cap,
                  metadata={"fingerprint": fingerprint, "requests": [request_meta]}, **common)


def gate_scores(model, processor, eraser: Eraser, items: Sequence[PromptLike], batch_size: int = 64) -> torch.Tensor:
    """What the eraser's gate reads for each of `items`, [N, K] in item order, with nothing attached: a prompt
    gate's scores s_k (it fires where s_k > threshold_k), or a per-layer gate's value h_last . u_k at its first
    steered layer. Forwards stop at the layer the gate reads."""
    names, layers = attachment.find_decoder_layers(model, eraser.layers_path)
    gate = eraser.prompt_gate
    read = gate.layer if gate is not None else eraser.layer_indices[0]
    out = torch.empty(len(items), eraser.num_terms)
    for indices in models.batches(items, batch_size):
        batch = models.forward_inputs(model, models.encode_prompts(processor, [items[i] for i in indices]))
        last, pooled = attachment.capture(model, layers[: read + 1], read, gate.pooling if gate else "last", **batch)
        out[indices] = (gate.scores(pooled) if gate is not None else last[:, read] @ eraser.u[:, 0].T).cpu()
    return out
