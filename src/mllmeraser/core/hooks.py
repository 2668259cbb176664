"""Attaching steering to a model: find its decoder layers, capture last-token activations, add the term.

Hooks only (forward hooks on the decoder layers, removed in `finally`); modules are never replaced, so
state_dict keys and the model's own code stay untouched.

Decoder layers in transformers v5 return a Tensor (the hidden states); older code returned a tuple whose
first element is the hidden states. Both are handled.
"""

from __future__ import annotations

from collections.abc import Sequence
from types import TracebackType
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from ..errors import UserInputError
from .families import FAMILIES
from . import gating
from .steering import steering_term

SteeringMode = Literal["prefill", "all"]
STEERING_MODES: tuple[str, ...] = ("prefill", "all")

ATTACHED_MARKER = "_mllmeraser_steering"
"""Attribute set on a model while a SteeringHandle is attached to it."""

_OVERRIDE_HINT = "pass --layers-path with the dotted path to the text decoder's layer ModuleList"


def find_decoder_layers(model: nn.Module, path: str | None = None) -> tuple[list[str], list[nn.Module]]:
    """Dotted names and modules of the text decoder layers, from `path` or the family's (`families.FAMILIES`)."""
    if path is None:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        if model_type not in FAMILIES:
            raise UserInputError(
                None, f"no known decoder-layer path for model_type {model_type!r}: {_OVERRIDE_HINT}"
            )
        path = FAMILIES[model_type].layers_path
    try:
        layer_list = model.get_submodule(path)
    except AttributeError as error:
        raise UserInputError(None, f"layers path {path!r} does not resolve ({error}): {_OVERRIDE_HINT}") from None
    if not isinstance(layer_list, nn.ModuleList) or len(layer_list) == 0:
        found = type(layer_list).__name__ if not isinstance(layer_list, nn.ModuleList) else "an empty ModuleList"
        raise UserInputError(None, f"layers path {path!r} is {found}, not a non-empty ModuleList: {_OVERRIDE_HINT}")
    return [f"{path}.{i}" for i in range(len(layer_list))], list(layer_list)


def _hidden_states(output: Any) -> Tensor:
    """The hidden states [batch, seq, d] of a decoder layer's output: a Tensor (v5) or a tuple's first item."""
    if isinstance(output, Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]
    raise TypeError(f"cannot find hidden states in a decoder layer output of type {type(output).__name__}")


def _replace_hidden_states(output: Any, hidden: Tensor) -> Any:
    if isinstance(output, Tensor):
        return hidden
    return type(output)((hidden, *output[1:]))


class _StopForward(Exception):
    """Raised by a capture hook once every requested layer has been seen: skips the rest of the model."""


def capture_last_token(model: nn.Module, layers: Sequence[nn.Module], **inputs: Any) -> Tensor:
    """Block outputs at the last position for each of `layers`, [batch, num_layers, d] float32 on CPU.

    Runs `model(**inputs)` under no_grad; inputs must be LEFT-padded so the last position is the last
    prompt token of every row. The forward stops right after the last requested layer. Hooks already on
    the model (e.g. an attached eraser) run first, so their effect is included.
    """
    return capture(model, layers, **inputs)[0]


def capture(model: nn.Module, layers: Sequence[nn.Module], pooled_layer: int | None = None, pooling: str = "mean",
            **inputs: Any) -> tuple[Tensor, Tensor | None]:
    """(last-position block outputs [batch, num_layers, d], and the pooled prompt feature [batch, d] of
    `layers[pooled_layer]` under the inputs' attention mask (gating.pool), or None), float32 on CPU, from one
    forward pass that stops after the last requested layer. Inputs must be left-padded (see capture_last_token).
    """
    captured: list[Tensor | None] = [None] * len(layers)
    pooled: list[Tensor] = []
    mask = inputs.get("attention_mask")

    def make_hook(index: int):
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            hidden = _hidden_states(output)
            captured[index] = hidden[:, -1, :].to(device="cpu", dtype=torch.float32)
            if index == pooled_layer:
                pooled.append(gating.pool(hidden, _mask_for(mask, hidden), pooling).cpu())
            if all(c is not None for c in captured):
                raise _StopForward

        return hook

    handles = []
    try:
        for index, layer in enumerate(layers):
            handles.append(layer.register_forward_hook(make_hook(index)))
        with torch.no_grad():
            model(**inputs)
    except _StopForward:
        pass
    finally:
        for handle in handles:
            handle.remove()
    missing = [index for index, c in enumerate(captured) if c is None]
    if missing:
        raise RuntimeError(f"the forward pass never reached the layers at positions {missing}")
    return torch.stack(captured, dim=1), (pooled[0] if pooled else None)  # type: ignore[arg-type]


