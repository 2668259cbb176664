"""Building a testbed of any preset: the tiny presets by `build.py`, the pretrained one by `pretrained_build.py`.

A module of its own because the pretrained build builds on the tiny one's steps: the choice between them sits above
both, so neither imports the other's caller (no import cycle).
"""

from __future__ import annotations

from pathlib import Path

from . import build as tiny


def build(out: Path | None = None, seed: int = 0, preset: str = "full", progress: bool = True,
          force: bool = False) -> Path:
    """Build (or reuse) the testbed at `out`; returns its directory. `preset` is a key of build.PRESETS, or
    "pretrained" (SmolLM2-135M-Instruct as the decoder: `pretrained_build`, with its own version and cache
    directory)."""
    if preset == tiny.PRETRAINED_PRESET:
        from . import pretrained_build  # imported for its preset only: it brings the pretrained decoder's training

        return pretrained_build.build(out=out, seed=seed, progress=progress, force=force)
    return tiny.build(out=out, seed=seed, preset=preset, progress=progress, force=force)
