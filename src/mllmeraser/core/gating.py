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
               with m_t = 1 (the paper's input, read from the mask, so right padding is safe too);
               "windows:W": segments, not one vector. With the prompt's L real positions renumbered 0..L-1
               (padding dropped, so either padding side gives the same segments) and stride s = max(1, W // 2),
               segment j is the mean over positions [j s, min(j s + W, L)), j = 0..n-1,
               n = 1 + ceil(max(L - W, 0) / s): every position is in a segment, a prompt shorter than W is one
               segment. z [batch, S, d] holds them, S the most any row has, a row's absent segments all zero.
               "embeddings:W": windows of W real positions at *every* start (stride 1) over the decoder's
               *input* (the token embeddings, and the image features where the image tokens stand), not over
               the decision layer's output. Why: at any layer past the embeddings a position attends to what
               stands before it, so a benign prefix or an earlier turn changes the question's own states (the
               testbed's layer-1 text windows lost their match under every prefix tried); the input embedding
               of a token is the same wherever it stands, and stride 1 contains every window of the question
               wherever a prefix moves it. So no text added *before* the question can lower its score: the max
               over the padded prompt's windows is at least the unpadded prompt's (tested). Banks keep each
               distinct window once (prompts of one template share most windows: 37,760 -> 10,742 retain rows
               on the small testbed at W = 12).
    segments   with segment features z_j (pooling "windows:W"), s_k(z) = max_j s_k(z_j): the prompt fires where
               its most forget-like segment does, and the banks F_k, R_k hold the segments of the fit's forget
               and retain prompts (a segment the two share, e.g. the benchmark's instruction, is near both: its
               ratio is ~0, below any threshold >= log min_ratio). Why: the mean moves with whatever the
               attacker adds around the question (a long benign prefix, earlier turns, an unrelated image), so
               padding switches it off; a max over segments cannot fall below the question's own segments'
               score, whatever is added elsewhere. tau_k is calibrated on max_j s_k of the calibration prompts.
    knn        s_k(z) = log(d_R + eps) - log(d_F + eps),  d_F = 1 - top_j cos(z, F_kj),  d_R = 1 - top_j cos(z, R_kj)
               F_k: pooled features of request k's forget prompts; R_k = R_shared U R_own,k: of the prompts to leave
               alone (every request fitted on one model and retain corpus has the same retain prompts: one shared
               copy, owner SHARED = -1, rows a request owns alone are its own); "top" the mean of the n largest;
               eps = DISTANCE_FLOOR. A ratio test (how much nearer the nearest forget
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
    columns    all K terms are scored at once: one matmul S = z B^T over a whole bank, then a segment reduction
               over the columns each term owns plus the shared ones: n = 1, a scatter max into [batch, K]
               (max_{j in R_k} S_j = max(max_{j shared} S_j, max_{j own} S_j)); n > 1, a gather through a padded
               [K, M] table of each term's own columns, whose top-n merges with the shared columns' top-n (the n
               largest of a union are among the n largest of each part). No Python loop over terms.

Pure torch; no model in sight (the hooks that run it are in prompt_steering.py).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..errors import UserInputError
from .devices import on_device
from .steering import solve_gate_ridge

GATE_KINDS = ("knn", "ridge")
DISTANCE_FLOOR = 3e-3  # eps of the knn ratio: a match closer than this (float16 banks: ~1e-3) counts as exact
SHARED = -1  # the owner of a retain bank row every term reads (one copy for all requests on one retain corpus)
POOLINGS = ("mean", "last", "windows", "embeddings")  # kinds; window poolings name a width: "windows:8"
WINDOWS = "windows"
EMBEDDINGS = "embeddings"  # windows over the decoder's input embeddings, every start (module docstring)
SEGMENT_CHUNK = 4096  # segments scored per similarity matmul (a [4096, N] float32 block per bank)
HEADER_FIELDS = ("kind", "pooling", "layer", "threshold", "neighbours")  # a gate's JSON header, every format
TENSOR_NAMES = {"knn": ("forget_bank", "forget_owner", "retain_bank", "retain_owner"), "ridge": ("u",)}
"""Each kind's tensors, stored as "gate.<name>": the only names an artifact's gate may hold."""


DECISION_DEPTH = 0.25
"""The default decision layer, as a fraction of the decoder's depth (`decision_layer_index`): layer 1 of the tiny
testbed's 4 (where every default was chosen, README "Selective erasure"), 8 of SmolLM2's 30, 8 of LLaVA-1.5-7B's
32. Why a quarter: the gate reads the prompt once about a quarter of the blocks have mixed the image tokens into the
question, and the steering runs on the remaining three quarters or so, the share the testbed's defaults were measured
with (3 of its 4 blocks). An absolute layer 1 on a 30-layer decoder would read a prompt one block past its
embeddings and steer 29 of 30 blocks."""


def check_decision_layer(value: int | float) -> int | float:
    """`value` if it can name a decision layer: an int >= 0 (an absolute decoder layer) or a float in (0, 1) (a
    fraction of the decoder's depth; bool is neither), else a one-line UserInputError naming the flag."""
    absolute = isinstance(value, numbers.Integral) and not isinstance(value, bool)  # numpy's ints too
    fraction = isinstance(value, float) and 0.0 < value < 1.0
    if not ((absolute and value >= 0) or fraction):
        raise UserInputError(None, f"--decision-layer (decision_layer) takes a decoder layer index 0, 1, ... or a "
                                   f"fraction of the decoder's depth in (0, 1), got {value!r}")
    return value


def decision_layer_index(value: int | float, num_layers: int) -> int:
    """The absolute decoder layer that `value` names on a decoder of `num_layers` layers. An int is that layer;
    a float f in (0, 1) is the layer nearest f * num_layers, ties upward, at most the last layer (DECISION_DEPTH:
    4 layers -> 1, 30 -> 8). The one place a decision layer setting meets a model's depth: fitting, the model
    cache's key, gates and indices read the index it returns. UserInputError (one line, naming the flag) where
    `value` is neither form or names no layer of this decoder."""
    if isinstance(check_decision_layer(value), numbers.Integral):
        index = int(value)
    else:
        # Rounded to 9 decimals first: f * L carries float error (0.58 * 25 = 14.499999999999998) that would
        # otherwise break a tie the other way than the fraction as written.
        index = min(math.floor(round(value * num_layers, 9) + 0.5), num_layers - 1)
    if not 0 <= index < num_layers:
        raise UserInputError(None, f"--decision-layer (decision_layer) {value} is not one of this decoder's "
                                   f"{num_layers} layers (0..{num_layers - 1}); pass an index below {num_layers} "
                                   "or a fraction of depth in (0, 1)")
    return index


def window_width(pooling: str) -> int | None:
    """W of a "windows:W" or "embeddings:W" pooling, None for "mean" and "last"; ValueError for anything else."""
    kind, _, width = pooling.partition(":") if isinstance(pooling, str) else ("", "", "")
    if kind in ("mean", "last") and not width:
        return None
    if kind in (WINDOWS, EMBEDDINGS) and width.isdigit() and int(width) >= 1 and str(int(width)) == width:
        return int(width)
    raise ValueError(f"pooling must be mean, last, windows:W or embeddings:W (W >= 1 tokens, e.g. windows:8), "
                     f"got {pooling!r}")


def reads_embeddings(pooling: str) -> bool:
    """Whether `pooling` reads the decoder's input embeddings (the first decoder layer's input) rather than the
    decision layer's output: "embeddings:W"."""
    return window_width(pooling) is not None and pooling.startswith(EMBEDDINGS + ":")


def pool(hidden: Tensor, mask: Tensor | None, pooling: str) -> Tensor:
    """The prompt feature of block outputs `hidden` [batch, seq, d] under the 2-D attention mask `mask`
    [batch, seq] (None: every position is real), float32: z [batch, d] ("mean", "last"), or the window
    segments [batch, S, d] ("windows:W", see window_means)."""
    width = window_width(pooling)
    if width is not None:
        return window_means(hidden, mask, width, 1 if reads_embeddings(pooling) else None)
    hidden = hidden.to(torch.float32)
    if mask is None:
        return hidden.mean(dim=1) if pooling == "mean" else hidden[:, -1]
    if pooling == "mean":
        mask = mask.to(device=hidden.device, dtype=torch.float32)
        return (hidden * mask[..., None]).sum(dim=1) / mask.sum(dim=1, keepdim=True).clamp(min=1.0)
    last = last_real_positions(mask, mask.shape[1], hidden.shape[0], hidden.device)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


def last_real_positions(mask: Tensor | None, length: int, batch: int, device: torch.device | str = "cpu") -> Tensor:
    """Per row, the index of the last position whose mask is 1 among the first `length` columns (the last real
    prompt token, whatever the padding side: the argmax of m_t (t + 1)), int64 on `device`; `length - 1` for
    every row without a mask."""
    if mask is None:
        return torch.full((batch,), length - 1, dtype=torch.long, device=device)
    columns = mask[:, :length].to(device=device, dtype=torch.long)
    return (columns * torch.arange(1, columns.shape[1] + 1, device=device)).argmax(dim=1)


def window_counts(lengths: Tensor, width: int, stride: int | None = None) -> Tensor:
    """n per row: how many windows of `width` (stride max(1, width // 2) unless given) cover a prompt of `lengths`
    positions."""
    stride = max(1, width // 2) if stride is None else stride
    return 1 + torch.div((lengths - width).clamp(min=0) + stride - 1, stride, rounding_mode="floor")


def window_means(hidden: Tensor, mask: Tensor | None, width: int, stride: int | None = None) -> Tensor:
    """[batch, S, d] float32: the mean of each window of `width` real positions, stride max(1, width // 2),
    the last one cut at the prompt's end (module docstring, "windows:W"); rows with fewer than S windows end in
    all-zero rows. From prefix sums in float64, so a window's mean does not depend on how long the prompt is."""
    batch, seq, d = hidden.shape
    real = (torch.ones(batch, seq, dtype=torch.bool, device=hidden.device) if mask is None
            else mask.to(hidden.device) != 0)
    # Real positions first, in order (a stable sort of "is padding"): left and right padding give one layout.
    order = torch.argsort((~real).to(torch.int8), dim=1, stable=True)
    packed = hidden.gather(1, order[..., None].expand(-1, -1, d)).to(torch.float64)
    lengths = real.sum(dim=1)
    packed = packed * (torch.arange(seq, device=hidden.device)[None, :] < lengths[:, None])[..., None]
    prefix = torch.cat([packed.new_zeros(batch, 1, d), packed.cumsum(dim=1)], dim=1)  # [batch, seq + 1, d]
    stride = max(1, width // 2) if stride is None else stride
    counts = window_counts(lengths, width, stride)
    starts = torch.arange(int(counts.max()) if batch else 1, device=hidden.device) * stride
    starts = torch.minimum(starts[None, :], lengths[:, None])  # [batch, S]; absent windows collapse to empty
    ends = torch.minimum(starts + width, lengths[:, None])
    index = lambda at: at[..., None].expand(-1, -1, d)  # noqa: E731 - gather positions along the sequence
    sums = prefix.gather(1, index(ends)) - prefix.gather(1, index(starts))
    means = sums / (ends - starts).clamp(min=1)[..., None]
    present = torch.arange(starts.shape[1], device=hidden.device)[None, :] < counts[:, None]
    return (means * present[..., None]).to(torch.float32)


def segment_rows(features: Tensor) -> tuple[Tensor, Tensor]:
    """(rows [M, d], prompt [M]): the present segments of features [N, S, d] (not all zero) and the prompt each
    comes from; features [N, d] are one segment per prompt."""
    if features.ndim == 2:
        return features, torch.arange(features.shape[0], device=features.device)
    present = features.ne(0).any(dim=-1)
    return features[present], present.nonzero()[:, 0]


def concat_features(parts: Sequence[Tensor]) -> Tensor:
    """Pooled features of several batches as one tensor: [N, d] concatenated, or [N, S, d] with each part's
    segments padded with absent (all-zero) rows to the longest part's S."""
    parts = list(parts)
    if not parts or parts[0].ndim == 2:
        return torch.cat(parts)
    most = max(p.shape[1] for p in parts)
    return torch.cat([torch.nn.functional.pad(p, (0, 0, 0, most - p.shape[1])) for p in parts])


def max_over_segments(z: Tensor, score_rows) -> Tensor:
    """[batch, K]: score_rows(z) for z [batch, d]; for segments z [batch, S, d], the max over each row's present
    segments of score_rows on them (one call over every segment at once)."""
    if z.ndim == 2:
        return score_rows(z)
    rows, prompt = segment_rows(z)
    # In chunks: a calibration set's segments times a bank's would not fit in memory as one similarity matrix.
    scores = torch.cat([score_rows(rows[i: i + SEGMENT_CHUNK]) for i in range(0, max(rows.shape[0], 1), SEGMENT_CHUNK)])
    out = scores.new_full((z.shape[0], scores.shape[1]), -math.inf)
    return out.scatter_reduce_(0, prompt.to(scores.device)[:, None].expand_as(scores), scores, "amax")


def unit_rows(x: Tensor) -> Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp(min=1e-12)


@dataclass(frozen=True, eq=False)
class Segments:
    """Which columns of a similarity matrix [batch, N] each of K terms reads, precomputed once per bank and
    device: `column` [N] (n = 1) is 1 + the owning term, 0 for a shared column (the scatter's spare slot);
    `shared` [S] the shared columns; `table` [K, M] (n > 1) 1 + each term's own columns, padded with 0 (a
    -inf column put in front); `count` [K] = min(n, own_k + S), how many values term k's mean takes."""

    num_terms: int
    neighbours: int
    column: Tensor | None
    shared: Tensor
    table: Tensor | None
    count: Tensor


def segments(owner: Tensor, num_terms: int, neighbours: int) -> Segments:
    """The Segments of a bank whose row j belongs to term owner[j] (SHARED: to every term)."""
    owner = owner.to(torch.int64)
    own = owner >= 0
    shared = (~own).nonzero().flatten()
    per_term = torch.bincount(owner[own], minlength=num_terms)[:num_terms]
    count = (per_term + shared.numel()).clamp(max=neighbours)
    if neighbours == 1:
        return Segments(num_terms, neighbours, owner + 1, shared, None, count)
    columns = own.nonzero().flatten()
    order = torch.argsort(owner[columns], stable=True)  # each term's columns together, in bank order
    columns, owners = columns[order], owner[columns][order]
    starts = torch.cumsum(per_term, 0) - per_term
    width = int(per_term.max()) if num_terms else 0
    table = torch.zeros(num_terms, width, dtype=torch.int64, device=owner.device)
    table[owners, torch.arange(columns.numel(), device=owner.device) - starts[owners]] = columns + 1
    return Segments(num_terms, neighbours, None, shared, table, count)


def segment_top_mean(similarity: Tensor, seg: Segments) -> Tensor:
    """[batch, K]: per term, the mean of the n largest similarities among its own and the shared columns
    (-inf where it has none), with no loop over terms (see the module docstring's "segments")."""
    batch, K, n = similarity.shape[0], seg.num_terms, seg.neighbours
    if n == 1:
        out = similarity.new_full((batch, K + 1), -math.inf)
        out.scatter_reduce_(1, seg.column.expand(batch, -1), similarity, "amax")
        return torch.maximum(out[:, 1:], out[:, :1])  # column 0: the shared max (-inf where none is shared)
    parts = []
    if seg.table.shape[1]:
        padded = torch.cat([similarity.new_full((batch, 1), -math.inf), similarity], dim=1)
        parts.append(padded[:, seg.table].topk(min(n, seg.table.shape[1]), dim=2).values)  # [batch, K, <=n]
    if seg.shared.numel():
        top = similarity[:, seg.shared].topk(min(n, seg.shared.numel()), dim=1).values
        parts.append(top[:, None, :].expand(batch, K, top.shape[1]))
    return mean_of_top(torch.cat(parts, dim=2) if parts else similarity.new_empty(batch, K, 0), seg.count, n,
                       merge=len(parts) > 1)


def mean_of_top(top: Tensor, count: Tensor, neighbours: int, merge: bool = False) -> Tensor:
    """[batch, K]: the mean of the first count_k values of `top` [batch, K, t] (sorted descending per term;
    `merge`: concatenated sorted runs, sorted here first), -inf where count_k = 0."""
    if merge:
        top = top.topk(min(neighbours, top.shape[2]), dim=2).values
    out = top.new_full(top.shape[:2], -math.inf)
    for c in range(1, min(neighbours, top.shape[2]) + 1):  # at most n passes, whatever K is
        out = torch.where(count == c, top[:, :, :c].contiguous().mean(dim=2), out)
    return out


def top_mean(similarity: Tensor, owner: Tensor, num_terms: int, neighbours: int) -> Tensor:
    """[batch, K]: for each term k, the mean of the `neighbours` largest similarities among columns owned by k
    or shared (owner SHARED), -inf where a term has no column."""
    return segment_top_mean(similarity, segments(owner.to(similarity.device), num_terms, neighbours))


def ratio_score(forget_similarity: Tensor, retain_similarity: Tensor) -> Tensor:
    """log(d_R + eps) - log(d_F + eps) with d = 1 - similarity (a term with no bank rows: d = 2, the farthest)."""
    d_f = 1 - forget_similarity.clamp(min=-1.0)
    d_r = 1 - retain_similarity.clamp(min=-1.0)
    return torch.log(d_r + DISTANCE_FLOOR) - torch.log(d_f + DISTANCE_FLOOR)


@dataclass(frozen=True, eq=False)
class PromptGate:
    """K requests' prompt gates read at decoder layer `layer` (see the module docstring).

    knn: forget_bank [N_f, d] and retain_bank [N_r, d] hold unit-norm pooled features (stored float16: the
    scores only need cosines to ~1e-3), forget_owner / retain_owner [N] the term each row belongs to; a retain
    row may be SHARED (-1) by every term: K requests on one retain corpus hold one copy of it, not K.
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
        window_width(self.pooling)  # ValueError for an unknown pooling
        object.__setattr__(self, "threshold", tuple(float(t) for t in self.threshold))
        K = len(self.threshold)
        if self.kind == "knn":
            for name in ("forget_bank", "forget_owner", "retain_bank", "retain_owner"):
                if getattr(self, name) is None:
                    raise ValueError(f"a knn gate needs {name}")
            for bank, owner, lowest in (("forget_bank", "forget_owner", 0), ("retain_bank", "retain_owner", SHARED)):
                b, o = getattr(self, bank).detach().cpu(), getattr(self, owner).detach().cpu().to(torch.int64)
                if b.ndim != 2 or o.shape != (b.shape[0],) or (o.numel() and (o.min() < lowest or o.max() >= K)):
                    raise ValueError(f"{bank} must be [N, d] with {owner} [N] in {lowest}..{K - 1}")
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

    @property
    def shared_rows(self) -> Tensor:
        """The retain rows every term reads (owner SHARED), [S, d] float16 (a knn gate's; empty where none): a
        view where they are one run of rows (as fit_knn and concat leave them), so comparing two gates' shared
        rows can find them to be one storage without reading them."""
        rows = (self.retain_owner == SHARED).nonzero().flatten()
        if not rows.numel():
            return self.retain_bank[:0]
        first, last = int(rows[0]), int(rows[-1])
        return self.retain_bank[first: last + 1] if last - first + 1 == rows.numel() else self.retain_bank[rows]

    def _on(self, device: torch.device) -> dict:
        """The scoring tensors on `device` (banks float32) and the banks' Segments, made once per device."""
        return on_device(self._device_cache, device, self._moved)

    def _moved(self, device: torch.device) -> dict:
        if self.kind == "knn":
            moved = {n: getattr(self, n).to(device=device, dtype=torch.float32) for n in ("forget_bank", "retain_bank")}
            for bank, owner in (("forget", self.forget_owner), ("retain", self.retain_owner)):
                moved[f"{bank}_segments"] = segments(owner.to(device), self.num_terms, self.neighbours)
        else:
            moved = {"u": self.u.to(device)}
        moved["threshold"] = torch.tensor(self.threshold, dtype=torch.float32, device=device)
        return moved

    def scores(self, z: Tensor) -> Tensor:
        """s_k(z) for pooled features z [batch, d], or the max over segments z [batch, S, d]: [batch, K] float32."""
        return max_over_segments(z, self._row_scores)

    def _row_scores(self, z: Tensor) -> Tensor:
        t = self._on(z.device)
        z = z.to(torch.float32)
        if self.kind == "ridge":
            return z @ t["u"].T
        z = unit_rows(z)
        return ratio_score(segment_top_mean(z @ t["forget_bank"].T, t["forget_segments"]),
                           segment_top_mean(z @ t["retain_bank"].T, t["retain_segments"]))

    def fires(self, scores: Tensor) -> Tensor:
        """g [batch, K] float32 in {0, 1} from scores [batch, K]: s_k > tau_k."""
        return (scores > self._on(scores.device)["threshold"]).to(torch.float32)

    def decide(self, z: Tensor) -> Tensor:
        """g [batch, K] float32 in {0, 1}: which requests fire for each prompt."""
        return self.fires(self.scores(z))

    def tensors(self) -> dict[str, Tensor]:
        return {f"gate.{n}": getattr(self, n) for n in TENSOR_NAMES[self.kind]}

    def header(self) -> dict:
        return {"kind": self.kind, "pooling": self.pooling, "layer": self.layer, "threshold": list(self.threshold),
                "neighbours": self.neighbours}

    @classmethod
    def from_parts(cls, header: dict, tensors: dict[str, Tensor]) -> PromptGate:
        """The gate of a `header()` and its `tensors()` (artifact.read_eraser_file checks both first). Only the
        kind's own tensor names become constructor arguments: a file cannot set any other field (a stored
        "gate._device_cache" would have replaced the per-device cache)."""
        unknown = sorted(set(header) - set(HEADER_FIELDS))
        if unknown:
            raise ValueError(f"unknown gate header fields {unknown}")
        names = TENSOR_NAMES.get(header["kind"])
        if names is None:
            raise ValueError(f"gate kind must be one of {GATE_KINDS}, got {header['kind']!r}")
        extra = sorted(name for name in tensors if name.startswith("gate.") and name[5:] not in names)
        if extra:
            raise ValueError(f"unknown gate tensors {extra}")
        parts = {name: tensors[f"gate.{name}"] for name in names}
        return cls(kind=header["kind"], pooling=header["pooling"], layer=header["layer"],
                   threshold=header["threshold"], neighbours=header["neighbours"], **parts)

    def compatible(self, other: PromptGate) -> str | None:
        """Why two gates cannot be stacked into one, or None."""
        for name in ("kind", "pooling", "layer", "neighbours"):
            if getattr(self, name) != getattr(other, name):
                return f"gate {name} {getattr(self, name)!r} vs {getattr(other, name)!r}"
        return None

    def stack(self, other: PromptGate) -> PromptGate:
        """Both gates' terms, self's first (see `concat`)."""
        return PromptGate.concat([self, other])

    @staticmethod
    def concat(gates: Sequence[PromptGate]) -> PromptGate:
        """Every gate's terms, in order, with one concatenation per bank (owners shifted by the terms before).

        Shared retain rows stay one copy where every gate's are equal (the usual case: one model, one retain
        corpus); otherwise each gate's shared rows become rows owned by each of its terms, so every term still
        reads exactly the rows it read alone (correct, just K copies).
        """
        gates = list(gates)
        if not gates:
            raise ValueError("concat needs at least one prompt gate")
        first = gates[0]
        for other in gates[1:]:
            why = first.compatible(other)
            if why is not None:
                raise ValueError(f"cannot combine prompt gates: {why}")
        threshold = tuple(t for g in gates for t in g.threshold)
        offsets = [0]
        for g in gates:
            offsets.append(offsets[-1] + g.num_terms)
        if first.kind == "ridge":
            return PromptGate(**{**first.header(), "threshold": threshold}, u=torch.cat([g.u for g in gates]))
        forget_owner = torch.cat([g.forget_owner + offset for g, offset in zip(gates, offsets)])
        shared = first.shared_rows
        if all(same_bank(shared, g.shared_rows) for g in gates[1:]):
            retain = [first.retain_bank] + [g.retain_bank[g.retain_owner != SHARED] for g in gates[1:]]
            owners = [first.retain_owner] + [g.retain_owner[g.retain_owner != SHARED] + offset
                                             for g, offset in zip(gates[1:], offsets[1:])]
        else:
            retain, owners = [], []
            for g, offset in zip(gates, offsets):
                bank, owner = g._owned_retain()
                retain.append(bank)
                owners.append(owner + offset)
        return PromptGate(**{**first.header(), "threshold": threshold},
                          forget_bank=torch.cat([g.forget_bank for g in gates]), forget_owner=forget_owner,
                          retain_bank=torch.cat(retain), retain_owner=torch.cat(owners))

    def _owned_retain(self) -> tuple[Tensor, Tensor]:
        """The retain bank with every shared row copied to each term as an owned row (owners 0..K-1)."""
        owned = self.retain_owner != SHARED
        shared = self.shared_rows
        K = self.num_terms
        bank = torch.cat([self.retain_bank[owned], shared.repeat(K, 1)])
        owner = torch.cat([self.retain_owner[owned], torch.arange(K).repeat_interleave(shared.shape[0])])
        return bank, owner

    def select(self, keep: Sequence[int]) -> PromptGate:
        """The gate of terms `keep` only (renumbered 0..len(keep)-1 in that order); shared retain rows stay."""
        keep = [int(k) for k in keep]
        threshold = [self.threshold[k] for k in keep]
        if self.kind == "ridge":
            return PromptGate(**{**self.header(), "threshold": threshold}, u=self.u[keep])
        parts = {}
        for bank, owner in (("forget_bank", "forget_owner"), ("retain_bank", "retain_owner")):
            rows, owners = _select_rows(getattr(self, owner), self.num_terms, keep)
            parts[bank], parts[owner] = getattr(self, bank)[rows], owners
        return PromptGate(**{**self.header(), "threshold": threshold}, **parts)


def _select_rows(owner: Tensor, num_terms: int, keep: list[int]) -> tuple[Tensor, Tensor]:
    """(row indices, new owners) of a bank cut down to terms `keep` (renumbered by position): shared rows first,
    then each kept term's rows in bank order, term by term; one stable sort, whatever K is."""
    if len(set(keep)) != len(keep):  # a term kept twice: its rows twice (rare; not worth vectorising)
        shared = (owner == SHARED).nonzero().flatten()
        rows = [shared] + [(owner == k).nonzero().flatten() for k in keep]
        owners = [torch.full((shared.numel(),), SHARED, dtype=torch.int64)]
        owners += [torch.full((r.numel(),), new, dtype=torch.int64) for new, r in enumerate(rows[1:])]
        return torch.cat(rows), torch.cat(owners)
    position = torch.full((num_terms + 1,), -2, dtype=torch.int64)  # by owner + 1: shared -> -1, dropped -> -2
    position[0] = SHARED
    position[torch.tensor(keep, dtype=torch.int64) + 1] = torch.arange(len(keep))
    new = position[owner + 1]
    rows = (new != -2).nonzero().flatten()
    rows = rows[torch.argsort(new[rows], stable=True)]
    return rows, new[rows]


def same_bank(a: Tensor, b: Tensor) -> bool:
    """Whether two banks hold the same rows in the same order: shapes first, then one view of one storage, then
    every element's bits (torch.equal of integer views: on a CPU 8x faster than comparing float16 values,
    ~14 ms for 9,000 x 4,096; -0.0 and 0.0 differ, which two copies of one bank never do)."""
    if a.shape != b.shape or a.dtype != b.dtype or a.device != b.device:
        return False
    if a.data_ptr() == b.data_ptr() and a.stride() == b.stride():
        return True
    return bool(torch.equal(_bits(a), _bits(b)))


def _bits(t: Tensor) -> Tensor:
    """The raw bytes of `t` in row-major order, viewed as int64 where their length and alignment allow."""
    flat = t.contiguous().reshape(-1).view(torch.uint8)
    if flat.numel() % 8 == 0 and flat.data_ptr() % 8 == 0:
        return flat.view(torch.int64)
    return flat


def fit_knn(forget: Tensor, retain: Tensor, pooling: str, layer: int, neighbours: int = 1,
            distinct: bool = False) -> PromptGate:
    """A one-term knn gate (threshold +inf until calibrated) from pooled features [N, d] or segments [N, S, d]
    (each present segment a bank row); its retain rows are SHARED, so gates fitted on one retain corpus stack
    with one copy of it. `distinct`: each bank keeps one copy of rows equal as stored (float16 unit rows), which
    changes no score with one neighbour (a max) and, with n > 1, counts a repeated window once."""
    forget, retain = segment_rows(forget)[0], segment_rows(retain)[0]
    forget, retain = unit_rows(forget.to(torch.float32)), unit_rows(retain.to(torch.float32))
    if distinct:
        forget, retain = distinct_rows(forget), distinct_rows(retain)
    return PromptGate(kind="knn", pooling=pooling, layer=layer, threshold=[math.inf], neighbours=neighbours,
                      forget_bank=forget, forget_owner=torch.zeros(forget.shape[0], dtype=torch.int64),
                      retain_bank=retain, retain_owner=torch.full((retain.shape[0],), SHARED, dtype=torch.int64))


def distinct_rows(rows: Tensor) -> Tensor:
    """The rows of `rows` [N, d] that differ once rounded to float16 (how banks are stored), first occurrence
    kept, in their order."""
    if rows.shape[0] < 2:
        return rows
    _, inverse = torch.unique(rows.to(torch.float16), dim=0, return_inverse=True)
    first = torch.full((int(inverse.max()) + 1,), rows.shape[0], dtype=torch.int64)
    first.scatter_reduce_(0, inverse, torch.arange(rows.shape[0]), "amin")
    return rows[first.sort().values]


def fit_ridge(forget: Tensor, retain: Tensor, pooling: str, layer: int, beta: float, lam: float) -> PromptGate:
    """A one-term ridge gate on pooled features or their segments (threshold +inf until calibrated), scaled to
    forget mean 1."""
    forget, retain = segment_rows(forget)[0], segment_rows(retain)[0]
    F, R = forget.to(torch.float64), retain.to(torch.float64)
    u = solve_gate_ridge(F.T @ F, F.sum(0), R.T @ R, F.shape[0], R.shape[0], beta=beta, lam=lam)
    u = u / (F @ u).mean()
    return PromptGate(kind="ridge", pooling=pooling, layer=layer, threshold=[math.inf], u=u[None].float())


def leave_one_out_retain_scores(gate: PromptGate, prompt_of_row: Tensor | None = None) -> Tensor:
    """Scores of a one-term knn gate's own retain prompts, each with itself left out of the retain bank: what an
    unseen retained prompt would score, when no held-out calibration prompts are given. `prompt_of_row` [M]
    (segment_rows' second value): which prompt each retain row is a segment of; a prompt's score is then the max
    over its segments, every segment of it left out together. None: one row per prompt."""
    R = gate.retain_bank.to(torch.float32)
    prompt = torch.arange(R.shape[0]) if prompt_of_row is None else prompt_of_row.cpu()
    similarity_r = R @ R.T
    similarity_r.masked_fill_(prompt[:, None] == prompt[None, :], -math.inf)
    owner = torch.zeros(R.shape[0], dtype=torch.int64)
    top_r = top_mean(similarity_r, owner, 1, gate.neighbours)
    top_f = top_mean(R @ gate.forget_bank.to(torch.float32).T, gate.forget_owner, 1, gate.neighbours)
    per_row = ratio_score(top_f, top_r)[:, 0]
    out = per_row.new_full((int(prompt.max()) + 1 if prompt.numel() else 0,), -math.inf)
    return out.scatter_reduce_(0, prompt, per_row, "amax")


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
    """P(score of a positive > score of a negative), ties counted half: the Mann-Whitney U statistic over P x N,
    from the ranks of the pooled scores (ties get their mean rank) in O((P + N) log(P + N)), not P x N
    comparisons. U = (sum of the positives' ranks) - P (P + 1) / 2, counted in integers as 2U (twice a mean
    rank is a whole number), so the value is the same float as the pairwise count's. NaN for an empty side."""
    p, n = positive.to(torch.float64).flatten(), negative.to(torch.float64).flatten()
    if not p.numel() or not n.numel():
        return math.nan
    pairs = p.numel() * n.numel()
    p, n = p[~p.isnan()], n[~n.isnan()]  # a NaN is neither above, below nor equal to a score: its pairs count 0
    # + 0.0 turns -0.0 into 0.0: the two are one value to ">" and "==", so they must share a rank
    _, value_of, counts = torch.unique(torch.cat([p, n]) + 0.0, return_inverse=True, return_counts=True)
    last = counts.cumsum(0)  # the 1-based rank of each distinct value's last copy
    twice_rank = 2 * last - counts + 1  # first + last rank of the value's run
    twice_u = int(twice_rank[value_of[: p.numel()]].sum()) - p.numel() * (p.numel() + 1)
    return twice_u / (2 * pairs)
