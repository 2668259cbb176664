"""Prompt gates: one decision per prompt and per deletion request, made once, at one decoder layer.

The paper's gate is linear in the last prompt token, per layer (`steering.solve_gate_paper`). On the testbed
the last token carries the question type more than the person (held-out AUROC 0.67-0.79 per layer), and each
layer's gate reads a stream that the layers before it have already steered. A prompt gate reads one pooled
feature z of the prompt at a decision layer l_d, where nothing is steered yet, decides for each request k
whether it fires, g_k = [s_k(z) > tau_k], and the steering

    h_l <- h_l + sum_k alpha_k g_k r_{k,l}          for every steered layer l >= l_d

is applied with that one decision (so the gate reads at run time exactly what it was fitted on). The equations:

    pooling    "mean": z = sum_t m_t h_t / sum_t m_t, the attention-masked mean over the prompt's positions
               (image tokens included: they carry the person); "last": z = h_t*, t* the row's last position
               with m_t = 1 (the paper's input, read from the mask, so right padding is safe too)
    knn        s_k(z) = log(d_R + eps) - log(d_F + eps),  d_F = 1 - top_j cos(z, F_kj),  d_R = 1 - top_j cos(z, R_kj)
               F_k: pooled features of request k's forget prompts; R_k: of the prompts to leave alone; "top" the
               mean of the n largest; eps = DISTANCE_FLOOR. A ratio test (how much nearer the nearest forget
               prompt is than the nearest retained one), not a difference of cosines: prompts of one kind are
               all alike (a text classification question is its long option list; only the name differs), so
               a difference is tiny for them and large for image prompts, while a ratio is on one scale for all.
               Measured on the testbed (activations only, layer 1, mean pooling): with the difference, the
               threshold that keeps validation people under 1% missed 38% of the forget text classification
               prompts; with the ratio it misses none, and Test_Set AUROC stays 1.000.
    ridge      s_k(z) = z . u_k with u_k = steering.solve_gate_ridge on the pooled features' Grams,
               scaled so the mean score over the forget prompts is 1
    threshold  tau_k: the smallest value that at most floor(max_fpr * n) of n held-out calibration prompts
               (people outside the fit) score above: the false-positive rate on them is <= max_fpr.

Pure torch; no model in sight (the hooks that run it are in hooks.py).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .steering import solve_gate_ridge

GATE_KINDS = ("knn", "ridge")
DISTANCE_FLOOR = 3e-3  # eps of the knn ratio: a match closer than this (float16 banks: ~1e-3) counts as exact
POOLINGS = ("mean", "last")


def pool(hidden: Tensor, mask: Tensor | None, pooling: str) -> Tensor:
    """The prompt feature z [batch, d] float32 of block outputs `hidden` [batch, seq, d] under the 2-D
    attention mask `mask` [batch, seq] (None: every position is real)."""
    hidden = hidden.to(torch.float32)
    if mask is None:
        return hidden.mean(dim=1) if pooling == "mean" else hidden[:, -1]
    mask = mask.to(device=hidden.device, dtype=torch.float32)
    if pooling == "mean":
        return (hidden * mask[..., None]).sum(dim=1) / mask.sum(dim=1, keepdim=True).clamp(min=1.0)
    if pooling == "last":
        positions = torch.arange(mask.shape[1], device=hidden.device, dtype=torch.float32)
        last = (mask * (positions + 1)).argmax(dim=1)  # the last position whose mask is 1
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")


def unit_rows(x: Tensor) -> Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp(min=1e-12)


def top_mean(similarity: Tensor, owner: Tensor, num_terms: int, neighbours: int) -> Tensor:
    """[batch, K]: for each term k, the mean of the `neighbours` largest similarities among columns owned by k
    (-inf where a term owns no column)."""
    out = similarity.new_full((similarity.shape[0], num_terms), -math.inf)
    for k in range(num_terms):
        columns = similarity[:, owner == k]
        if columns.shape[1]:
            out[:, k] = columns.topk(min(neighbours, columns.shape[1]), dim=1).values.mean(dim=1)
    return out


def ratio_score(forget_similarity: Tensor, retain_similarity: Tensor) -> Tensor:
    """log(d_R + eps) - log(d_F + eps) with d = 1 - similarity (a term with no bank rows: d = 2, the farthest)."""
    d_f = 1 - forget_similarity.clamp(min=-1.0)
    d_r = 1 - retain_similarity.clamp(min=-1.0)
    return torch.log(d_r + DISTANCE_FLOOR) - torch.log(d_f + DISTANCE_FLOOR)


@dataclass(frozen=True, eq=False)
class PromptGate:
    """K requests' prompt gates read at decoder layer `layer` (see the module docstring).

    knn: forget_bank [N_f, d] and retain_bank [N_r, d] hold unit-norm pooled features (stored float16: the
    scores only need cosines to ~1e-3), forget_owner / retain_owner [N] the term each row belongs to.
    ridge: u [K, d] float32. threshold: one tau per term.
    """

    kind: str
    pooling: str
    layer: int
    threshold: Sequence[float]
    neighbours: int = 1
    forget_bank: Tensor | None = None
    forget_owner: Tensor | None = None
    retain_bank: Tensor | None = None
    retain_owner: Tensor | None = None
    u: Tensor | None = None
    _device_cache: dict = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.kind not in GATE_KINDS:
            raise ValueError(f"gate kind must be one of {GATE_KINDS}, got {self.kind!r}")
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {self.pooling!r}")
        object.__setattr__(self, "threshold", tuple(float(t) for t in self.threshold))
        K = len(self.threshold)
        if self.kind == "knn":
            for name in ("forget_bank", "forget_owner", "retain_bank", "retain_owner"):
                if getattr(self, name) is None:
                    raise ValueError(f"a knn gate needs {name}")
            for bank, owner in (("forget_bank", "forget_owner"), ("retain_bank", "retain_owner")):
                b, o = getattr(self, bank).detach().cpu(), getattr(self, owner).detach().cpu().to(torch.int64)
                if b.ndim != 2 or o.shape != (b.shape[0],) or (o.numel() and (o.min() < 0 or o.max() >= K)):
                    raise ValueError(f"{bank} must be [N, d] with {owner} [N] in 0..{K - 1}")
                object.__setattr__(self, bank, b.to(torch.float16).contiguous())
                object.__setattr__(self, owner, o.contiguous())
        else:
            if self.u is None or self.u.ndim != 2 or self.u.shape[0] != K:
                raise ValueError(f"a ridge gate needs u [K={K}, d]")
            object.__setattr__(self, "u", self.u.detach().cpu().to(torch.float32).contiguous())

    @property
    def num_terms(self) -> int:
        return len(self.threshold)

    @property
    def hidden_size(self) -> int:
        return int((self.forget_bank if self.kind == "knn" else self.u).shape[1])

    def _on(self, device: torch.device) -> dict[str, Tensor]:
        """The scoring tensors on `device`, float32, moved once per device."""
        if device not in self._device_cache:
            names = ("forget_bank", "forget_owner", "retain_bank", "retain_owner") if self.kind == "knn" else ("u",)
            moved = {n: getattr(self, n).to(device) for n in names}
            for n in ("forget_bank", "retain_bank", "u"):
                if n in moved:
                    moved[n] = moved[n].to(torch.float32)
            moved["threshold"] = torch.tensor(self.threshold, dtype=torch.float32, device=device)
            self._device_cache[device] = moved
        return self._device_cache[device]

    def scores(self, z: Tensor) -> Tensor:
        """s_k(z) for pooled features z [batch, d]: [batch, K] float32."""
        t = self._on(z.device)
        z = z.to(torch.float32)
        if self.kind == "ridge":
            return z @ t["u"].T
        z = unit_rows(z)
        return ratio_score(top_mean(z @ t["forget_bank"].T, t["forget_owner"], self.num_terms, self.neighbours),
                           top_mean(z @ t["retain_bank"].T, t["retain_owner"], self.num_terms, self.neighbours))

    def fires(self, scores: Tensor) -> Tensor:
        """g [batch, K] float32 in {0, 1} from scores [batch, K]: s_k > tau_k."""
        return (scores > self._on(scores.device)["threshold"]).to(torch.float32)

    def decide(self, z: Tensor) -> Tensor:
        """g [batch, K] float32 in {0, 1}: which requests fire for each prompt."""
        return self.fires(self.scores(z))

    def tensors(self) -> dict[str, Tensor]:
        names = ("forget_bank", "forget_owner", "retain_bank", "retain_owner") if self.kind == "knn" else ("u",)
        return {f"gate.{n}": getattr(self, n) for n in names}

    def header(self) -> dict:
        return {"kind": self.kind, "pooling": self.pooling, "layer": self.layer, "threshold": list(self.threshold),
                "neighbours": self.neighbours}

    @classmethod
    def from_parts(cls, header: dict, tensors: dict[str, Tensor]) -> PromptGate:
        parts = {name.removeprefix("gate."): t for name, t in tensors.items() if name.startswith("gate.")}
        return cls(kind=header["kind"], pooling=header["pooling"], layer=int(header["layer"]),
                   threshold=header["threshold"], neighbours=int(header["neighbours"]), **parts)

    def compatible(self, other: PromptGate) -> str | None:
        """Why two gates cannot be stacked into one, or None."""
        for name in ("kind", "pooling", "layer", "neighbours"):
            if getattr(self, name) != getattr(other, name):
                return f"gate {name} {getattr(self, name)!r} vs {getattr(other, name)!r}"
        return None

    def stack(self, other: PromptGate) -> PromptGate:
        """Both gates' terms, self's first (the banks concatenate; other's owners shift by self's K)."""
        why = self.compatible(other)
        if why is not None:
            raise ValueError(f"cannot combine prompt gates: {why}")
        K = self.num_terms
        if self.kind == "ridge":
            return PromptGate(**{**self.header(), "threshold": self.threshold + other.threshold},
                              u=torch.cat([self.u, other.u]))
        return PromptGate(**{**self.header(), "threshold": self.threshold + other.threshold},
                          forget_bank=torch.cat([self.forget_bank, other.forget_bank]),
                          forget_owner=torch.cat([self.forget_owner, other.forget_owner + K]),
                          retain_bank=torch.cat([self.retain_bank, other.retain_bank]),
                          retain_owner=torch.cat([self.retain_owner, other.retain_owner + K]))

    def select(self, keep: Sequence[int]) -> PromptGate:
        """The gate of terms `keep` only (renumbered 0..len(keep)-1 in that order)."""
        threshold = [self.threshold[k] for k in keep]
        if self.kind == "ridge":
            return PromptGate(**{**self.header(), "threshold": threshold}, u=self.u[list(keep)])
        parts = {}
        for bank, owner in (("forget_bank", "forget_owner"), ("retain_bank", "retain_owner")):
            rows = [getattr(self, owner) == k for k in keep]
            parts[bank] = torch.cat([getattr(self, bank)[r] for r in rows])
            parts[owner] = torch.cat([torch.full((int(r.sum()),), new, dtype=torch.int64) for new, r in enumerate(rows)])
        return PromptGate(**{**self.header(), "threshold": threshold}, **parts)


def fit_knn(forget: Tensor, retain: Tensor, pooling: str, layer: int, neighbours: int = 1) -> PromptGate:
    """A one-term knn gate (threshold +inf until calibrated) from pooled features [N, d]."""
    return PromptGate(kind="knn", pooling=pooling, layer=layer, threshold=[math.inf], neighbours=neighbours,
                      forget_bank=unit_rows(forget.to(torch.float32)),
                      forget_owner=torch.zeros(forget.shape[0], dtype=torch.int64),
                      retain_bank=unit_rows(retain.to(torch.float32)),
                      retain_owner=torch.zeros(retain.shape[0], dtype=torch.int64))


def fit_ridge(forget: Tensor, retain: Tensor, pooling: str, layer: int, beta: float, lam: float) -> PromptGate:
    """A one-term ridge gate on pooled features (threshold +inf until calibrated), scaled to forget mean 1."""
    F, R = forget.to(torch.float64), retain.to(torch.float64)
    u = solve_gate_ridge(F.T @ F, F.sum(0), R.T @ R, F.shape[0], R.shape[0], beta=beta, lam=lam)
    u = u / (F @ u).mean()
    return PromptGate(kind="ridge", pooling=pooling, layer=layer, threshold=[math.inf], u=u[None].float())


def leave_one_out_retain_scores(gate: PromptGate) -> Tensor:
    """Scores of a one-term knn gate's own retain rows, each with itself left out of the retain bank: what an
    unseen retained prompt would score, when no held-out calibration prompts are given."""
    R = gate.retain_bank.to(torch.float32)
    similarity_r = R @ R.T
    similarity_r.fill_diagonal_(-math.inf)
    owner = torch.zeros(R.shape[0], dtype=torch.int64)
    top_r = top_mean(similarity_r, owner, 1, gate.neighbours)
    top_f = top_mean(R @ gate.forget_bank.to(torch.float32).T, gate.forget_owner, 1, gate.neighbours)
    return ratio_score(top_f, top_r)[:, 0]


def calibrate(scores: Tensor, max_fpr: float) -> tuple[float, float]:
    """(tau, measured false-positive rate): the smallest tau among the scores that at most floor(max_fpr * n)
    of the n calibration scores exceed."""
    if not 0.0 <= max_fpr < 1.0:
        raise ValueError(f"max_fpr must be in [0, 1), got {max_fpr}")
    values = scores.to(torch.float64).flatten().sort(descending=True).values
    if values.numel() == 0:
        raise ValueError("calibration needs at least one score")
    allowed = math.floor(max_fpr * values.numel())
    tau = float(values[min(allowed, values.numel() - 1)])
    return tau, float((values > tau).double().mean())


def auroc(positive: Tensor, negative: Tensor) -> float:
    """P(score of a positive > score of a negative), ties counted half (the Mann-Whitney U statistic)."""
    p, n = positive.to(torch.float64).flatten(), negative.to(torch.float64).flatten()
    if not p.numel() or not n.numel():
        return math.nan
    greater = (p[:, None] > n[None, :]).double().sum()
    ties = (p[:, None] == n[None, :]).double().sum()
    return float((greater + 0.5 * ties) / (p.numel() * n.numel()))
