"""The eraser: a frozen set of steering terms, fitted by `eraser_fitter.EraserFitter` (this module knows nothing of
fitting), with its model fingerprint and its safetensors artifact (`save`, `load`), attached to a model by `attach`.
Erasers compose one way: `Eraser.concat([...])` stacks their terms.

An Eraser holds K deletion requests (terms) over L steered layers: directions r [K, L, d] float32 and one of
two gates. Block `layer_indices[l]` of the decoder list at `layers_path` gets

    per-layer gate (the paper's; u [K, L, d], never a d x d matrix):
        h <- h + sum_k alpha_k * shape_gate(h_last . u[k, l]; floor_k, cap_k) * r[k, l]
    prompt gate (gating.PromptGate, decided once per prompt at decoder layer `prompt_gate.layer`):
        h <- h + sum_k alpha_k * g_k * r[k, l],   g_k = [s_k(pooled prompt) > tau_k]

Artifact: one .safetensors file with tensors "r", and "u" or the prompt gate's "gate.*" tensors, and, under
the `__metadata__` key "mllmeraser", one JSON string: format_version, layers_path, layer_indices, hidden_size,
num_terms, dtype, mode, alpha, gate_floor, gate_cap (null = unbounded), gate (the prompt gate's kind, pooling,
layer, thresholds and neighbours, or null) and metadata (fingerprint, per-request fit settings, counts and the
gate's calibration). Format 1 files (per-layer gates only) and format 2 files (prompt gates whose retain rows
each belong to one term) load unchanged; format 3 adds retain rows shared by every term (owner -1, see
gating.PromptGate), which a format-2 reader would refuse; format 4 records each request's fit settings nested
per gate (settings.FitSettings.record), and an older file's flat records are read into that form on load. `load`
reads through artifact.read_eraser_file, the one validator of these files (header first, then tensors: types,
names, finiteness).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from torch import Tensor, nn

from ..errors import UserInputError, atomic_write_bytes
from .artifact import FORMAT_VERSION, METADATA_KEY, read_eraser_file
from .compat import check_compatible, fingerprint_mismatch
from .gating import PromptGate
from .attachment import STEERING_MODES, SteeringHandle
from .layer_steering import attach_steering
from .prompt_steering import attach_prompt_steering


def _per_term(values: float | Sequence[float] | Tensor, num_terms: int, name: str) -> tuple[float, ...]:
    """A scalar broadcast to K terms, or exactly K values, as a tuple of floats."""
    if isinstance(values, Tensor):
        values = values.tolist()
    if isinstance(values, (int, float)):
        return (float(values),) * num_terms
    values = tuple(float(v) for v in values)
    if len(values) != num_terms:
        raise ValueError(f"{name} has {len(values)} values, expected one per term ({num_terms})")
    return values


@dataclass(frozen=True, eq=False)
class Eraser:
    """K deletion requests as steering terms over L decoder layers (see the module docstring).

    u, r: [K, L, d] (a [L, d] tensor is read as K = 1), stored float32 on CPU; u is None where a prompt_gate
    decides instead (then every steered layer is at or after prompt_gate.layer). alpha, floor, cap: one float
    per term (a scalar broadcasts); floor = -inf and cap = +inf is the paper's unbounded linear gate (floor and
    cap shape per-layer gates only).
    metadata: JSON-serialisable; conventionally "fingerprint" (model_fingerprint of the fitted model, checked
    on attach) and "requests" (one dict per term: name, fit settings, counts). Other top-level keys describe
    every term of this eraser.
    """

    u: Tensor | None
    r: Tensor
    alpha: float | Sequence[float]  # normalised to tuple[float, ...] of length K
    layer_indices: Sequence[int]  # normalised to tuple[int, ...] of length L
    layers_path: str
    hidden_size: int
    mode: str = "prefill"
    floor: float | Sequence[float] = -math.inf  # normalised like alpha
    cap: float | Sequence[float] = math.inf  # normalised like alpha
    metadata: dict[str, Any] = field(default_factory=dict)
    prompt_gate: PromptGate | None = None

    def __post_init__(self) -> None:
        if (self.u is None) == (self.prompt_gate is None):
            raise ValueError("an eraser needs exactly one gate: per-layer vectors u, or a prompt_gate")
        r = self.r.detach().to(device="cpu", dtype=torch.float32)
        u = None if self.u is None else self.u.detach().to(device="cpu", dtype=torch.float32)
        if r.ndim == 2:
            r, u = r[None], (u[None] if u is not None and u.ndim == 2 else u)
        num_terms = r.shape[0]
        indices = [int(i) for i in self.layer_indices]
        if not indices or min(indices) < 0 or len(set(indices)) != len(indices):
            raise ValueError(f"layer_indices must be distinct non-negative layer numbers, got {indices}")
        expected = (num_terms, len(indices), self.hidden_size)
        if tuple(r.shape) != expected or (u is not None and tuple(u.shape) != expected):
            shapes = [list(t.shape) for t in (u, r) if t is not None]
            raise ValueError(f"u and r must be [K, L, d] = {list(expected)}, got {shapes}")
        if num_terms < 1:
            raise ValueError("an eraser needs at least one term")
        gate = self.prompt_gate
        if gate is not None:
            if gate.num_terms != num_terms or gate.hidden_size != self.hidden_size:
                raise ValueError(f"prompt gate has {gate.num_terms} terms of width {gate.hidden_size}, "
                                 f"directions {num_terms} of width {self.hidden_size}")
            if min(indices) < gate.layer:
                raise ValueError(f"a prompt gate decides at layer {gate.layer}: it cannot steer layer {min(indices)}")
        if self.mode not in STEERING_MODES:
            raise ValueError(f"mode must be one of {STEERING_MODES}, got {self.mode!r}")
        requests = self.metadata.get("requests")
        if requests is not None and len(requests) != num_terms:
            raise ValueError(f"metadata['requests'] has {len(requests)} entries, expected {num_terms}")
        metadata = json.loads(json.dumps(self.metadata, allow_nan=False))  # a JSON-pure private copy; raises if not
        object.__setattr__(self, "u", None if u is None else u.contiguous())
        object.__setattr__(self, "r", r.contiguous())
        object.__setattr__(self, "layer_indices", tuple(indices))
        object.__setattr__(self, "hidden_size", int(self.hidden_size))
        object.__setattr__(self, "metadata", metadata)
        for name in ("alpha", "floor", "cap"):
            object.__setattr__(self, name, _per_term(getattr(self, name), num_terms, name))
        # A NaN or infinite strength reaches every row of a shared batch (0 * NaN is NaN); a NaN bound makes the
        # gate undefined. Infinite bounds are the unbounded gate.
        if not all(math.isfinite(a) for a in self.alpha):
            raise ValueError(f"alpha must be finite, got {self.alpha}")
        if any(math.isnan(x) for x in self.floor + self.cap):
            raise ValueError(f"floor and cap must not be NaN, got {self.floor} and {self.cap}")

    @property
    def num_terms(self) -> int:
        return self.r.shape[0]

    @property
    def fingerprint(self) -> dict[str, Any] | None:
        return self.metadata.get("fingerprint")

    def requests(self) -> list[dict[str, Any]]:
        """Per-term metadata, each with this eraser's shared top-level keys (fingerprint aside) folded in."""
        shared = {k: v for k, v in self.metadata.items() if k not in ("fingerprint", "requests")}
        per_term = self.metadata.get("requests") or [{} for _ in range(self.num_terms)]
        return [{**shared, **request} for request in per_term]

    # ---- applying -------------------------------------------------------------------------------

    def attach(self, model: nn.Module, check_fingerprint: bool = True) -> SteeringHandle:
        """Hook the model's decoder layers; returns the handle, which detaches with `handle.remove()` or as a
        context manager (`with eraser.attach(model): ...` detaches on leaving the block).

        Validates hidden size, layer count and (unless check_fingerprint=False) the model fingerprint
        (compat.check_compatible); a mismatch is a UserInputError saying what differs.
        """
        fingerprint = self.fingerprint if check_fingerprint else None
        layers = check_compatible(model, hidden_size=self.hidden_size, layer_indices=self.layer_indices,
                                  layers_path=self.layers_path, fingerprint=fingerprint)
        steered = [layers[i] for i in self.layer_indices]
        if self.prompt_gate is not None:
            return attach_prompt_steering(model, layers[self.prompt_gate.layer], steered, self.prompt_gate, self.r,
                                          self.alpha, self.mode, first_layer=layers[0])
        return attach_steering(model, steered, self.u, self.r, self.alpha, self.floor, self.cap, self.mode)

    # ---- composing ------------------------------------------------------------------------------

    def with_alpha(self, alpha: float | Sequence[float]) -> Eraser:
        """The same eraser with new strengths (a scalar applies to every term)."""
        return dataclasses.replace(self, alpha=_per_term(alpha, self.num_terms, "alpha"))

    @classmethod
    def concat(cls, erasers: Sequence[Eraser]) -> Eraser:
        """Every eraser's terms stacked in order (the one way erasers compose: two deletion requests without
        refitting), with one concatenation per tensor (a pairwise reduce would copy the growing stack at every
        step: quadratic in the number of erasers). The erasers must have the same layers, width and mode,
        fingerprints agreeing on their shared keys (the earlier eraser's value kept for a key only one holds) and
        one kind of gate; prompt gates concatenate with one copy of a shared retain bank (gating.PromptGate.concat).
        One eraser is returned as it is. Associative: concat([concat([a, b]), c]) == concat([a, b, c])."""
        erasers = list(erasers)
        if not erasers:
            raise ValueError("concat needs at least one eraser")
        first = erasers[0]
        fingerprint: dict[str, Any] = {}  # the earlier eraser's value wins, as in concat([concat([a, b]), c])
        for index, other in enumerate(erasers):
            for name in ("layers_path", "layer_indices", "hidden_size", "mode"):
                if getattr(first, name) != getattr(other, name):
                    mine, theirs = getattr(first, name), getattr(other, name)
                    raise ValueError(f"cannot combine erasers with different {name}: {mine!r} vs {theirs!r}")
            if index and fingerprint and other.fingerprint is not None:
                key = fingerprint_mismatch(fingerprint, other.fingerprint)
                if key is not None:
                    raise ValueError(f"cannot combine erasers fitted on different models (their {key} differs)")
            if (first.prompt_gate is None) != (other.prompt_gate is None):
                raise ValueError("cannot combine an eraser with a per-layer gate and one with a prompt gate")
            # Both fingerprints agree on their shared keys; keep every key (an artifact from before a key existed
            # lacks it)
            fingerprint = {**(other.fingerprint or {}), **fingerprint}
        if len(erasers) == 1:
            return first
        metadata: dict[str, Any] = {"requests": [request for e in erasers for request in e.requests()]}
        if fingerprint:
            metadata["fingerprint"] = fingerprint
        return dataclasses.replace(
            first,
            u=None if first.u is None else torch.cat([e.u for e in erasers]),
            r=torch.cat([e.r for e in erasers]),
            prompt_gate=None if first.prompt_gate is None else PromptGate.concat([e.prompt_gate for e in erasers]),
            alpha=tuple(a for e in erasers for a in e.alpha),
            floor=tuple(f for e in erasers for f in e.floor),
            cap=tuple(c for e in erasers for c in e.cap),
            metadata=metadata,
        )

    def drop(self, k: int) -> Eraser:
        """The eraser without term k (a deletion request withdrawn); the others are unchanged."""
        if not -self.num_terms <= k < self.num_terms:
            raise IndexError(f"term {k} out of range for {self.num_terms} terms")
        if self.num_terms == 1:
            raise ValueError("cannot drop the only term of an eraser")
        k %= self.num_terms
        keep = [i for i in range(self.num_terms) if i != k]
        requests = self.requests()
        metadata = {"requests": [requests[i] for i in keep]}
        if self.fingerprint is not None:
            metadata["fingerprint"] = self.fingerprint
        return dataclasses.replace(
            self,
            u=None if self.u is None else self.u[keep],
            r=self.r[keep],
            prompt_gate=None if self.prompt_gate is None else self.prompt_gate.select(keep),
            alpha=tuple(self.alpha[i] for i in keep),
            floor=tuple(self.floor[i] for i in keep),
            cap=tuple(self.cap[i] for i in keep),
            metadata=metadata,
        )

    # ---- artifact -------------------------------------------------------------------------------

    def header(self) -> dict[str, Any]:
        """The JSON stored under __metadata__["mllmeraser"] (infinite gate bounds as null)."""
        if self.prompt_gate is not None and not all(math.isfinite(t) for t in self.prompt_gate.threshold):
            raise ValueError(f"prompt gate thresholds must be finite (calibrate first), got {self.prompt_gate.threshold}")
        return {
            "format_version": FORMAT_VERSION,
            "layers_path": self.layers_path,
            "layer_indices": list(self.layer_indices),
            "hidden_size": self.hidden_size,
            "num_terms": self.num_terms,
            "dtype": "float32",
            "mode": self.mode,
            "alpha": list(self.alpha),
            "gate_floor": [None if math.isinf(x) else x for x in self.floor],
            "gate_cap": [None if math.isinf(x) else x for x in self.cap],
            "gate": None if self.prompt_gate is None else self.prompt_gate.header(),
            "metadata": self.metadata,
        }

    def save(self, path: str | os.PathLike) -> Path:
        """Write the artifact atomically: a reader sees the old file or the whole new one."""
        header = json.dumps(self.header(), allow_nan=False)
        tensors = {"r": self.r, **({"u": self.u} if self.u is not None else self.prompt_gate.tensors())}
        data = safetensors.torch.save(tensors, metadata={METADATA_KEY: header})
        return atomic_write_bytes(path, data)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Eraser:
        """Read and validate an artifact (artifact.read_eraser_file: the header, then the tensors); any problem is
        a one-line UserInputError naming the file and the field."""
        path = Path(path)
        header, tensors = read_eraser_file(path)
        gate_header = header.get("gate")
        try:  # the constructors' cross-field checks (distinct layers, gate layer, owners) are the last line
            return cls(
                u=None if gate_header else tensors["u"],
                prompt_gate=PromptGate.from_parts(gate_header, tensors) if gate_header else None,
                r=tensors["r"],
                alpha=header["alpha"],
                layer_indices=header["layer_indices"],
                layers_path=header["layers_path"],
                hidden_size=header["hidden_size"],
                mode=header["mode"],
                floor=[-math.inf if x is None else x for x in header["gate_floor"]],
                cap=[math.inf if x is None else x for x in header["gate_cap"]],
                metadata=header["metadata"],
            )
        except (TypeError, ValueError) as error:
            raise UserInputError(path, " ".join(f"invalid eraser ({error})".split())) from None
