"""mllmeraser: make a multimodal LLM forget chosen knowledge at test time, by input-aware activation steering
(MLLMEraser, arXiv 2510.04217). No parameter is updated; detaching the eraser restores the model exactly."""

from .bench.data import default_erasure_items, load_split_items, retained_inputs, validation_items
from .bench.items import QAItem
from .core.cache import SharedStatistics, shared_statistics
from .core.eraser import Eraser
from .core.eraser_fitter import EraserFitter, fit_eraser
from .core.fitting import FitSettings, PGDSettings
from .core.inputs import Prompt
from .core.index import RequestIndex
from .core.models import answer_items, load_model
from .errors import UserInputError
from .version import __version__

__all__ = [
    "Eraser", "EraserFitter", "fit_eraser", "FitSettings", "PGDSettings", "Prompt", "QAItem", "UserInputError",
    "load_model", "answer_items",
    "load_split_items", "retained_inputs", "validation_items", "default_erasure_items", "build_testbed",
    "shared_statistics", "SharedStatistics", "RequestIndex",
]


def __getattr__(name: str):
    # The testbed pulls in its training code: imported when first asked for, not with the package.
    if name == "build_testbed":
        from .testbed.preset_build import build
        return build
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
