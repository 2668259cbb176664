"""mllmeraser: make a multimodal LLM forget chosen knowledge at test time, by input-aware activation steering
(MLLMEraser, arXiv 2510.04217). No parameter is updated; detaching the eraser restores the model exactly."""

from .bench.data import default_erasure_items, load_split_items, retained_inputs, validation_items
from .core.cache import SharedStatistics, shared_statistics
from .core.eraser import Eraser
from .core.fitting import FitSettings, PGDSettings
from .core.inputs import QAItem
from .core.index import RequestIndex
from .core.models import answer_items, load_model
from .errors import UserInputError

__version__ = "0.1.0"

__all__ = [
    "Eraser", "FitSettings", "PGDSettings", "QAItem", "UserInputError", "load_model", "answer_items",
    "load_split_items", "retained_inputs", "validation_items", "default_erasure_items", "build_testbed",
    "shared_statistics", "SharedStatistics", "RequestIndex",
]


def __getattr__(name: str):
    # The testbed pulls in its training code: imported when first asked for, not with the package.
    if name == "build_testbed":
        from .testbed.build import build
        return build
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
