"""A prompt gate as hooks: at the decision layer, the prompt is pooled and decided once (g [batch, K] from a
PromptTerms: an Eraser's fixed gate, or a RequestIndex that changes between prompts); at every steered layer,
(g * alpha) @ r[:, l] over the fired terms only is added to the prompt's positions.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from . import gating
from .attachment import STEERING_MODES, SteeringHandle, SteeringHook, SteeringMode, new_handle, per_row
from .capture import layer_input
from .devices import on_device


@dataclass(frozen=True)
class PromptDecision:
    """A prompt gate's decision for a batch of prompts, with what it steers: scores s [B, K], g [B, K] in
    {0, 1}, and for the terms `fired` [F] (those with g = 1 in some row) their directions r [F, L, d] and
    strengths alpha [F], float32, on any device. Taken from one consistent state of the terms' source."""

    scores: Tensor
    fires: Tensor
    fired: Tensor
    r: Tensor
    alpha: Tensor


class PromptTerms:
    """What PromptSteering reads when it decides a prompt: the pooling of the gate's input, and
    `prompt_decision` (z [B, d] -> PromptDecision). A source may change between prompts (index.RequestIndex: requests added and
    withdrawn while attached); a prompt keeps the decision, directions and strengths it was decided with."""

    pooling: str

    def prompt_decision(self, z: Tensor) -> PromptDecision:
        raise NotImplementedError


class FixedPromptTerms(PromptTerms):
    """A fixed gate with directions r [K, L, d] and strengths alpha [K] (an Eraser's): r is moved once per
    device, and only the fired terms' rows are taken per prompt."""

    def __init__(self, gate: gating.PromptGate, r: Tensor, alpha: Tensor):
        self.gate, self.pooling = gate, gate.pooling
        self.r, self.alpha = r.float(), alpha.float()
        self._on: dict[torch.device, tuple[Tensor, Tensor]] = {}

    def prompt_decision(self, z: Tensor) -> PromptDecision:
        r, alpha = on_device(self._on, z.device, lambda device: (self.r.to(device), self.alpha.to(device)))
        scores = self.gate.scores(z)
        fires = self.gate.fires(scores)
        fired = fires.any(dim=0).nonzero().flatten()
        return PromptDecision(scores, fires, fired, r.index_select(0, fired), alpha.index_select(0, fired))


class FiredTerms:
    """The steering of one decided prompt, sparse in the terms: with w = (g * alpha)[:, fired] [B, F] (columns
    of terms that fire for some row), block l gets w @ r[fired, l], O(B F d) per layer whatever K is; nothing
    at all (None) where no term fires for any row."""

    def __init__(self, decisions: Tensor, decision: PromptDecision):
        weights = decisions.index_select(1, decision.fired.to(decisions.device)) * decision.alpha.to(decisions.device)
        # row_terms may have switched a fired term off in every row: such a column adds only zeros
        live = weights.ne(0).any(dim=0).nonzero().flatten()
        self.count = int(live.numel())
        self._on: dict[torch.device, tuple[Tensor, Tensor]] = {}
        if self.count:
            r = decision.r.index_select(0, live.to(decision.r.device))
            # [L, F, d], contiguous per layer: one plain [B, F] @ [F, d] product per steered layer
            self.terms = (weights.index_select(1, live), r.transpose(0, 1).contiguous().to(weights.device))

    def delta(self, position: int, hidden: Tensor) -> Tensor | None:
        """sum_k alpha_k g_k r[k, position] for each row of the forward in flight [batch, d], or None."""
        if not self.count:
            return None
        weights, r = on_device(self._on, hidden.device, lambda device: tuple(t.to(device) for t in self.terms))
        return per_row(weights, hidden.shape[0]) @ r[position]


