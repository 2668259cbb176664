"""The closed forms of a fit: gates and directions for the steered layers from its statistics (steering.py) and,
for a prompt gate, its pooled features (calibration.py), packed as an Eraser with the record of the fit.
"""

from __future__ import annotations

from dataclasses import asdict

import torch

from . import steering
from .calibration import fit_prompt_gate
from .eraser import Eraser
from .settings import FitSettings, steered_layers


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
