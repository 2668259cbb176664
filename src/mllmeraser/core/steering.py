"""The MLLMEraser equations, in pure torch: sufficient statistics, erasure direction, gates, gate shaping.

Notation (README.md, section "The method, and where it differs from the original code"). A decoder has
layers l = 1..L and hidden size d. h_l(x) is the residual stream leaving block l at the last prompt token of
input x. Rows of H_f are forget activations, rows of H_r retain activations (n_f and n_r rows). At inference
block l's output becomes

    h <- h + alpha * g(h_last . u_l) * r_l

with r_l the erasure direction, u_l the gate vector and g the gate shaping (identity in the paper).

Everything the fit needs is a function of per-group counts n, sums s = H^T 1 and Gram matrices G = H^T H,
so they are accumulated streaming in float64 and shards merge by addition (data-parallel fits all-reduce).

Sign convention: r_l = mean(erasure) - mean(recall) points FROM recall TOWARDS erasure, so a POSITIVE alpha
erases. (The original code steered with a negative strength because its direction pointed the other way.)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Self

import torch
from torch import Tensor

GROUPS = ("forget", "retain", "recall", "erasure")
"""forget/retain fit the gate u; recall/erasure fit the direction r."""

GRAM_GROUPS = ("forget", "retain")
"""Groups whose Gram matrix H^T H is needed (the gate); recall/erasure need counts and sums only."""


class SteeringStats:
    """Streaming float64 sufficient statistics of last-token activations, per group and held layer.

    The statistics hold the decoder layers `layers` (default: all `num_layers`), in increasing order; row i
    of every tensor is decoder layer `layers[i]` (`rows` maps layers to rows). A fit holds only the layers it
    steers: layer 0, never steered, would cost as much as any other (2 d^2 float64 for the paper gate,
    128 MiB a layer at d = 4096).

    For group in GROUPS: `counts[group]` = n, `sums[group][i]` = s = H^T 1 (d,), and for forget/retain
    `grams[group][i]` = G = H^T H (d, d). Memory is O(len(layers) d^2) whatever the data size; a Gram tensor
    is allocated on the first update of its group (2 len(layers) d^2 float64 for a paper gate fit).

    `device`: where the sums and Grams live and accumulate (float64 there too). The CPU by default; a fit
    on a GPU model keeps them on that GPU (`collection.statistics_device`), so the Grams (7.75 GiB at
    LLaVA-1.5-7B) stay out of host memory and the gate solves run at the GPU's float64 speed.
    """

    def __init__(self, num_layers: int, hidden_size: int, layers: Sequence[int] | None = None,
                 device: str | torch.device | None = None):
        if num_layers < 1 or hidden_size < 1:
            raise ValueError(f"num_layers and hidden_size must be positive, got {num_layers}, {hidden_size}")
        self.num_layers = num_layers  # the model's decoder layers; the held ones are `layers`
        self.hidden_size = hidden_size
        self.layers: tuple[int, ...] = _held_layers(layers, num_layers)
        self.device = torch.device("cpu" if device is None else device)
        self._rows = {layer: row for row, layer in enumerate(self.layers)}
        self.counts: dict[str, int] = {group: 0 for group in GROUPS}
        self.sums: dict[str, Tensor] = {
            group: torch.zeros(len(self.layers), hidden_size, dtype=torch.float64, device=self.device)
            for group in GROUPS
        }
        self.grams: dict[str, Tensor] = {}

    def rows(self, layers: Sequence[int] | None = None) -> list[int]:
        """Rows of the statistics' tensors that hold decoder layers `layers` (None: every held layer)."""
        if layers is None:
            return list(range(len(self.layers)))
        missing = [layer for layer in layers if layer not in self._rows]
        if missing:
            raise ValueError(f"statistics hold decoder layers {list(self.layers)}, not {missing}")
        return [self._rows[layer] for layer in layers]

    def update(self, group: str, acts: Tensor) -> Self:
        """Add a batch of activations `acts` [batch, len(layers), d] (any float dtype, any device; the block
        outputs of the held layers, in `layers` order) to `group`."""
        self._check_group(group)
        expected = (len(self.layers), self.hidden_size)
        if acts.ndim != 3 or tuple(acts.shape[1:]) != expected:
            raise ValueError(f"acts must have shape [batch, {expected[0]}, {expected[1]}], got {list(acts.shape)}")
        if not acts.is_floating_point():
            raise ValueError(f"acts must be a float tensor, got {acts.dtype}")
        h = acts.detach().to(device=self.device, dtype=torch.float64)
        self.counts[group] += h.shape[0]
        self.sums[group] += h.sum(dim=0)
        if group in GRAM_GROUPS:
            if group not in self.grams:
                d = self.hidden_size
                self.grams[group] = torch.zeros(len(self.layers), d, d, dtype=torch.float64, device=self.device)
            h_by_layer = h.transpose(0, 1)  # [layers, batch, d]
            self.grams[group].baddbmm_(h_by_layer.transpose(1, 2), h_by_layer)  # G_l += H_l^T H_l, in place
        return self

    def merge_(self, other: SteeringStats) -> Self:
        """Add `other`'s statistics into these, in place: counts, sums and Grams add exactly. No Gram is
        allocated except where only `other` has one (copied, so later in-place merges never write into it);
        a Gram on another device passes through a temporary copy of one group's Gram at a time."""
        self._check_mergeable(other)
        for group in GROUPS:
            self.counts[group] += other.counts[group]
            self.sums[group] += other.sums[group].to(self.device)
        for group, gram in other.grams.items():
            if group in self.grams:
                self.grams[group] += gram.to(self.device)
            else:
                self.grams[group] = gram.to(self.device, copy=True)
        return self

    def __iadd__(self, other: SteeringStats) -> Self:
        return self.merge_(other)

    def merge(self, other: SteeringStats) -> SteeringStats:
        """New statistics of the union of both data sets; neither input changes. Allocates the result's
        tensors and nothing else (one Gram per group, written by the addition itself); where memory is
        short, `merge_` (or `+=`) adds into an existing shard instead."""
        self._check_mergeable(other)
        merged = SteeringStats(self.num_layers, self.hidden_size, self.layers, self.device)
        merged.counts = {group: self.counts[group] + other.counts[group] for group in GROUPS}
        merged.sums = {group: self.sums[group] + other.sums[group].to(self.device) for group in GROUPS}
        merged.grams = {}
        for group in GRAM_GROUPS:
            mine, theirs = self.grams.get(group), other.grams.get(group)
            if mine is not None and theirs is not None:
                merged.grams[group] = mine + theirs.to(self.device)
            elif mine is not None or theirs is not None:
                merged.grams[group] = (mine if mine is not None else theirs).to(self.device, copy=True)
        return merged

    def __add__(self, other: SteeringStats) -> SteeringStats:
        return self.merge(other)

    def mean(self, group: str, layers: Sequence[int] | None = None) -> Tensor:
        """Mean activation of `group` at decoder layers `layers` (None: every held layer), [n, d] float64."""
        count = self._nonempty_count(group)
        sums = self.sums[group] if layers is None else self.sums[group][self.rows(layers)]
        return sums / count

    def gram(self, group: str) -> Tensor:
        """Gram matrices H^T H of `group` (forget or retain) at the held layers, [len(layers), d, d] float64."""
        if group not in GRAM_GROUPS:
            raise ValueError(f"only {GRAM_GROUPS} keep a Gram matrix, not {group!r}")
        self._nonempty_count(group)
        return self.grams[group]

    def direction(self, layers: Sequence[int] | None = None) -> Tensor:
        """Erasure direction r_l = mean_erasure h_l - mean_recall h_l at decoder layers `layers` (None: every
        held layer), [n, d] float64.

        Points from recall towards erasure: h + alpha * r with alpha > 0 moves towards erasure.
        """
        return self.mean("erasure", layers) - self.mean("recall", layers)

    def state_dict(self) -> dict[str, Tensor]:
        """Flat tensors (safetensors-compatible on the CPU): shape, held layers, and per group count, sum and
        (if any) Gram.

        Sums and Grams share storage with these statistics (as nn.Module.state_dict does): no copy of the
        O(L d^2) Grams; an in-place all-reduce of them updates the statistics.
        """
        state = {"shape": torch.tensor([self.num_layers, self.hidden_size], dtype=torch.int64),
                 "layers": torch.tensor(self.layers, dtype=torch.int64)}
        for group in GROUPS:
            state[f"{group}.count"] = torch.tensor(self.counts[group], dtype=torch.int64)
            state[f"{group}.sum"] = self.sums[group]
        for group, gram in self.grams.items():
            state[f"{group}.gram"] = gram
        return state

    @classmethod
    def from_state_dict(cls, state: dict[str, Tensor], device: str | torch.device | None = None) -> SteeringStats:
        """Inverse of `state_dict` (copies the tensors, onto `device`, default the CPU); raises ValueError on a
        missing key or a wrong shape. A state without "layers" (written before statistics held a subset)
        holds every layer."""
        if "shape" not in state:
            raise ValueError("state dict has no 'shape' entry")
        num_layers, hidden_size = (int(x) for x in state["shape"].tolist())
        layers = [int(x) for x in state["layers"].tolist()] if "layers" in state else None
        stats = cls(num_layers, hidden_size, layers, device)
        held = len(stats.layers)
        for group in GROUPS:
            for key in (f"{group}.count", f"{group}.sum"):
                if key not in state:
                    raise ValueError(f"state dict has no {key!r} entry")
            stats.counts[group] = int(state[f"{group}.count"])
            stats.sums[group] = _checked(state, f"{group}.sum", (held, hidden_size), stats.device)
        for group in GRAM_GROUPS:
            if f"{group}.gram" in state:
                stats.grams[group] = _checked(state, f"{group}.gram", (held, hidden_size, hidden_size), stats.device)
            elif stats.counts[group] > 0:
                raise ValueError(f"state dict has {group} samples but no '{group}.gram' entry")
        return stats

    def _check_group(self, group: str) -> None:
        if group not in GROUPS:
            raise ValueError(f"unknown group {group!r}; expected one of {GROUPS}")

    def _check_mergeable(self, other: SteeringStats) -> None:
        if (other.num_layers, other.hidden_size, other.layers) != (self.num_layers, self.hidden_size, self.layers):
            raise ValueError(
                f"cannot merge statistics of shape (L={other.num_layers}, d={other.hidden_size}, layers "
                f"{list(other.layers)}) into (L={self.num_layers}, d={self.hidden_size}, layers {list(self.layers)})"
            )

    def _nonempty_count(self, group: str) -> int:
        self._check_group(group)
        if self.counts[group] == 0:
            raise ValueError(f"group {group!r} is empty: update it with activations first")
        return self.counts[group]


