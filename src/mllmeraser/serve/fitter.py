"""Deletion requests fitted by the server itself (`POST /admin/requests`).

The retain, erasure and calibration side of a fit is the same for every request on a model: the model cache
(core/cache.py) holds it, loaded (or built once) when the server starts with `--data`. A request then runs only its
own forget set through the model (PGD included), on the batcher thread between two batches with the steering
detached (engine.Engine.call), and joins the others in the registry: with knn gates over that one retain bank, the
batcher's RequestIndex takes it in O(its size).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from ..bench import data
from ..core import cache
from ..core.eraser import Eraser
from ..core.eraser_fitter import fit_eraser
from ..core.settings import FitSettings
from ..core.inputs import PromptLike, as_items
from ..errors import UserInputError
from .policy import PolicyError


@dataclass
class RequestFitter:
    """Fits deletion requests on `model` from `shared` (the model cache's statistics) under `settings`. Named
    splits and server-side files resolve under `data_dir` (bench.data.resolve_spec); `save_dir`, where given,
    gets every fitted eraser as <name>.safetensors (atomically), so a restart with `--erasers save_dir` keeps it."""

    model: Any
    processor: Any
    shared: cache.SharedStatistics
    settings: FitSettings
    data_dir: Path | None = None
    forget_ratio: int = 10
    save_dir: Path | None = None

    @classmethod
    def from_data(cls, model, processor, data_dir: str | os.PathLike, forget_ratio: int = 10,
                  settings: FitSettings | None = None, cache_dir: str | os.PathLike | None = None,
                  save_dir: str | os.PathLike | None = None, progress: bool = True) -> RequestFitter:
        """The fitter of `mllmeraser fit --data DIR`'s defaults: retain = the retain split less its validation
        people (plus General_Train), erasure = Unknown_Train, calibration = the validation people; their
        statistics from `cache_dir` (built there if missing; None: computed, not written)."""
        settings = settings if settings is not None else FitSettings()
        shared = cache.shared_statistics(model, processor, retain=data.retained_inputs(data_dir, forget_ratio),
                                         erasure=data.erasure_items(None, data_dir, forget_ratio),
                                         calibration=data.validation_items(data_dir, forget_ratio), settings=settings,
                                         cache_dir=cache_dir, progress=progress)
        return cls(model, processor, shared, settings, Path(data_dir), forget_ratio,
                   None if save_dir is None else Path(save_dir))

    def items(self, forget: Any, decode_image: Callable[[str, str], Image.Image]) -> list[PromptLike]:
        """A request body's `forget`: a split name or server-side path (what `mllmeraser fit --forget` takes),
        or a list of {"question", "answer", "image"?: data URL} (asked verbatim; `decode_image(url, param)`
        reads the images). A problem is a 400 naming the field."""
        if isinstance(forget, str) and forget:
            try:
                items = data.resolve_spec(forget, self.data_dir, self.forget_ratio)
            except UserInputError as exc:
                raise PolicyError(400, f"forget {forget!r}: {exc.problem}", "invalid_forget", "forget") from None
        elif isinstance(forget, list) and forget:
            entries = []
            for index, entry in enumerate(forget):
                param = f"forget[{index}]"
                if not isinstance(entry, dict) or not isinstance(entry.get("question"), str) \
                        or not isinstance(entry.get("answer"), str) or not entry["question"].strip():
                    raise PolicyError(400, 'each forget entry is {"question": str, "answer": str, "image": a data: '
                                      "URL or null}", "invalid_forget", param)
                url = entry.get("image")
                if url is not None and not isinstance(url, str):
                    raise PolicyError(400, "image must be a data: URL or null", "invalid_forget", f"{param}.image")
                image = decode_image(url, f"{param}.image") if url is not None else None
                entries.append((image, entry["question"], entry["answer"]))
            items = as_items(entries)
        else:
            raise PolicyError(400, "'forget' must name a split or file on the server, or list the questions to "
                              "forget", "invalid_forget", "forget")
        if not items:
            raise PolicyError(400, f"forget {forget!r} holds no questions", "invalid_forget", "forget")
        return items

    def fit(self, name: str, items: Sequence[PromptLike]) -> tuple[Eraser, dict[str, Any]]:
        """The request's eraser and a record of its fit: seconds, per stage, and the model cache's status. Run
        it on the model's own thread (Engine.call)."""
        timings: dict[str, float] = {}
        started = time.perf_counter()
        eraser = fit_eraser(self.model, self.processor, forget=items, settings=self.settings, shared=self.shared,
                            request=name, progress=False, timings=timings)
        record: dict[str, Any] = {"fit_seconds": round(time.perf_counter() - started, 4),
                                  "stages": {stage: round(value, 4) for stage, value in timings.items()},
                                  "model_cache": self.shared.status, "forget_questions": len(items)}
        return eraser, record

    def save(self, name: str, eraser: Eraser) -> Path | None:
        """Write `eraser` as save_dir/<name>.safetensors (atomically), or nothing without a save_dir."""
        return None if self.save_dir is None else eraser.save(self.save_dir / f"{name}.safetensors")
