"""mllmeraser: make a multimodal LLM forget chosen knowledge at test time, by input-aware activation steering
(MLLMEraser, arXiv 2510.04217). No parameter is updated; detaching the eraser restores the model exactly."""

from .bench.items import QAItem  # the MLLMU-Bench item: light (no pyarrow)
from .core.cache import SharedStatistics, shared_statistics
from .core.eraser import Eraser
from .core.eraser_fitter import EraserFitter, fit_eraser
from .core.settings import FitSettings, KnnGate, PaperGate, PGDSettings, RidgeGate
from .core.inputs import Prompt
from .core.index import RequestIndex
from .core.models import answer_items, load_model
from .errors import UserInputError
from .version import __version__

__all__ = [
    "Eraser", "EraserFitter", "fit_eraser", "FitSettings", "KnnGate", "RidgeGate", "PaperGate", "PGDSettings", "Prompt",
    "QAItem", "UserInputError",
    "load_model", "answer_items",
    "load_split_items", "retained_inputs", "validation_items", "default_erasure_items", "build_testbed",
    "shared_statistics", "SharedStatistics", "RequestIndex",
]

_LAZY = {  # name: (module, attribute), imported when first asked for, not with the package
    # MLLMU-Bench's readers need pyarrow (the bench extra); fitting and attaching an eraser do not
    "load_split_items": (".bench.data", "load_split_items"),
    "retained_inputs": (".bench.data", "retained_inputs"),
    "validation_items": (".bench.data", "validation_items"),
    "default_erasure_items": (".bench.data", "default_erasure_items"),
    "build_testbed": (".testbed.preset_build", "build"),  # the testbed pulls in its training code
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        module, attribute = _LAZY[name]
        return getattr(importlib.import_module(module, __name__), attribute)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