def _held_layers(layers: Sequence[int] | None, num_layers: int) -> tuple[int, ...]:
    """`layers` as increasing distinct decoder-layer numbers in 0..num_layers-1 (None: all of them)."""
    if layers is None:
        return tuple(range(num_layers))
    held = tuple(sorted({int(layer) for layer in layers}))
    if not held or held[0] < 0 or held[-1] >= num_layers or len(held) != len(layers):
        raise ValueError(f"layers must be distinct decoder layers in 0..{num_layers - 1}, got {list(layers)}")
    return held


def _checked(state: dict[str, Tensor], key: str, shape: tuple[int, ...], device: torch.device) -> Tensor:
    tensor = state[key]
    if tuple(tensor.shape) != shape:
        raise ValueError(f"state dict entry {key!r} has shape {list(tensor.shape)}, expected {list(shape)}")
    return tensor.to(device=device, dtype=torch.float64, copy=True)


def null_space_basis(G_r: Tensor, ratio: float) -> Tensor:
    """Q (d, k): eigenvectors of G_r = H_r^T H_r for its k = floor(d * ratio) smallest eigenvalues.

    These are the paper's "last k singular vectors" of H_r^T H_r (symmetric PSD: singular vectors are
    eigenvectors); span(Q) is the approximate null space of the retain activations.
    """
    d = G_r.shape[-1]
    k = math.floor(d * ratio)
    if not 1 <= k <= d:
        raise ValueError(f"ratio {ratio} keeps floor({d} * ratio) = {k} directions; need 1..{d}")
    _, eigenvectors = torch.linalg.eigh(G_r.to(torch.float64))  # ascending eigenvalues
    return eigenvectors[:, :k]


