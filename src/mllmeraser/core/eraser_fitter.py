"""Fitting erasers on one model: `EraserFitter` gathers what every deletion request shares and fits each request's
forget set against it into a frozen `Eraser` (a fitter and a frozen eraser, as EleutherAI's concept-erasure has
them). `fit_eraser` is the same in one call.

    fitter = EraserFitter(model, processor, FitSettings(), cache_dir=...)
    fitter.add_retain(retain)            # questions the eraser must leave alone
    fitter.add_erasure(erasure)          # questions the model refuses: the direction steers towards them
    fitter.add_calibration(held_out)     # people outside the fit: the prompt gate's threshold is set on them
    eraser = fitter.fit(forget)          # a frozen Eraser; fit again for the next request
    with eraser.attach(model): ...

The fitter's state is the model's shared statistics (`fitter.shared`, a cache.SharedStatistics: what the model
cache saves). They are computed when a fit first needs them, in one pass over every question added: so the
batches, hence the float sums, and the model cache's key are the same however the questions were added; with a
`cache_dir` they are read from the model cache, or computed and written there. Adding questions afterwards drops
them, and the next fit computes them anew. A request's fit then runs only its forget set through the model.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable

from ..errors import UserInputError
from . import cache, collection, solve
from .compat import model_fingerprint
from .eraser import Eraser
from .settings import FitSettings
from .inputs import PlainInput, PromptLike, as_items

Inputs = Iterable[PromptLike | PlainInput]
"""What a fitter takes as questions: prompts (a core.inputs.Prompt, a benchmark's item such as QAItem) or plain
`(PIL image or None, question, answer)` tuples, asked verbatim (inputs.as_items)."""


class EraserFitter:
    """Fits erasers on `model` under `settings` (default FitSettings()) from the questions added to it.

    layers_path: the decoder-layer list, if not the family's; cache_dir: the model cache's directory (None: the
    shared statistics are computed and never written); progress: progress bars."""

    def __init__(self, model, processor, settings: FitSettings | None = None, *, layers_path: str | None = None,
                 cache_dir: str | os.PathLike | None = None, progress: bool = True):
        self.model, self.processor = model, processor
        self.settings = settings if settings is not None else FitSettings()
        self.layers_path, self.cache_dir, self.progress = layers_path, cache_dir, progress
        self.retain: list[PromptLike] = []
        self.erasure: list[PromptLike] = []
        self.calibration: list[PromptLike] = []
        self._shared: cache.SharedStatistics | None = None
        self._given = False

    @classmethod
    def from_shared(cls, model, processor, shared: cache.SharedStatistics, settings: FitSettings | None = None, *,
                    layers_path: str | None = None, progress: bool = True) -> EraserFitter:
        """A fitter over shared statistics already made (cache.shared_statistics, another fitter's `shared`): its
        fits run only their forget sets. No questions can be added to it (it does not hold the ones `shared` was
        made of). `settings` must shape statistics as `shared`'s did (a fit checks it)."""
        fitter = cls(model, processor, settings, layers_path=layers_path, progress=progress)
        fitter._shared, fitter._given = shared, True
        return fitter

    def add_retain(self, inputs: Inputs) -> EraserFitter:
        """Questions the eraser must leave alone (the prompt gate's retain bank; the paper gate's null space)."""
        self.retain += self._checked(inputs)
        return self

    def add_erasure(self, inputs: Inputs) -> EraserFitter:
        """Questions the model refuses: the direction points from the forget set's recall towards their activations."""
        self.erasure += self._checked(inputs)
        return self

    def add_calibration(self, inputs: Inputs) -> EraserFitter:
        """Held-out questions about people outside forget and retain: the prompt gate's threshold lets at most
        settings.gate.max_fpr of them through. None added: the retain questions, each left out of the gate's bank
        in turn."""
        self.calibration += self._checked(inputs)
        return self

    def _checked(self, inputs: Inputs) -> list[PromptLike]:
        if self._given:
            raise ValueError("this fitter was made from shared statistics (from_shared): questions cannot be added")
        items = as_items(inputs)
        self._shared = None  # made of the questions before these: computed anew by the next fit
        return items

    @property
    def shared(self) -> cache.SharedStatistics:
        """The model's shared statistics of the retain, erasure and calibration questions under `settings`: given,
        or computed now if not yet (read from the model cache where `cache_dir` holds them, else computed and
        written there)."""
        if self._shared is None:
            if not self.retain or not self.erasure:
                raise UserInputError(None, "fitting needs non-empty forget, retain and erasure sets "
                                           "(or, for retain and erasure, their shared statistics)")
            self._shared = cache.shared_statistics(self.model, self.processor, retain=self.retain,
                                                   erasure=self.erasure, calibration=self.calibration or None,
                                                   settings=self.settings, layers_path=self.layers_path,
                                                   cache_dir=self.cache_dir, progress=self.progress)
        return self._shared

    def fit(self, forget: Inputs, *, request: str = "forget", timings: dict[str, float] | None = None) -> Eraser:
        """One deletion request's eraser: `forget` (questions whose knowledge is to go) through the model, PGD
        included, against the shared statistics (computed first if this is the first fit since questions were
        added). The model is never modified. request: the name recorded in the eraser's metadata; timings: a dict
        that gets the seconds of each stage."""
        forget = as_items(forget)
        if not forget:
            raise UserInputError(None, "fitting needs a non-empty forget set")
        timings = {} if timings is None else timings
        if self._shared is None:
            timings[f"model cache ({self.shared.status})"] = self.shared.seconds
        stats, path, features = collection.fit_statistics(self.model, self.processor, forget=forget,
                                                       settings=self.settings, layers_path=self.layers_path,
                                                       progress=self.progress, shared=self.shared, timings=timings)
        started = time.perf_counter()
        eraser = solve.solve_eraser(stats, self.settings, path, model_fingerprint(self.model), request, features)
        timings["solve"] = time.perf_counter() - started
        return eraser


def fit_eraser(model, processor, *, forget: Inputs, retain: Inputs | None = None, erasure: Inputs | None = None,
               calibration: Inputs | None = None, settings: FitSettings | None = None, layers_path: str | None = None,
               request: str = "forget", progress: bool = True, shared: cache.SharedStatistics | None = None,
               timings: dict[str, float] | None = None) -> Eraser:
    """One deletion request fitted in one call: an EraserFitter given `retain`, `erasure` and `calibration` (or,
    in their place, `shared`: their statistics, e.g. from cache.shared_statistics), fitted on `forget`. Nothing
    is written to the model cache. The lists are taken by keyword (positional lists are easy to swap)."""
    forget = as_items(forget)  # checked first: its problems are named before the other lists'
    if not forget:
        raise UserInputError(None, "fitting needs a non-empty forget set")
    if shared is not None:
        fitter = EraserFitter.from_shared(model, processor, shared, settings, layers_path=layers_path,
                                          progress=progress)
    else:
        fitter = EraserFitter(model, processor, settings, layers_path=layers_path, progress=progress)
        fitter.add_retain(retain or ()).add_erasure(erasure or ()).add_calibration(calibration or ())
    return fitter.fit(forget, request=request, timings=timings)
