"""Activation checkpointing for PGD's backward (pgd.py): each of the model's checkpointable blocks keeps only its
input and recomputes the rest in the backward, ~one extra forward a step for a fraction of the memory.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.utils.checkpoint


@contextmanager
def activation_checkpointing(model, enabled: bool = True) -> Iterator[int]:
    """Within the block, checkpoint every block of `model` that transformers can checkpoint; yields how many.

    transformers 5 checkpoints a `GradientCheckpointingLayer` when its own `gradient_checkpointing` and
    `training` flags are set and gradients are on. Its `activation_checkpointing_enable` /
    `gradient_checkpointing_enable` would need the whole model in train mode for that (dropout on) and leave a
    hook on the input embeddings behind, so instead only these blocks' flags are set: `training` on the block
    module alone, not its children, so the attention and MLP modules stay in eval mode and no dropout runs
    (the blocks of LLaVA, Qwen2-VL and Qwen2.5-VL read `training` only in their attention children).
    A block already checkpointed keeps its own checkpoint function. Every flag is restored on exit.
    """
    blocks = []
    if enabled and getattr(model, "supports_gradient_checkpointing", False):
        from transformers.modeling_layers import GradientCheckpointingLayer

        blocks = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    # non-reentrant: inputs need not require grad, and it composes with torch.autograd.grad
    function = functools.partial(torch.utils.checkpoint.checkpoint, use_reentrant=False)
    saved = [(block, {name: block.__dict__[name] for name in _CHECKPOINT_FLAGS if name in block.__dict__})
             for block in blocks]
    try:
        for block in blocks:
            if not block.gradient_checkpointing:
                block.gradient_checkpointing = True
                block._gradient_checkpointing_func = function
            block.training = True
        yield len(blocks)
    finally:
        for block, flags in saved:
            for name in _CHECKPOINT_FLAGS:
                if name in flags:
                    setattr(block, name, flags[name])
                elif name in block.__dict__:
                    delattr(block, name)  # it was the class default


_CHECKPOINT_FLAGS = ("gradient_checkpointing", "_gradient_checkpointing_func", "training")