def solve_gate_paper(G_f: Tensor, s_f: Tensor, G_r: Tensor, ratio: float, gamma: float) -> Tensor:
    """The paper's null-space gate in rank-one form: u = P pinv(P G_f P + gamma P) P s_f, (d,) float64.

    The paper's map is W = P pinv(X^T X + gamma P^T P) X^T (1 r^T) with P = Q Q^T and X = H_f P. Since
    X^T X = P G_f P, P^T P = P and X^T 1 = P s_f, W = u r^T with u as above: steering h W = (h . u) r.
    With Q orthonormal, P G_f P + gamma P = Q M Q^T, M = Q^T G_f Q + gamma I (k x k), whose pseudo-inverse
    is Q pinv(M) Q^T; hence u = Q pinv(M) Q^T s_f, a k x k problem instead of a d x d one.
    """
    Q = null_space_basis(G_r, ratio)
    M = Q.T @ G_f.to(torch.float64) @ Q + gamma * torch.eye(Q.shape[1], dtype=torch.float64, device=Q.device)
    return Q @ (torch.linalg.pinv(M, hermitian=True) @ (Q.T @ s_f.to(torch.float64)))


def paper_dense_map(H_f: Tensor, H_r: Tensor, r: Tensor, ratio: float, gamma: float) -> Tensor:
    """The paper's d x d map, literally, from raw activations (reference for tests only).

    P = Q Q^T with Q the last floor(d * ratio) singular vectors of H_r^T H_r; X = H_f P;
    W = P pinv(X^T X + gamma P^T P) X^T (1 r^T).
    """
    H_f, H_r, r = (t.to(torch.float64) for t in (H_f, H_r, r))
    d = H_r.shape[1]
    k = math.floor(d * ratio)
    _, _, Vh = torch.linalg.svd(H_r.T @ H_r)  # rows of Vh: right singular vectors, descending
    Q = Vh[d - k :].T
    P = Q @ Q.T
    X = H_f @ P
    ones = torch.ones(H_f.shape[0], 1, dtype=torch.float64)
    D = torch.linalg.pinv(X.T @ X + gamma * P.T @ P) @ X.T @ (ones @ r[None, :])
    return P @ D


