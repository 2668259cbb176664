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
    captured: list[Tensor | None] = [None] * len(layers)

    def make_hook(index: int):
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            captured[index] = _hidden_states(output)[:, -1, :].to(device="cpu", dtype=torch.float32)
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
    return torch.stack(captured, dim=1)  # type: ignore[arg-type]


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
    if hasattr(model, ATTACHED_MARKER):
        raise RuntimeError("an eraser is already attached to this model: remove its handle before attaching another")
    per_term = [torch.tensor(values, dtype=torch.float32) for values in (alpha, floor, cap)]
    handle = SteeringHandle(model)
    setattr(model, ATTACHED_MARKER, handle)
    try:
        for index, layer in enumerate(layers):
            hook = _LayerSteering(u[:, index].float(), r[:, index].float(), *per_term, mode=mode)
            handle._hooks.append(layer.register_forward_hook(hook, prepend=True))
    except BaseException:
        handle.remove()
        raise
    return handle