def _mask_for(mask: Tensor | None, hidden: Tensor) -> Tensor | None:
    """The 2-D attention mask's columns for the positions `hidden` holds (the last seq of them: a forward
    that extends a KV cache sees only its new positions)."""
    if mask is None or mask.ndim != 2:
        return None
    return mask[:, -hidden.shape[1]:] if mask.shape[1] >= hidden.shape[1] else None


class _LayerSteering:
    """Forward hook of one layer: output += steering_term(output[:, -1, :], u, r, alpha, floor, cap)."""

    def __init__(self, u: Tensor, r: Tensor, alpha: Tensor, floor: Tensor, cap: Tensor, mode: str):
        self.terms = (u, r, alpha, floor, cap)  # u, r: [K, d]; alpha, floor, cap: (K,); float32
        self.mode = mode

    def __call__(self, module: nn.Module, args: Any, output: Any) -> Any:
        hidden = _hidden_states(output)
        if self.mode == "prefill" and hidden.shape[1] <= 1:
            return None  # a decode step: the prefill's steering reaches it through the KV cache
        if self.terms[0].device != hidden.device:
            self.terms = tuple(t.to(hidden.device) for t in self.terms)
        delta = steering_term(hidden[:, -1, :], *self.terms)  # [batch, d] float32
        return _replace_hidden_states(output, hidden + delta[:, None, :].type_as(hidden))


class SteeringHandle:
    """Steering hooks attached to one model; `.remove()` (idempotent) or use as a context manager."""

    def __init__(self, model: nn.Module):
        self.model = model
        self._hooks: list[RemovableHandle] = []
        # A prompt gate's state: the 2-D attention mask of the forward in flight (read by a pre-hook on the
        # model), and the last decisions g [batch, K] and scores s [batch, K] of the decision layer.
        self.attention_mask: Tensor | None = None
        self.decisions: Tensor | None = None
        self.scores: Tensor | None = None

    @property
    def attached(self) -> bool:
        return getattr(self.model, ATTACHED_MARKER, None) is self

    def remove(self) -> None:
        """Remove every hook this handle added and the model's marker; a second call does nothing."""
        try:
            for hook in self._hooks:
                hook.remove()
        finally:
            self._hooks.clear()
            if self.attached:
                delattr(self.model, ATTACHED_MARKER)

    def __enter__(self) -> SteeringHandle:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.remove()


def attach_steering(
    model: nn.Module,
    layers: Sequence[nn.Module],
    u: Tensor,
    r: Tensor,
    alpha: Sequence[float],
    floor: Sequence[float],
    cap: Sequence[float],
    mode: SteeringMode = "prefill",
) -> SteeringHandle:
    """Hook `layers` so block l's output gets + sum_k alpha_k shape_gate(h_last . u[k, l]) r[k, l].

    h_last is each row's last position, so batches must be LEFT-padded.
    u, r: [K, len(layers), d]; alpha, floor, cap: K values. mode 'prefill' (the paper) steers only forwards
    with sequence length > 1; 'all' steers every forward, single-token decode steps included. At most one
    attachment per model: a second raises RuntimeError until the first handle is removed.

    The hooks are prepended, so every other forward hook on a layer sees the steered output, whenever it was
    registered (transformers 5 installs its output_hidden_states hooks lazily, on first use).
    """
    if mode not in STEERING_MODES:
        raise ValueError(f"mode must be one of {STEERING_MODES}, got {mode!r}")
    num_terms = u.shape[0]
    if u.ndim != 3 or u.shape != r.shape or u.shape[1] != len(layers):
        raise ValueError(f"u and r must both be [K, {len(layers)}, d], got {list(u.shape)} and {list(r.shape)}")
    if not len(alpha) == len(floor) == len(cap) == num_terms:
        raise ValueError(f"alpha, floor and cap need {num_terms} values each")
    per_term = [torch.tensor(values, dtype=torch.float32) for values in (alpha, floor, cap)]
    handle = _new_handle(model)
    try:
        for index, layer in enumerate(layers):
            hook = _LayerSteering(u[:, index].float(), r[:, index].float(), *per_term, mode=mode)
            handle._hooks.append(layer.register_forward_hook(hook, prepend=True))
    except BaseException:
        handle.remove()
        raise
    return handle


