"""The `mllmeraser` command line (`mllmeraser.cli:main`): main.py builds the parser and dispatches; one module per
subcommand or group (testbed, evaluate, fit, generate, serve, attack, compare) adds its options and runs it;
options.py holds the options several share, flags.py the flags generated from settings dataclasses."""

from .fit import decision_layer_arg, fit_settings
from .main import build_parser, main
from .options import attached, load_eraser, model_options
from .testbed import TESTBED_PRESETS

__all__ = ["TESTBED_PRESETS", "attached", "build_parser", "decision_layer_arg", "fit_settings", "load_eraser", "main",
           "model_options"]
