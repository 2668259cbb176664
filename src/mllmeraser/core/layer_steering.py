"""The paper's per-layer gate as hooks: at each steered layer, the gate value g_l = shape_gate(h_last . u_l) is read
once per prompt at its last real token, and sum_k alpha_k g_lk r_lk is added to the prompt's positions.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from . import gating
from .attachment import STEERING_MODES, SteeringHandle, SteeringHook, SteeringMode, new_handle, per_row
from .devices import on_device
from .steering import shape_gate


class LayerSteering(SteeringHook):
    """Forward hook of one layer under the paper's per-layer gate: at the prompt's first forward, the gate
    value g_l = shape_gate(h_last . u_l) is read at each row's last real prompt token and kept; every forward
    then adds sum_k alpha_k g_lk r_lk to the prompt's positions (mode "all": to every position)."""

    def __init__(self, handle: SteeringHandle, index: int, u: Tensor, r: Tensor, alpha: Tensor, floor: Tensor,
                 cap: Tensor, mode: str):
        self.handle, self.index, self.mode = handle, index, mode
        self.terms = (u, r, alpha, floor, cap)  # u, r: [K, d]; alpha, floor, cap: (K,); float32
        self._on: dict[torch.device, tuple[Tensor, ...]] = {}

    def steer(self, module: nn.Module, hidden: Tensor, positions: slice | None) -> Tensor | None:
        handle = self.handle
        u, r, alpha, floor, cap = on_device(self._on, hidden.device,
                                            lambda device: tuple(t.to(device) for t in self.terms))
        prompt = handle.prompt
        gates = prompt.layer_gates.get(self.index)
        if gates is None:
            mask = None if prompt.mask is None else per_row(prompt.mask, hidden.shape[0])  # per expanded row
            last = gating.last_real_positions(mask, prompt.length, hidden.shape[0], hidden.device) - handle.start
            if bool(((last < 0) | (last >= hidden.shape[1])).any()):
                raise RuntimeError("the paper's gate reads the last prompt token at every layer, and this forward does "
                                   "not hold it (chunked prefill?): generate without prefill_chunk_size, or use a "
                                   "prompt gate")
            h_last = hidden[torch.arange(hidden.shape[0], device=hidden.device), last].to(torch.float32)
            gates = prompt.layer_gates[self.index] = handle.masked(shape_gate(h_last @ u.T, floor, cap))  # [B, K]
        return (per_row(gates, hidden.shape[0]) * alpha) @ r


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
    """Hook `layers` so block l's output gets + sum_k alpha_k shape_gate(h_last . u[k, l]) r[k, l] on the
    prompt's positions, h_last being each row's last real prompt token (read from the attention mask, so any
    padding side works) when the prompt is first seen.

    u, r: [K, len(layers), d]; alpha, floor, cap: K values. mode 'prefill' (the paper) steers the prompt's
    positions only, on every generation path (see SteeringHandle); 'all' steers every position, generated ones
    included, with the prompt's gate values. At most one attachment per model: a second raises RuntimeError
    until the first handle is removed.

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
    handle = new_handle(model)
    try:
        handle.start_tracking()
        for index, layer in enumerate(layers):
            hook = LayerSteering(handle, index, u[:, index].float(), r[:, index].float(), *per_term, mode=mode)
            handle.hook_layer(layer, hook)
    except BaseException:
        handle.remove()
        raise
    return handle
