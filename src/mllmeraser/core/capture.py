"""Reading activations from a forward: at each requested decoder layer, the block output at each row's last
prompt position, and the pooled prompt feature of one of them (gating.pool under the attention mask), float32
on CPU. Forward hooks, removed on leaving; a capture stops the forward after the last requested layer.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from . import gating
from .decoder_layers import hidden_states


class StopForward(Exception):
    """Raised by a capture hook once every requested layer has been seen: skips the rest of the model."""


def capture_last_token(model: nn.Module, layers: Sequence[nn.Module], **inputs: Any) -> Tensor:
    """Block outputs at each row's last real token for each of `layers`, [batch, num_layers, d] float32 on CPU.

    Runs `model(**inputs)` under no_grad; the last real token is read from the inputs' 2-D attention mask (any
    padding side), or is the last position where there is none. The forward stops right after the last requested layer. Hooks already on
    the model (e.g. an attached eraser) run first, so their effect is included.
    """
    return capture(model, layers, **inputs)[0]


def capture(model: nn.Module, layers: Sequence[nn.Module], pooled_layer: int | None = None, pooling: str = "mean",
            first_layer: nn.Module | None = None, **inputs: Any) -> tuple[Tensor, Tensor | None]:
    """(last-position block outputs [batch, num_layers, d], and the pooled prompt feature [batch, d] of
    `layers[pooled_layer]` under the inputs' attention mask (gating.pool), or None), float32 on CPU, from one
    forward pass that stops after the last requested layer (see capture_last_token). A pooling of the decoder's
    input embeddings reads the input of `first_layer`, the decoder's first layer (reading_prompt).
    """
    with reading_prompt(layers, inputs.get("attention_mask"), pooled_layer, pooling, stop=True,
                        first_layer=first_layer) as read:
        try:
            with torch.no_grad():
                # use_cache=False: a capture never decodes, and a KV cache would be built and dropped per batch
                # (about 10 GB at 7B)
                model(**{**inputs, "use_cache": False})
        except StopForward:
            pass
    return read.last, read.pooled


class PromptRead:
    """What `reading_prompt` read from one forward: `last` [batch, num_layers, d], the block outputs at each
    row's last prompt position, and `pooled` [batch, d] (or None), float32 on CPU."""

    def __init__(self, num_layers: int):
        self._captured: list[Tensor | None] = [None] * num_layers
        self.pooled: Tensor | None = None

    @property
    def complete(self) -> bool:
        return all(c is not None for c in self._captured)

    @property
    def last(self) -> Tensor:
        missing = [index for index, c in enumerate(self._captured) if c is None]
        if missing:
            raise RuntimeError(f"the forward pass never reached the layers at positions {missing}")
        return torch.stack(self._captured, dim=1)  # type: ignore[arg-type]


@contextmanager
def reading_prompt(layers: Sequence[nn.Module], mask: Tensor | None, pooled_layer: int | None = None,
                   pooling: str = "mean", columns: int | None = None, stop: bool = False,
                   first_layer: nn.Module | None = None) -> Iterator[PromptRead]:
    """Within the block, the next forward of the model over `layers` is read into the yielded PromptRead: at
    each of `layers`, the block output at each row's last prompt position, and the pooled prompt feature of
    `layers[pooled_layer]` (gating.pool under the 2-D attention `mask`).

    The prompt is the first `columns` positions of the inputs (None: all of them). A teacher-forced forward
    (models.encode_with_answers: [left padding][prompt][answer][right padding]) thus reads what a forward of
    the prompt alone would, causal attention keeping the answer out of the prompt's positions, and still gives
    the answer's logits: one forward for both (PGD, pgd.py). With `stop`, StopForward is raised once every
    layer is read (the caller catches it: the rest of the model never runs).

    A pooling that reads the decoder's input embeddings (gating.reads_embeddings) pools the input of
    `first_layer` (the decoder's first layer, which runs before any of `layers`); `pooled_layer` still says
    that a pooled feature is wanted."""
    read = PromptRead(len(layers))

    def prompt_part(hidden: Tensor) -> tuple[Tensor, Tensor | None]:
        """The prompt's columns of a layer's hidden states, and their rows of the attention mask."""
        hidden = hidden if columns is None else hidden[:, :columns]
        return hidden, _mask_for(mask if columns is None or mask is None else mask[:, :columns], hidden)

    from_input = pooled_layer is not None and gating.reads_embeddings(pooling)
    if from_input and first_layer is None:
        raise ValueError(f"a {pooling} pooling reads the decoder's input: pass its first layer (first_layer)")

    def input_hook(module: nn.Module, args: Any, kwargs: dict) -> None:
        read.pooled = gating.pool(*prompt_part(layer_input(args, kwargs)), pooling).cpu()

    def make_hook(index: int):
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            hidden, rows = prompt_part(hidden_states(output))
            last = gating.last_real_positions(rows, hidden.shape[1], hidden.shape[0], hidden.device)
            read._captured[index] = hidden[torch.arange(hidden.shape[0], device=hidden.device), last].to(
                device="cpu", dtype=torch.float32)
            if index == pooled_layer and not from_input:
                read.pooled = gating.pool(hidden, rows, pooling).cpu()
            if stop and read.complete:
                raise StopForward

        return hook

    handles = [layer.register_forward_hook(make_hook(index)) for index, layer in enumerate(layers)]
    if from_input:
        handles.append(first_layer.register_forward_pre_hook(input_hook, with_kwargs=True))
    try:
        yield read
    finally:
        for handle in handles:
            handle.remove()


def layer_input(args: tuple, kwargs: dict) -> Tensor:
    """The hidden states a decoder layer's forward was called with (positional, as transformers passes them, or
    by keyword)."""
    hidden = args[0] if args and isinstance(args[0], Tensor) else kwargs.get("hidden_states")
    if not isinstance(hidden, Tensor):
        raise TypeError("cannot find the hidden states a decoder layer was called with")
    return hidden


def _mask_for(mask: Tensor | None, hidden: Tensor) -> Tensor | None:
    """The 2-D attention mask's columns for the positions `hidden` holds (the last seq of them: a forward
    that extends a KV cache sees only its new positions)."""
    if mask is None or mask.ndim != 2:
        return None
    return mask[:, -hidden.shape[1]:] if mask.shape[1] >= hidden.shape[1] else None
