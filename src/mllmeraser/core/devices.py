"""Per-device copies of the tensors a hook reads: one helper for every such cache.

A model split over devices (device_map="auto", accelerate's offloading) runs each decoder layer on its own
device, and a forward on a GPU reads an eraser that lives on the CPU. Moving the eraser's tensors at every
forward would copy them at every generated token; so each holder (a steered layer's terms, a prompt gate's
banks, the fired terms of a decided prompt) keeps one copy per device it has been read on, made the first time.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch

T = TypeVar("T")


def on_device(copies: dict[torch.device, T], device: torch.device, make: Callable[[torch.device], T]) -> T:
    """copies[device], made by make(device) and kept there the first time `device` is asked for. (Two threads
    asking at once may both make it: the copies are equal, and the one stored last stays.)"""
    found = copies.get(device)
    if found is None:
        found = copies[device] = make(device)
    return found
