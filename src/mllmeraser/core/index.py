"""One gate structure over every active deletion request: `RequestIndex`, mutable, request by request.

A provider answering under thousands of deletion requests needs every answer to honour all of them. Stacked
Erasers (`Eraser.concat`) do, but each change copies every request (O(total)), and every term would
carry its own copy of the retain bank. The index holds, for knn prompt gates fitted on one model, one set of
steered layers and one retain corpus:

    R [S, d]        the shared retain bank, once (unit rows)
    F [N, d]        every request's forget rows; column c_j = 1 + the slot of the term row j belongs to, 0 for a
                    free row (a request withdrawn, or capacity not used yet)
    per slot k      directions r_k [L, d], strength alpha_k, threshold tau_k (+inf for a free slot)

and scores every slot at once (gating's equations, the same numbers as the stacked Eraser's gate):

    s_k(z) = log(1 - top_n(z R^T) + eps) - log(1 - top_n{(z F^T)_j : c_j = 1 + k} + eps),  g_k = [s_k > tau_k]

with one matmul over F, a segment reduction into slots (n = 1: a scatter max; n > 1: a gather through a
padded [slots, M] table of each slot's rows, then top-n), and the retain term computed once for all slots
(it is the same for every request). The hooks steer a prompt with the fired slots only (prompt_steering.FiredTerms).

Add and remove cost the size of the request: rows and slots come from free lists, or from buffers that
double when full (a copy of what is held, at most log2 times over the index's life: amortised O(1) per row);
a withdrawal marks its rows free (column 0, zeroed) and its slots free (tau = +inf, alpha = 0, r = 0), to be
reused by later requests. Memory, float32 on the index's device plus the shared bank's float16 original:
4 d (cap_rows + S + cap_slots L) + 2 S d bytes, cap_rows < 2 N_max and cap_slots < 2 K_max.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from . import gating
from .compat import check_compatible, fingerprint_mismatch
from .eraser import Eraser
from .attachment import SteeringHandle
from .prompt_steering import PromptDecision, PromptTerms, attach_prompt_terms

NAME_KEY = "index_name"  # per-term metadata key naming the index request a term belongs to (to_eraser)


class RequestIndex(PromptTerms):
    """Every active deletion request's prompt gate and directions in one mutable structure (module docstring).

    Requests are named; `add(name, eraser)` inserts an eraser's K >= 1 terms (knn prompt gate, same model,
    layers, mode, gate settings and retain bank as the index), `remove(name)` withdraws them. `scores(z)`,
    `decide(z)`: [batch, slots] over every slot (free ones never fire); `term_slots()` names the active slots
    in `to_eraser`'s term order. `attach(model)` steers with the index's state at each prompt's decision, so
    add and remove while attached take effect from the next prompt. Thread-safe (one lock).
    """

    def __init__(self, *, retain_bank: Tensor, pooling: str, layer: int, neighbours: int,
                 layer_indices: Sequence[int], layers_path: str, hidden_size: int, mode: str = "prefill",
                 fingerprint: dict[str, Any] | None = None, device: str | torch.device = "cpu"):
        if retain_bank.ndim != 2 or retain_bank.shape[1] != hidden_size:
            raise ValueError(f"retain_bank must be [S, {hidden_size}], got {list(retain_bank.shape)}")
        gating.window_width(pooling)  # ValueError for an unknown pooling
        if neighbours < 1:
            raise ValueError("neighbours must be >= 1")
        self.pooling, self.layer, self.neighbours = pooling, int(layer), int(neighbours)
        self.layer_indices = tuple(int(i) for i in layer_indices)
        self.layers_path, self.hidden_size, self.mode = layers_path, int(hidden_size), mode
        self.fingerprint = fingerprint
        self.device = torch.device(device)
        self._lock = threading.RLock()
        self._shared16 = retain_bank.detach().cpu().to(torch.float16)  # the original, for to_eraser and checks
        d, L = self.hidden_size, len(self.layer_indices)
        self._shared = self._shared16.to(device=self.device, dtype=torch.float32)
        self._shared_segments = self._retain_segments()
        # forget rows
        self._bank = torch.zeros(0, d, device=self.device)
        self._column = torch.zeros(0, dtype=torch.int64, device=self.device)
        self._rows_used = 0  # rows [0, used) have been handed out at least once: only they are scored
        self._free_rows: list[int] = []
        # slots
        self._r = torch.zeros(0, L, d, device=self.device)
        self._alpha = torch.zeros(0, device=self.device)
        self._threshold = torch.zeros(0, device=self.device)
        self._count = torch.zeros(0, dtype=torch.int64, device=self.device)  # min(n, rows of the slot)
        self._active = torch.zeros(0, dtype=torch.bool, device=self.device)
        self._table = torch.zeros(0, 0, dtype=torch.int64, device=self.device)  # n > 1: 1 + row, 0 padding
        self._slot_rows: list[Tensor | None] = []
        self._requests: list[dict[str, Any] | None] = []
        self._free_slots: list[int] = []
        self._names: dict[str, list[int]] = {}

    # ---- construction -----------------------------------------------------------------------------

    @classmethod
    def like(cls, eraser: Eraser, device: str | torch.device = "cpu") -> RequestIndex:
        """An empty index for requests like `eraser` (its model, layers, gate settings and retain bank)."""
        gate = _knn_gate(eraser)
        return cls(retain_bank=_retain_bank(gate), pooling=gate.pooling, layer=gate.layer,
                   neighbours=gate.neighbours, layer_indices=eraser.layer_indices, layers_path=eraser.layers_path,
                   hidden_size=eraser.hidden_size, mode=eraser.mode, fingerprint=eraser.fingerprint, device=device)

    @classmethod
    def from_eraser(cls, eraser: Eraser, name: str | None = None, device: str | torch.device = "cpu") -> RequestIndex:
        """An index of `eraser`'s terms: one request per index name recorded in its metadata (an eraser written
        by `to_eraser`), else one request of all its terms, named `name` (default: its first request's name)."""
        index = cls.like(eraser, device)
        requests = eraser.requests()
        recorded = [request.get(NAME_KEY) for request in requests]
        if name is None and all(isinstance(n, str) for n in recorded):
            groups: dict[str, list[int]] = {}
            for term, n in enumerate(recorded):
                groups.setdefault(n, []).append(term)
        else:
            groups = {name or str(requests[0].get("name", "request")): list(range(eraser.num_terms))}
        index._check(eraser)
        gate = eraser.prompt_gate
        rows_of = _rows_by_term(gate.forget_owner, eraser.num_terms)
        with index._lock:
            for group_name, terms in groups.items():
                index._insert(group_name, [gate.forget_bank[rows_of[k]] for k in terms], eraser.r[terms],
                              [eraser.alpha[k] for k in terms], [gate.threshold[k] for k in terms],
                              [requests[k] for k in terms])
        return index

    # ---- add and remove ---------------------------------------------------------------------------

    def add(self, name: str, eraser: Eraser) -> list[int]:
        """Insert `eraser`'s terms as request `name`; returns their slots. O(the eraser's size), amortised.
        ValueError where the eraser cannot join (another model, layers, mode, gate or retain bank; a taken
        name)."""
        self._check(eraser)
        gate = eraser.prompt_gate
        rows_of = _rows_by_term(gate.forget_owner, eraser.num_terms)
        with self._lock:
            return self._insert(name, [gate.forget_bank[rows] for rows in rows_of], eraser.r, eraser.alpha,
                                gate.threshold, eraser.requests())

    def remove(self, name: str) -> None:
        """Withdraw request `name`: its rows and slots are freed (zeroed, never fire) for later requests.
        O(the request's size). KeyError for an unknown name."""
        with self._lock:
            if name not in self._names:
                raise KeyError(f"no request named {name!r} in the index")
            slots = self._names.pop(name)
            at = torch.tensor(slots, dtype=torch.int64, device=self.device)
            self._threshold[at] = math.inf  # first: from here on these slots never fire
            self._active[at] = False
            rows = torch.cat([self._slot_rows[s] for s in slots])
            rows_at = rows.to(self.device)
            self._column[rows_at] = 0
            self._bank[rows_at] = 0.0  # a withdrawn request's activations do not linger in free rows
            if self.neighbours > 1:
                self._table[at] = 0
            self._count[at] = 0
            self._r[at] = 0.0
            self._alpha[at] = 0.0
            for slot in slots:
                self._slot_rows[slot], self._requests[slot] = None, None
            self._free_slots.extend(reversed(slots))
            self._free_rows.extend(reversed(rows.tolist()))

    def _check(self, eraser: Eraser) -> None:
        """ValueError saying why `eraser` cannot join this index, or nothing."""
        gate = _knn_gate(eraser)
        for name, mine, theirs in (("pooling", self.pooling, gate.pooling), ("decision layer", self.layer, gate.layer),
                                   ("neighbours", self.neighbours, gate.neighbours),
                                   ("layer_indices", self.layer_indices, eraser.layer_indices),
                                   ("layers_path", self.layers_path, eraser.layers_path),
                                   ("hidden_size", self.hidden_size, eraser.hidden_size), ("mode", self.mode, eraser.mode)):
            if mine != theirs:
                raise ValueError(f"cannot add to the index: {name} {theirs!r}, the index's is {mine!r}")
        if self.fingerprint is not None and eraser.fingerprint is not None:
            key = fingerprint_mismatch(self.fingerprint, eraser.fingerprint)
            if key is not None:
                raise ValueError(f"cannot add to the index: fitted on another model (its {key} differs)")
        if not gating.same_bank(_retain_bank(gate), self._shared16):
            raise ValueError("cannot add to the index: fitted on another retain bank (an index shares one retain "
                             "bank between all its requests)")

    def _insert(self, name: str, forget: list[Tensor], r: Tensor, alpha: Sequence[float], threshold: Sequence[float],
                requests: list[dict[str, Any]]) -> list[int]:
        """Write K terms (forget rows per term, r [K, L, d], alpha, tau, metadata) into free slots and rows."""
        if name in self._names:
            raise ValueError(f"an index request named {name!r} exists: remove it first")
        K, sizes = len(forget), [f.shape[0] for f in forget]
        self._reserve(K, sum(sizes), max(sizes, default=0))
        slots = [self._free_slots.pop() for _ in range(K)]
        rows = self._take_rows(sum(sizes))
        at = torch.tensor(slots, dtype=torch.int64, device=self.device)
        term = torch.repeat_interleave(torch.arange(K), torch.tensor(sizes, dtype=torch.int64))
        rows_at = rows.to(self.device)
        self._bank[rows_at] = torch.cat(forget).to(device=self.device, dtype=torch.float32)
        self._column[rows_at] = (torch.tensor(slots, dtype=torch.int64)[term] + 1).to(self.device)
        per_slot = list(rows.split(sizes))
        if self.neighbours > 1:
            self._table[at] = 0
            for slot, slot_rows in zip(slots, per_slot):
                self._table[slot, : slot_rows.numel()] = (slot_rows + 1).to(self.device)
        self._count[at] = torch.tensor(sizes, dtype=torch.int64).clamp(max=self.neighbours).to(self.device)
        self._r[at] = r.to(device=self.device, dtype=torch.float32)
        self._alpha[at] = torch.tensor(list(alpha), dtype=torch.float32, device=self.device)
        for slot, slot_rows, request in zip(slots, per_slot, requests):
            self._slot_rows[slot], self._requests[slot] = slot_rows, dict(request)
        self._active[at] = True
        # last: a slot fires only once everything it steers with is in place
        self._threshold[at] = torch.tensor(list(threshold), dtype=torch.float32, device=self.device)
        self._names[name] = slots
        return slots

    def _take_rows(self, count: int) -> Tensor:
        """`count` free rows (reused ones first), as a CPU int64 tensor."""
        reused = [self._free_rows.pop() for _ in range(min(count, len(self._free_rows)))]
        fresh = list(range(self._rows_used, self._rows_used + count - len(reused)))
        self._rows_used += len(fresh)
        return torch.tensor(reused + fresh, dtype=torch.int64)

    def _reserve(self, slots: int, rows: int, width: int) -> None:
        """Grow (doubling) the slot buffers, the row buffers and the table so `slots` slots, `rows` rows and
        `width` rows in one slot fit."""
        if slots > len(self._free_slots):
            old = self._r.shape[0]
            new = max(2 * old, old + slots - len(self._free_slots), 8)
            self._r = _grown(self._r, new)
            self._alpha = _grown(self._alpha, new)
            self._threshold = _grown(self._threshold, new, math.inf)
            self._count = _grown(self._count, new)
            self._active = _grown(self._active, new)
            self._table = _grown(self._table, new)
            self._slot_rows += [None] * (new - old)
            self._requests += [None] * (new - old)
            self._free_slots = list(range(new - 1, old - 1, -1)) + self._free_slots  # lower slots first
        room = len(self._free_rows) + self._bank.shape[0] - self._rows_used
        if rows > room:
            old = self._bank.shape[0]
            new = max(2 * old, old + rows - room, 64)
            self._bank, self._column = _grown(self._bank, new), _grown(self._column, new)
        if self.neighbours > 1 and width > self._table.shape[1]:
            old = self._table.shape[1]
            wider = torch.zeros(self._table.shape[0], max(2 * old, width), dtype=torch.int64, device=self.device)
            wider[:, :old] = self._table
            self._table = wider

    # ---- scoring ----------------------------------------------------------------------------------

    def scores(self, z: Tensor) -> Tensor:
        """s_k(z) for pooled features z [batch, d] (or the max over segments z [batch, S, d], gating's
        "segments"): [batch, slots] float32 on the index's device, -inf for a free slot."""
        with self._lock:
            return gating.max_over_segments(z.to(device=self.device, dtype=torch.float32), self._row_scores)

    def _row_scores(self, z: Tensor) -> Tensor:
        """The slots' scores [batch, slots] of single feature rows (the caller holds the lock)."""
        z = gating.unit_rows(z)
        batch, slots = z.shape[0], self._r.shape[0]
        similarity = z @ self._bank[: self._rows_used].T
        if self.neighbours == 1:
            out = similarity.new_full((batch, slots + 1), -math.inf)
            out.scatter_reduce_(1, self._column[: self._rows_used].expand(batch, -1), similarity, "amax")
            forget = out[:, 1:]  # column 0 collects the free rows
        elif self._table.shape[1]:
            padded = torch.cat([similarity.new_full((batch, 1), -math.inf), similarity], dim=1)
            top = padded[:, self._table].topk(min(self.neighbours, self._table.shape[1]), dim=2).values
            forget = gating.mean_of_top(top, self._count, self.neighbours)
        else:
            forget = similarity.new_full((batch, slots), -math.inf)
        retain = gating.segment_top_mean(z @ self._shared.T, self._shared_segments)  # [batch, 1]: every slot's
        return torch.where(self._active, gating.ratio_score(forget, retain), -math.inf)

    def decide(self, z: Tensor) -> Tensor:
        """g [batch, slots] float32 in {0, 1}: which slots fire for each prompt (free slots never do)."""
        with self._lock:
            return (self.scores(z) > self._threshold).to(torch.float32)

    def prompt_decision(self, z: Tensor) -> PromptDecision:
        """The hooks' view (prompt_steering.PromptTerms): scores, decisions and the fired slots' r and alpha, copied under
        the lock, so a request removed later does not change a prompt already decided."""
        with self._lock:
            scores = self.scores(z)
            fires = (scores > self._threshold).to(torch.float32)
            fired = fires.any(dim=0).nonzero().flatten()
            return PromptDecision(scores, fires, fired, self._r.index_select(0, fired),
                                  self._alpha.index_select(0, fired))

    # ---- views ------------------------------------------------------------------------------------

    def names(self) -> list[str]:
        with self._lock:
            return list(self._names)

    def slots(self, name: str) -> list[int]:
        with self._lock:
            return list(self._names[name])

    def term_slots(self) -> list[int]:
        """Every active slot, in to_eraser's term order (requests in insertion order, each request's terms)."""
        with self._lock:
            return [slot for slots in self._names.values() for slot in slots]

    @property
    def num_terms(self) -> int:
        with self._lock:
            return sum(len(slots) for slots in self._names.values())

    @property
    def capacity(self) -> dict[str, int]:
        """Slots and forget rows allocated, and forget rows handed out at least once (the ones scored)."""
        with self._lock:
            return {"slots": self._r.shape[0], "rows": self._bank.shape[0], "rows_used": self._rows_used,
                    "free_slots": len(self._free_slots), "free_rows": len(self._free_rows) + self._bank.shape[0] - self._rows_used}

    def memory_bytes(self) -> int:
        """Bytes held: the banks (forget, shared retain and its float16 original), directions and per-slot
        vectors, at the allocated capacity."""
        with self._lock:
            tensors = (self._bank, self._column, self._shared, self._shared16, self._r, self._alpha, self._threshold,
                       self._count, self._active, self._table)
            return sum(t.numel() * t.element_size() for t in tensors)

    def to(self, device: str | torch.device) -> RequestIndex:
        """Move every buffer to `device` (in place; returns self)."""
        with self._lock:
            self.device = torch.device(device)
            for name in ("_bank", "_column", "_shared", "_r", "_alpha", "_threshold", "_count", "_active", "_table"):
                setattr(self, name, getattr(self, name).to(self.device))
            self._shared_segments = self._retain_segments()
            return self

    def _retain_segments(self) -> gating.Segments:
        owner = torch.full((self._shared.shape[0],), gating.SHARED, dtype=torch.int64, device=self.device)
        return gating.segments(owner, 1, self.neighbours)

    def to_eraser(self) -> Eraser:
        """The active requests as one Eraser (terms in term_slots order, each term's metadata with its index
        name under "index_name"), e.g. to save; RequestIndex.from_eraser reads it back."""
        with self._lock:
            slots = self.term_slots()
            if not slots:
                raise ValueError("the index holds no request: an eraser needs at least one term")
            names = [name for name, s in self._names.items() for _ in s]
            rows = [self._slot_rows[slot] for slot in slots]
            at = torch.tensor(slots, dtype=torch.int64, device=self.device)
            rows_at = torch.cat(rows).to(self.device)
            forget_owner = torch.repeat_interleave(torch.arange(len(slots)),
                                                   torch.tensor([r.numel() for r in rows], dtype=torch.int64))
            gate = gating.PromptGate(
                kind="knn", pooling=self.pooling, layer=self.layer, neighbours=self.neighbours,
                threshold=self._threshold[at].tolist(),
                forget_bank=self._bank[rows_at].cpu().to(torch.float16), forget_owner=forget_owner,
                retain_bank=self._shared16,
                retain_owner=torch.full((self._shared16.shape[0],), gating.SHARED, dtype=torch.int64))
            metadata: dict[str, Any] = {"requests": [{**self._requests[slot], NAME_KEY: name}
                                                     for slot, name in zip(slots, names)]}
            if self.fingerprint is not None:
                metadata["fingerprint"] = self.fingerprint
            return Eraser(u=None, prompt_gate=gate, r=self._r[at].cpu(), alpha=self._alpha[at].tolist(),
                          layer_indices=self.layer_indices, layers_path=self.layers_path,
                          hidden_size=self.hidden_size, mode=self.mode, metadata=metadata)

    # ---- attaching --------------------------------------------------------------------------------

    def attach(self, model: nn.Module, check_fingerprint: bool = True) -> SteeringHandle:
        """Hook the model like Eraser.attach, steering with the index's state at each prompt's decision (add
        and remove take effect from the next prompt, with no re-attaching). Moves the index to the decision
        layer's device. UserInputError where the model is not the one the index's requests were fitted on."""
        fingerprint = self.fingerprint if check_fingerprint else None
        layers = check_compatible(model, hidden_size=self.hidden_size, layer_indices=self.layer_indices,
                                  layers_path=self.layers_path, fingerprint=fingerprint, what="index")
        decision_layer = layers[self.layer]
        parameter = next(decision_layer.parameters(), None)
        if parameter is not None and parameter.device != self.device and not parameter.is_meta:
            self.to(parameter.device)
        return attach_prompt_terms(model, decision_layer, [layers[i] for i in self.layer_indices], self, self.mode,
                                   first_layer=layers[0])


def _knn_gate(eraser: Eraser) -> gating.PromptGate:
    gate = eraser.prompt_gate
    if gate is None or gate.kind != "knn":
        kind = "a per-layer gate" if gate is None else f"a {gate.kind} prompt gate"
        raise ValueError(f"the index holds knn prompt gates, this eraser has {kind}")
    return gate


def _retain_bank(gate: gating.PromptGate) -> Tensor:
    """The one retain bank every term of `gate` reads, [S, d] float16: its shared rows, or (an artifact from
    before shared rows) each term's own rows where all terms own the same ones. ValueError otherwise."""
    owned = gate.retain_owner != gating.SHARED
    if not bool(owned.any()):
        return gate.shared_rows
    if not bool(owned.all()):
        raise ValueError("the index needs one retain bank for every term: this gate mixes shared and per-term rows")
    per_term = [gate.retain_bank[rows] for rows in _rows_by_term(gate.retain_owner, gate.num_terms)]
    if not all(gating.same_bank(per_term[0], bank) for bank in per_term[1:]):
        raise ValueError("the index needs one retain bank for every term: this gate's terms were fitted on "
                         "different retain banks")
    return per_term[0]


def _rows_by_term(owner: Tensor, num_terms: int) -> list[Tensor]:
    """Each term's rows of a bank, in bank order: one stable sort, whatever the number of terms."""
    order = torch.argsort(owner, stable=True)
    counts = torch.bincount(owner, minlength=num_terms)[:num_terms].tolist()
    return list(order[owner[order] >= 0].split(counts))


def _grown(t: Tensor, size: int, fill: float = 0) -> Tensor:
    """`t` with its first dimension grown to `size`, new entries `fill`."""
    out = torch.full((size, *t.shape[1:]), fill, dtype=t.dtype, device=t.device)
    out[: t.shape[0]] = t
    return out