def _new_handle(model: nn.Module) -> SteeringHandle:
    if hasattr(model, ATTACHED_MARKER):
        raise RuntimeError("an eraser is already attached to this model: remove its handle before attaching another")
    handle = SteeringHandle(model)
    setattr(model, ATTACHED_MARKER, handle)
    return handle


class _PromptSteering:
    """Forward hook of one layer under a prompt gate: at the decision layer, pool the prompt and decide
    g [batch, K] once; at every steered layer, output += (g * alpha) @ r_l."""

    def __init__(self, handle: SteeringHandle, gate: gating.PromptGate | None, r: Tensor | None, alpha: Tensor,
                 mode: str):
        self.handle, self.gate, self.r, self.alpha, self.mode = handle, gate, r, alpha, mode

    def __call__(self, module: nn.Module, args: Any, output: Any) -> Any:
        hidden = _hidden_states(output)
        prefill = hidden.shape[1] > 1
        if not prefill and self.mode == "prefill":
            return None  # a decode step: the prefill's steering reaches it through the KV cache
        handle = self.handle
        if self.gate is not None and (prefill or handle.decisions is None):
            z = gating.pool(hidden, _mask_for(handle.attention_mask, hidden), self.gate.pooling)
            handle.scores = self.gate.scores(z)
            handle.decisions = self.gate.fires(handle.scores)
        if self.r is None:
            return None  # the decision layer is not itself steered
        if self.r.device != hidden.device:
            self.r, self.alpha = self.r.to(hidden.device), self.alpha.to(hidden.device)
        delta = (handle.decisions.to(hidden.device) * self.alpha) @ self.r  # [batch, d] float32
        return _replace_hidden_states(output, hidden + delta[:, None, :].type_as(hidden))


def attach_prompt_steering(
    model: nn.Module,
    decision_layer: nn.Module,
    layers: Sequence[nn.Module],
    gate: gating.PromptGate,
    r: Tensor,
    alpha: Sequence[float],
    mode: SteeringMode = "prefill",
) -> SteeringHandle:
    """Hook `layers` (all at or after `decision_layer` in the forward) so block l's output gets
    + sum_k alpha_k g_k r[k, l], with g = gate.decide(pooled prompt at `decision_layer`) made once per prompt.

    The attention mask is read from the model's own forward call (a pre-hook on `model`), so left and right
    padding both pool the real positions only. mode 'prefill' decides and steers on forwards with more than one
    position; 'all' also steers single-token decode steps, with the prefill's decision. Same one-attachment
    rule as attach_steering.
    """
    if mode not in STEERING_MODES:
        raise ValueError(f"mode must be one of {STEERING_MODES}, got {mode!r}")
    num_terms = gate.num_terms
    if r.ndim != 3 or r.shape[0] != num_terms or r.shape[1] != len(layers):
        raise ValueError(f"r must be [K={num_terms}, {len(layers)}, d], got {list(r.shape)}")
    if len(alpha) != num_terms:
        raise ValueError(f"alpha needs {num_terms} values")
    handle = _new_handle(model)
    alpha_t = torch.tensor(alpha, dtype=torch.float32)

    def read_mask(module: nn.Module, args: Any, kwargs: dict) -> None:
        mask = kwargs.get("attention_mask")
        handle.attention_mask = mask if isinstance(mask, Tensor) and mask.ndim == 2 else None

    try:
        handle._hooks.append(model.register_forward_pre_hook(read_mask, with_kwargs=True))
        steered = {id(layer): index for index, layer in enumerate(layers)}
        if id(decision_layer) not in steered:
            hook = _PromptSteering(handle, gate, None, alpha_t, mode)
            handle._hooks.append(decision_layer.register_forward_hook(hook, prepend=True))
        for index, layer in enumerate(layers):
            decides = layer is decision_layer
            hook = _PromptSteering(handle, gate if decides else None, r[:, index].float(), alpha_t, mode)
            handle._hooks.append(layer.register_forward_hook(hook, prepend=True))
    except BaseException:
        handle.remove()
        raise
    return handle
