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
from typing import Self

import torch
from torch import Tensor

GROUPS = ("forget", "retain", "recall", "erasure")
"""forget/retain fit the gate u; recall/erasure fit the direction r."""

GRAM_GROUPS = ("forget", "retain")
"""Groups whose Gram matrix H^T H is needed (the gate); recall/erasure need counts and sums only."""


class SteeringStats:
    """Streaming float64 sufficient statistics of last-token activations, per group and layer.

    For group in GROUPS and layer l: `counts[group]` = n, `sums[group][l]` = s = H^T 1 (d,), and for
    forget/retain `grams[group][l]` = G = H^T H (d, d). Memory is O(L d^2) whatever the data size; a Gram
    tensor is allocated on the first update of its group (2 L d^2 float64 for a full gate fit).
    """

    def __init__(self, num_layers: int, hidden_size: int):
        if num_layers < 1 or hidden_size < 1:
            raise ValueError(f"num_layers and hidden_size must be positive, got {num_layers}, {hidden_size}")
        self.num_layers = num_layers
        self.hidden_size = hidden_size
        self.counts: dict[str, int] = {group: 0 for group in GROUPS}
        self.sums: dict[str, Tensor] = {
            group: torch.zeros(num_layers, hidden_size, dtype=torch.float64) for group in GROUPS
        }
        self.grams: dict[str, Tensor] = {}

    def update(self, group: str, acts: Tensor) -> Self:
        """Add a batch of activations `acts` [batch, num_layers, d] (any float dtype) to `group`."""
        self._check_group(group)
        expected = (self.num_layers, self.hidden_size)
        if acts.ndim != 3 or tuple(acts.shape[1:]) != expected:
            raise ValueError(f"acts must have shape [batch, {expected[0]}, {expected[1]}], got {list(acts.shape)}")
        if not acts.is_floating_point():
            raise ValueError(f"acts must be a float tensor, got {acts.dtype}")
        h = acts.detach().to(device="cpu", dtype=torch.float64)
        self.counts[group] += h.shape[0]
        self.sums[group] += h.sum(dim=0)
        if group in GRAM_GROUPS:
            if group not in self.grams:
                d = self.hidden_size
                self.grams[group] = torch.zeros(self.num_layers, d, d, dtype=torch.float64)
            h_by_layer = h.transpose(0, 1)  # [L, batch, d]
            self.grams[group].baddbmm_(h_by_layer.transpose(1, 2), h_by_layer)  # G_l += H_l^T H_l, in place
        return self

    def merge(self, other: SteeringStats) -> SteeringStats:
        """New statistics of the union of both data sets: counts, sums and Grams add exactly."""
        if (other.num_layers, other.hidden_size) != (self.num_layers, self.hidden_size):
            raise ValueError(
                f"cannot merge statistics of shape (L={other.num_layers}, d={other.hidden_size}) "
                f"into (L={self.num_layers}, d={self.hidden_size})"
            )
        merged = SteeringStats(self.num_layers, self.hidden_size)
        for group in GROUPS:
            merged.counts[group] = self.counts[group] + other.counts[group]
            merged.sums[group] = self.sums[group] + other.sums[group]
        for group in GRAM_GROUPS:
            present = [stats.grams[group] for stats in (self, other) if group in stats.grams]
            if len(present) == 2:
                merged.grams[group] = present[0] + present[1]
            elif present:
                merged.grams[group] = present[0].clone()
        return merged

    def __add__(self, other: SteeringStats) -> SteeringStats:
        return self.merge(other)

    def mean(self, group: str) -> Tensor:
        """Per-layer mean activation of `group`, [L, d] float64."""
        return self.sums[group] / self._nonempty_count(group)

    def gram(self, group: str) -> Tensor:
        """Per-layer Gram matrix H^T H of `group` (forget or retain), [L, d, d] float64."""
        if group not in GRAM_GROUPS:
            raise ValueError(f"only {GRAM_GROUPS} keep a Gram matrix, not {group!r}")
        self._nonempty_count(group)
        return self.grams[group]

    def direction(self) -> Tensor:
        """Erasure direction r_l = mean_erasure h_l - mean_recall h_l, [L, d] float64.

        Points from recall towards erasure: h + alpha * r with alpha > 0 moves towards erasure.
        """
        return self.mean("erasure") - self.mean("recall")

    def state_dict(self) -> dict[str, Tensor]:
        """Flat tensors (safetensors-compatible): shape, and per group count, sum and (if any) Gram.

        Sums and Grams share storage with these statistics (as nn.Module.state_dict does): no copy of the
        O(L d^2) Grams; an in-place all-reduce of them updates the statistics.
        """
        state = {"shape": torch.tensor([self.num_layers, self.hidden_size], dtype=torch.int64)}
        for group in GROUPS:
            state[f"{group}.count"] = torch.tensor(self.counts[group], dtype=torch.int64)
            state[f"{group}.sum"] = self.sums[group]
        for group, gram in self.grams.items():
            state[f"{group}.gram"] = gram
        return state

    @classmethod
    def from_state_dict(cls, state: dict[str, Tensor]) -> SteeringStats:
        """Inverse of `state_dict` (copies the tensors); raises ValueError on a missing key or a wrong shape."""
        if "shape" not in state:
            raise ValueError("state dict has no 'shape' entry")
        num_layers, hidden_size = (int(x) for x in state["shape"].tolist())
        stats = cls(num_layers, hidden_size)
        for group in GROUPS:
            for key in (f"{group}.count", f"{group}.sum"):
                if key not in state:
                    raise ValueError(f"state dict has no {key!r} entry")
            stats.counts[group] = int(state[f"{group}.count"])
            stats.sums[group] = _checked(state, f"{group}.sum", (num_layers, hidden_size))
        for group in GRAM_GROUPS:
            if f"{group}.gram" in state:
                stats.grams[group] = _checked(state, f"{group}.gram", (num_layers, hidden_size, hidden_size))
            elif stats.counts[group] > 0:
                raise ValueError(f"state dict has {group} samples but no '{group}.gram' entry")
        return stats

    def _check_group(self, group: str) -> None:
        if group not in GROUPS:
            raise ValueError(f"unknown group {group!r}; expected one of {GROUPS}")

    def _nonempty_count(self, group: str) -> int:
        self._check_group(group)
        if self.counts[group] == 0:
            raise ValueError(f"group {group!r} is empty: update it with activations first")
        return self.counts[group]


def _checked(state: dict[str, Tensor], key: str, shape: tuple[int, ...]) -> Tensor:
    tensor = state[key]
    if tuple(tensor.shape) != shape:
        raise ValueError(f"state dict entry {key!r} has shape {list(tensor.shape)}, expected {list(shape)}")
    return tensor.to(torch.float64).clone()


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


def solve_gates(stats: SteeringStats, solver: str, **params: float) -> Tensor:
    """Gate vectors for every layer, [L, d] float64: solver 'paper' (ratio, gamma) or 'ridge' (beta, lam).

    The solvers run on the statistics' device (CPU); for large d, call them per layer on GPU copies.
    """
    G_f, G_r, s_f = stats.gram("forget"), stats.gram("retain"), stats.sums["forget"]
    if solver == "paper":
        per_layer = [solve_gate_paper(G_f[l], s_f[l], G_r[l], **params) for l in range(stats.num_layers)]
    elif solver == "ridge":
        n_f, n_r = stats.counts["forget"], stats.counts["retain"]
        per_layer = [solve_gate_ridge(G_f[l], s_f[l], G_r[l], n_f, n_r, **params) for l in range(stats.num_layers)]
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
