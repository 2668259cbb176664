"""What importing the package and running the command line load: neither `import mllmeraser` nor the parser
(`mllmeraser --help`) imports a benchmark's or the report's optional dependencies, `fit` and `serve` do not
import the metrics, and the library leaves logging as it found it."""

from __future__ import annotations

import logging
import subprocess
import sys
import tomllib
from importlib import import_module
from pathlib import Path

OPTIONAL = ("pyarrow", "nltk", "rouge_score", "matplotlib", "peft")
LOADED = f"print(sorted(m for m in {OPTIONAL!r} if m in sys.modules))"
ROOT = Path(__file__).resolve().parents[1]


def loaded_after(code: str) -> list[str]:
    """The optional dependencies in sys.modules after `code` ran in a fresh interpreter (its last stdout line)."""
    result = subprocess.run([sys.executable, "-c", f"import sys\n{code}\n{LOADED}"], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    return eval(result.stdout.strip().splitlines()[-1])


def test_import_mllmeraser_loads_no_optional_dependency():
    assert loaded_after("import mllmeraser") == []


def test_mllmeraser_help_loads_no_optional_dependency():
    code = ("from mllmeraser.cli import main\n"
            "for argv in (['--help'], ['fit', '--help'], ['serve', '--help'], ['compare', '--help']):\n"
            "    try:\n"
            "        main(argv)\n"
            "    except SystemExit as exit:\n"
            "        assert exit.code == 0, argv")
    assert loaded_after(code) == []


def test_fit_and_serve_import_no_metric_or_plotting_library(tmp_path):
    """Both refuse a missing checkpoint (one line, exit 2) after importing everything they run but the model."""
    for argv in (["fit", "--model", str(tmp_path / "none"), "--forget", str(tmp_path / "f.jsonl"), "--retain",
                  str(tmp_path / "r.jsonl"), "--out", str(tmp_path / "e.safetensors")],
                 ["serve", "--model", str(tmp_path / "none")]):
        code = f"from mllmeraser.cli import main\nassert main({argv!r}) == 2"
        assert loaded_after(code) == [], argv


def test_the_console_script_and_python_m_resolve():
    target = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]["mllmeraser"]
    module, _, name = target.partition(":")
    assert callable(getattr(import_module(module), name))
    for module in ("mllmeraser", "mllmeraser.cli"):
        result = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, timeout=300)
        assert result.returncode == 0 and "usage: mllmeraser" in result.stdout, result.stderr[-2000:]


def test_the_report_templates_are_package_data():
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["mllmeraser"]
    package = ROOT / "src" / "mllmeraser"
    shipped = {path for pattern in data for path in package.glob(pattern)}
    templates = set((package / "bench" / "templates").glob("*"))
    assert templates and templates <= shipped


def test_load_model_leaves_logging_as_it_was(tmp_path):
    from transformers.utils import logging as hf_logging

    from mllmeraser.core import models
    from tiny_families import build_llava

    directory = build_llava(tmp_path / "llava")
    before = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    try:
        hf_logging.set_verbosity(logging.INFO)
        hf_logging.enable_progress_bar()
        with models.quiet_transformers():
            assert hf_logging.get_verbosity() == logging.ERROR and not hf_logging.is_progress_bar_enabled()
        models.load_model(directory, device="cpu")
        assert hf_logging.get_verbosity() == logging.INFO and hf_logging.is_progress_bar_enabled()
    finally:
        hf_logging.set_verbosity(before[0])
        (hf_logging.enable_progress_bar if before[1] else hf_logging.disable_progress_bar)()
