"""A fit's activations: contrast sets -> activations -> sufficient statistics / pooled features.

1. Knowledge-recall inputs: the forget questions, their images perturbed by PGD (the model's own gradient,
   L-inf budget, pixels kept in range, eval mode, no parameter touched; in micro-batches of
   `PGDSettings.batch_size` under activation checkpointing) so the model recalls the fact as strongly as it can;
   an item already recalled at mean answer NLL <= stop_nll keeps its image. Knowledge-erasure inputs: questions
   the model refuses (on the testbed, questions about strangers) or any user-supplied set. Their
   last-prompt-token block outputs give the direction r_l = mean(erasure) - mean(recall)
   (`steering.SteeringStats.direction`). A request's pass over its forget set is one pass (`pgd_recall`): PGD's
   own teacher-forced forwards give the answer NLL and, read at the prompt's positions, the activations (pgd.py).
2. The gate. Default, a prompt gate (`gating.py`): the pooled prompt feature at the decision layer of the
   clean forget questions (fire) and of the retained questions (stay off) make a knn (or ridge) scorer; its
   threshold is calibrated on held-out calibration prompts, people outside the fit (on a benchmark: its
   validation hold-out), so that at most `max_fpr` of them pass. Those forwards stop at the decision layer.
   PaperGate: the paper's per-layer null-space gate on the last token (`steering.solve_gate_paper`),
   from the Grams of the steered layers' last-token outputs of forget (clean and PGD) and retain questions.
The equations are in steering.py and gating.py; this module gathers their inputs (PGD's pass: pgd.py), the
gate is made in calibration.py and the closed forms in solve.py. What runs it all is `eraser_fitter.EraserFitter`
(the shared part through the model cache, cache.py, which calls `shared_inputs` here; this module reads a cache
entry, never the cache itself).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Sequence

import torch
from tqdm import tqdm

from ..errors import UserInputError
from . import gating, models, steering
from . import distributed  # torchrun: sharded batches, all-reduced statistics
from .capture import capture
from .decoder_layers import find_decoder_layers
from .inputs import PromptLike, occluded_copies
from .pgd import RecallRead, pgd_recall
from .settings import FitSettings, PaperGate, PGDSettings, steered_layers

if TYPE_CHECKING:
    from .cache import SharedStatistics


def collect(model, processor, layers, items: Sequence[PromptLike], stats: steering.SteeringStats | None,
            groups: Sequence[str], batch_size: int, desc: str, pgd: PGDSettings | None = None, progress: bool = True,
            pooled_layer: int | None = None, pooling: str = "mean", clean_groups: Sequence[str] = (),
            first_layer: torch.nn.Module | None = None) -> torch.Tensor | None:
    """Feed the last-prompt-token block outputs of `items` at `layers` into `stats` under each of `groups`;
    with `pooled_layer`, also return the pooled prompt features of that entry of `layers` [N, d] (segments:
    [N, S, d], gating.concat_features) in the order of `models.batches`, grouped by modality and answer cap.

    With `pgd`, image questions are first perturbed (the knowledge-recall inputs), and the activations come from
    PGD's own forwards (pgd_recall): `groups` get those at each item's final image, `clean_groups` those at its
    clean image, and the pooled features are the clean prompts'. A pooling of the decoder's input embeddings
    reads the input of `first_layer`, the decoder's first layer (capture.reading_prompt). Text questions and image questions without
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
            recall = pgd_recall(model, processor, chunk, pgd, RecallRead(layers, pooled_layer, pooling, first_layer))
            acts, clean, features = recall.recall, recall.clean, recall.clean_pooled
        else:
            batch = models.forward_inputs(model, models.encode_prompts(processor, chunk))
            acts, features = capture(model, layers, pooled_layer, pooling, first_layer, **batch)
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
    names, layers = find_decoder_layers(model, layers_path)
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
    _, layers = find_decoder_layers(model, layers_path)
    settings = settings.at_depth(len(layers))
    stats = steering.SteeringStats(len(layers), model.config.get_text_config().hidden_size,
                                   steered_layers(settings, len(layers)), statistics_device(model))
    return layers, stats, settings


