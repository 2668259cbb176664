"""The prompt gate of a fit: a knn or ridge scorer over the pooled prompt features of the forget prompts (fire)
and the retained ones (stay off), its threshold calibrated (gating.calibrate) on held-out calibration prompts,
people outside the fit, so that at most `max_fpr` of them pass; knn: never below log(min_ratio), the ratio
test's floor. Without calibration prompts, the retain prompts stand in (knn: each left out of the bank in turn).
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch

from . import gating
from .settings import FitSettings, KnnGate


def _with_occluded(features: dict[str, torch.Tensor], group: str) -> torch.Tensor:
    """A gate bank: the clean prompts' features of `group`, then their occluded copies' where there are some."""
    copies = features.get(f"{group}_occluded")
    return features[group] if copies is None else gating.concat_features([features[group], copies])


def fit_prompt_gate(features: dict[str, torch.Tensor], settings: FitSettings) -> tuple[gating.PromptGate, dict]:
    """The prompt gate (settings.gate: a KnnGate or a RidgeGate) from pooled features, its threshold calibrated
    (see gating.calibrate), and a record of the calibration for the eraser's metadata."""
    forget, retain = features["forget"], features["retain"]
    forget_bank, retain_bank = _with_occluded(features, "forget"), _with_occluded(features, "retain")
    chosen, pooling, layer = settings.gate, settings.pooling, settings.decision_layer
    knn = isinstance(chosen, KnnGate)
    if knn:
        # Embedding windows repeat across prompts of one template (the same tokens): one copy each is enough.
        gate = gating.fit_knn(forget_bank, retain_bank, pooling, layer, chosen.neighbours,
                              distinct=gating.reads_embeddings(pooling))
    else:
        gate = gating.fit_ridge(forget_bank, retain_bank, pooling, layer, chosen.beta, chosen.lam)
    if "calibration" in features:
        scores, source = gate.scores(features["calibration"])[:, 0], "held-out calibration prompts"
    elif knn:
        # Left out of a bank without the occluded retain copies: a left-out prompt's own copies would stand in
        # for it. Fewer retain rows only raise a score, so the threshold errs high (fewer false positives).
        clean = gating.fit_knn(forget_bank, retain, pooling, layer, chosen.neighbours)
        scores = gating.leave_one_out_retain_scores(clean, gating.segment_rows(retain)[1])
        source = "retain prompts, each left out of the bank"
    else:
        scores, source = gate.scores(retain)[:, 0], "retain prompts (in-sample)"
    tau, fpr = gating.calibrate(scores, chosen.max_fpr)
    floor = math.log(chosen.min_ratio) if knn else -math.inf
    if floor > tau:
        tau, fpr = floor, float((scores > floor).double().mean())
    record = {"threshold": tau, "threshold_floor": floor if math.isfinite(floor) else None,
              "max_fpr": chosen.max_fpr, "calibration_fpr": fpr,
              "calibration_prompts": int(scores.numel()), "calibration_source": source,
              "forget_fire_rate": float((gate.scores(forget)[:, 0] > tau).double().mean())}
    return replace(gate, threshold=[tau], _device_cache={}), record