class PromptSteering(SteeringHook):
    """Forward hook of one layer under a prompt gate: at the decision layer (`decides`), pool the prompt and
    decide g [batch, K] once per prompt from `terms`; at every steered layer (`position` in the steered list,
    None for a decision layer that is not steered), add (g * alpha) @ r[:, position] to the prompt's positions,
    over the fired terms only (FiredTerms)."""

    def __init__(self, handle: SteeringHandle, terms: PromptTerms, decides: bool, position: int | None, mode: str):
        self.handle, self.terms, self.decides, self.position, self.mode = handle, terms, decides, position, mode

    def steer(self, module: nn.Module, hidden: Tensor, positions: slice | None) -> Tensor | None:
        handle = self.handle
        prompt = handle.prompt
        if self.decides and prompt.decisions is None:
            pooling = self.terms.pooling
            if handle.start == 0 and positions is not None and positions.stop == prompt.length:
                # An embeddings pooling reads this forward's input to the first decoder layer (DecoderInputRead).
                source = handle.decoder_input if gating.reads_embeddings(pooling) else hidden
                # generate's own mask (the fallback where its forward gets none) has a row per prompt, not per
                # expanded row (beams)
                mask = None if prompt.mask is None else per_row(prompt.mask.to(source.device), source.shape[0])
                z = gating.pool(source[:, : prompt.length], mask, pooling)
            else:  # the forward holds part of the prompt (chunked prefill): decide from all of it first
                z = handle.prompt_features(module, pooling)
            handle.decoder_input = None  # read once per prompt: not held through the decode steps
            decision = self.terms.prompt_decision(z)
            prompt.scores = decision.scores
            prompt.decisions = handle.masked(decision.fires)
            prompt.fired = FiredTerms(prompt.decisions, decision)
        if self.position is None or prompt.fired is None:
            return None  # the decision layer is not itself steered, or this prompt was never decided
        return prompt.fired.delta(self.position, hidden)


class DecoderInputRead:
    """Forward pre-hook on the decoder's first layer, for a gate that pools the decoder's input embeddings
    (gating.reads_embeddings): keeps the input of the forward in flight for the decision layer's hook."""

    def __init__(self, handle: SteeringHandle):
        self.handle = handle

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if not self.handle._suspended:
            self.handle.decoder_input = layer_input(args, kwargs)


def attach_prompt_steering(
    model: nn.Module,
    decision_layer: nn.Module,
    layers: Sequence[nn.Module],
    gate: gating.PromptGate,
    r: Tensor,
    alpha: Sequence[float],
    mode: SteeringMode = "prefill",
    first_layer: nn.Module | None = None,
) -> SteeringHandle:
    """Hook `layers` (all at or after `decision_layer` in the forward) so block l's output gets
    + sum_k alpha_k g_k r[k, l] on the prompt's positions, with g = gate.decide(pooled prompt at
    `decision_layer`) made once per prompt (see SteeringHandle for what a prompt is on each generation path).

    The attention mask is read from the model's own forward call (a pre-hook on `model`), so left and right
    padding both pool the real positions only. mode 'prefill' steers the prompt's positions; 'all' also steers
    generated positions, with the prompt's decision. Same one-attachment rule as attach_steering. A gate that
    pools the decoder's input embeddings needs `first_layer`, the decoder's first layer (its input is read).
    """
    num_terms = gate.num_terms
    if r.ndim != 3 or r.shape[0] != num_terms or r.shape[1] != len(layers):
        raise ValueError(f"r must be [K={num_terms}, {len(layers)}, d], got {list(r.shape)}")
    if len(alpha) != num_terms:
        raise ValueError(f"alpha needs {num_terms} values")
    terms = FixedPromptTerms(gate, r, torch.tensor(alpha, dtype=torch.float32))
    return attach_prompt_terms(model, decision_layer, layers, terms, mode, first_layer)


def attach_prompt_terms(
    model: nn.Module,
    decision_layer: nn.Module,
    layers: Sequence[nn.Module],
    terms: PromptTerms,
    mode: SteeringMode = "prefill",
    first_layer: nn.Module | None = None,
) -> SteeringHandle:
    """attach_prompt_steering over any PromptTerms: `terms.prompt_decision` is called once per prompt, so a source that
    changes (index.RequestIndex) steers each new prompt with its state at that prompt's decision."""
    if mode not in STEERING_MODES:
        raise ValueError(f"mode must be one of {STEERING_MODES}, got {mode!r}")
    embeddings = gating.reads_embeddings(terms.pooling)
    if embeddings and first_layer is None:
        raise ValueError(f"a {terms.pooling} gate reads the decoder's input: pass its first layer (first_layer)")
    handle = new_handle(model)
    try:
        handle.start_tracking()
        if embeddings:
            handle.first_layer = first_layer
            handle.hook_layer_input(first_layer, DecoderInputRead(handle))
        steered = {id(layer): index for index, layer in enumerate(layers)}
        if id(decision_layer) not in steered:
            hook = PromptSteering(handle, terms, True, None, mode)
            handle.hook_layer(decision_layer, hook)
        for index, layer in enumerate(layers):
            hook = PromptSteering(handle, terms, layer is decision_layer, index, mode)
            handle.hook_layer(layer, hook)
    except BaseException:
        handle.remove()
        raise
    return handle