def _pooled(model, processor, layers, items: Sequence[PromptLike], settings: FitSettings, desc: str,
            progress: bool) -> torch.Tensor:
    """Pooled prompt features of `items` at the decision layer; the forwards stop there (at the first layer for
    a pooling of the decoder's input embeddings: nothing later is read)."""
    read = 0 if gating.reads_embeddings(settings.pooling) else settings.decision_layer
    return collect(model, processor, layers[: read + 1], items, None, (), settings.batch_size, desc, None, progress,
                   read, settings.pooling, first_layer=layers[0])


def _pool_occluded(model, processor, layers, items: Sequence[PromptLike], group: str, settings: FitSettings,
                   features: dict[str, torch.Tensor], progress: bool) -> bool:
    """features[group + "_occluded"]: the pooled features of `items`' photos with each edge covered
    (FitSettings.occlusion; the forwards stop at the decision layer). False where there are none to add."""
    covered = occluded_copies(items, settings.occlusion)
    if covered:
        features[f"{group}_occluded"] = _pooled(model, processor, layers, covered, settings, f"{group} (occluded)",
                                                progress)
    return bool(covered)


def shared_inputs(model, processor, *, retain: Sequence[PromptLike], erasure: Sequence[PromptLike],
                  calibration: Sequence[PromptLike] | None, settings: FitSettings, layers_path: str | None = None,
                  progress: bool = True) -> tuple[steering.SteeringStats, dict[str, torch.Tensor]]:
    """What every request on the model shares (cache.py): retain statistics (paper: Grams at the steered layers)
    or pooled features (prompt gates), erasure sums, calibration features."""
    layers, stats, settings = _decoder(model, settings, layers_path)
    held = [layers[i] for i in stats.layers]
    bs = settings.batch_size
    features: dict[str, torch.Tensor] = {}
    if isinstance(settings.gate, PaperGate):
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
    paper = isinstance(settings.gate, PaperGate)
    if not paper and settings.decision_layer not in stats.layers:
        # The decision layer is not steered (--layers leaves it out): the gate's features take their own forwards.
        collect(model, processor, held, forget, stats, ("recall",), bs, "recall (PGD)", settings.pgd, progress)
        timings["recall (PGD)"] = time.perf_counter() - started
        started = time.perf_counter()
        features["forget"] = _pooled(model, processor, layers, forget, settings, "forget", progress)
        timings["forget"] = time.perf_counter() - started
    else:
        # One pass over the forget set: PGD's own forwards give the recall statistics and the clean prompts' gate
        # features (prompt gates: pooled at the decision layer; paper: the forget Gram, of clean and PGD inputs).
        pooled = None if paper else stats.layers.index(settings.decision_layer)
        groups, clean_groups = (("recall", "forget"), ("forget",)) if paper else (("recall",), ())
        forget_features = collect(model, processor, held, forget, stats, groups, bs, "forget (PGD recall)",
                                  settings.pgd, progress, pooled, settings.pooling, clean_groups, layers[0])
        if forget_features is not None:
            features["forget"] = forget_features
        timings["forget (PGD recall, gate features)"] = time.perf_counter() - started
    started = time.perf_counter()
    if not paper and _pool_occluded(model, processor, layers, forget, "forget", settings, features, progress):
        timings["forget (occluded copies)"] = time.perf_counter() - started
    return stats, features


def statistics_device(model) -> torch.device:
    """Where a fit's statistics accumulate and its gates are solved: the model's GPU if it is on one (float64
    there is orders of magnitude faster than on the host CPU, and the paper gate's Grams then take no host
    memory), else the CPU."""
    device = next(model.parameters()).device
    return device if device.type == "cuda" else torch.device("cpu")
