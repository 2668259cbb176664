"""The closed forms of a fit: gates and directions for the steered layers from its statistics (steering.py) and,
for a prompt gate, its pooled features (calibration.py), packed as an Eraser with the record of the fit.
"""

from __future__ import annotations

import torch

from . import steering
from .calibration import fit_prompt_gate
from .eraser import Eraser
from .settings import FitSettings, PaperGate, steered_layers


def solve_eraser(stats: steering.SteeringStats, settings: FitSettings, layers_path: str, fingerprint: dict,
                 request: str = "forget", features: dict[str, torch.Tensor] | None = None) -> Eraser:
    """The closed-form part: gates and directions for the steered layers, packed as an Eraser."""
    settings = settings.at_depth(stats.num_layers)  # the record names the layer the gate reads, as before fractions
    steered = steered_layers(settings, stats.num_layers)
    request_meta = {"name": request, "counts": dict(stats.counts), "fit": fit_record(settings)}
    common = dict(r=stats.direction(steered).float(), alpha=settings.alpha, layer_indices=steered,
                  layers_path=layers_path, hidden_size=stats.hidden_size, mode=settings.mode)
    gate = settings.gate
    if not isinstance(gate, PaperGate):
        prompt_gate, record = fit_prompt_gate(features, settings)
        # Sorted: a cache entry gives its features back in another order than a cold fit computes them.
        request_meta["counts"].update({group: int(features[group].shape[0]) for group in sorted(features)})
        request_meta["gate"] = record
        return Eraser(u=None, prompt_gate=prompt_gate,
                      metadata={"fingerprint": fingerprint, "requests": [request_meta]}, **common)
    gates = steering.solve_gates(stats, "paper", steered, ratio=gate.ratio, gamma=gate.gamma)
    if gate.normalise_gate:
        # Rescaling so the forget mean is exactly 1 gives alpha, floor and cap one meaning across settings.
        sums = stats.sums["forget"][stats.rows(steered)]
        forget_means = torch.stack([sums[i] @ gates[i] for i in range(len(steered))]) / stats.counts["forget"]
        gates = gates / forget_means[:, None]
    return Eraser(u=gates.float(), floor=gate.floor, cap=gate.cap,
                  metadata={"fingerprint": fingerprint, "requests": [request_meta]}, **common)


def fit_record(settings: FitSettings) -> dict:
    """The settings a request's eraser records (FitSettings.record), less what its header holds per term: the
    strength alpha, and the paper gate's floor and cap."""
    record = settings.record()
    del record["alpha"]
    for bound in ("floor", "cap"):
        record["gate"].pop(bound, None)
    return record