def solve_gate_ridge(
    G_f: Tensor, s_f: Tensor, G_r: Tensor, n_f: int, n_r: int, beta: float = 1.0, lam: float = 1e-3
) -> Tensor:
    """Soft null space: a ridge discriminant with target 1 on forget and 0 on retain, (d,) float64.

    Minimises the per-group MEAN squared errors plus a relative ridge penalty:

        J(u) = (1/n_f) sum_f (h.u - 1)^2 + beta (1/n_r) sum_r (h.u)^2 + lam_abs |u|^2
        =>  (A + lam_abs I) u = s_f / n_f,   A = G_f / n_f + beta G_r / n_r,   lam_abs = lam * trace(A) / d

    so beta = 1 weighs the forget and retain groups equally whatever their sizes (with raw sums it would be
    beta * n_f / n_r), and lam is relative to the mean eigenvalue of A (invariant to the activations' scale).
    """
    if n_f < 1 or n_r < 1:
        raise ValueError(f"ridge gate needs forget and retain samples, got n_f={n_f}, n_r={n_r}")
    d = G_f.shape[-1]
    A = G_f.to(torch.float64) / n_f + beta * G_r.to(torch.float64) / n_r
    lam_abs = lam * torch.trace(A) / d
    L, info = torch.linalg.cholesky_ex(A + lam_abs * torch.eye(d, dtype=torch.float64, device=A.device))
    if info != 0:
        raise ValueError(f"ridge system is not positive definite (beta={beta}, lam={lam}); use lam > 0")
    return torch.cholesky_solve((s_f.to(torch.float64) / n_f)[:, None], L)[:, 0]


def solve_gates(stats: SteeringStats, solver: str, layers: Sequence[int] | None = None, **params: float) -> Tensor:
    """Gate vectors at decoder layers `layers` (None: every held layer), [n, d] float64: solver 'paper'
    (ratio, gamma) or 'ridge' (beta, lam). Each layer's gate depends on that layer's statistics only.

    The solvers run on the statistics' device (a GPU's float64 eigh takes well under a second at d = 4096,
    ~20 s on two CPU cores).
    """
    G_f, G_r, s_f = stats.gram("forget"), stats.gram("retain"), stats.sums["forget"]
    rows = stats.rows(layers)
    if solver == "paper":
        per_layer = [solve_gate_paper(G_f[i], s_f[i], G_r[i], **params) for i in rows]
    elif solver == "ridge":
        n_f, n_r = stats.counts["forget"], stats.counts["retain"]
        per_layer = [solve_gate_ridge(G_f[i], s_f[i], G_r[i], n_f, n_r, **params) for i in rows]
    else:
        raise ValueError(f"unknown gate solver {solver!r}; expected 'paper' or 'ridge'")
    return torch.stack(per_layer)


def shape_gate(g: Tensor, floor: float | Tensor = -math.inf, cap: float | Tensor = math.inf) -> Tensor:
    """Gate shaping at run time: g' = 0 where g < floor, else min(g, cap).

    floor = -inf, cap = +inf is exactly the identity: the paper's unbounded linear gate. floor and cap may be
    tensors broadcasting against g (one value per steering term).
    """
    floor = torch.as_tensor(floor, dtype=g.dtype, device=g.device)
    cap = torch.as_tensor(cap, dtype=g.dtype, device=g.device)
    return torch.where(g < floor, torch.zeros_like(g), torch.minimum(g, cap))


def steering_term(
    h_last: Tensor, u: Tensor, r: Tensor, alpha: Tensor, floor: Tensor, cap: Tensor
) -> Tensor:
    """The added residual: sum_k alpha_k * shape_gate(h_last . u_k) * r_k, [batch, d] float32.

    h_last [batch, d] is the block output at the last prompt token; u, r [K, d] hold one row per deletion
    request (K >= 1 terms compose by addition); alpha, floor, cap are (K,). Computed in float32 whatever
    the hidden dtype; the caller casts the result to the hidden dtype.
    """
    gates = shape_gate(h_last.to(torch.float32) @ u.T, floor, cap)  # [batch, K]
    return (gates * alpha) @ r
