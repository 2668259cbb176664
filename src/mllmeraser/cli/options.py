"""Options several subcommands share (model placement, the benchmark, request sizes, an eraser file, protocol,
erasure inputs, the model cache) and the helpers that read them back.

Only the standard library at import: the parser is built for every command, `--help` included, so what an option
needs (a benchmark's request sizes, the dtypes) is imported where the option is added, and none of it imports a
benchmark's metric or file-format library (pyarrow, nltk, rouge-score) at import time."""

from __future__ import annotations

import argparse
import json
import math
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

from ..errors import UserInputError, atomic_write_text


def add_model_arg(parser: argparse.ArgumentParser, required: bool = True) -> None:
    from ..core.models import DTYPES

    if required:
        parser.add_argument("--model", required=True, help="checkpoint directory (or a model id in the local HF cache)")
    parser.add_argument("--device", default=None, help="where the model runs, e.g. cuda, cuda:1, cpu "
                        "(default: cuda where there is a GPU, else cpu)")
    parser.add_argument("--dtype", default=None, choices=sorted(DTYPES),
                        help="weights' dtype (default: bfloat16 on a GPU, float32 on the CPU; auto: the checkpoint's)")
    parser.add_argument("--device-map", default=None, help="'auto' spreads the model over every visible GPU "
                        "(then the CPU) with accelerate; --device is then ignored")


def model_options(args) -> dict:
    """load_model's placement keywords from the --device/--dtype/--device-map options."""
    return {"device": args.device, "dtype": args.dtype, "device_map": args.device_map}


def load_model(args):
    """(model, processor) of --model, placed as the options say."""
    from ..core import models

    return models.load_model(args.model, **model_options(args))


def add_benchmark_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--benchmark", default="auto", choices=("auto", "mllmu", "clear"),
                        help="which benchmark --data holds (default: CLEAR where its config directories are there, "
                        "else MLLMU-Bench); CLEAR is scored with its own metrics (docs/clear_protocol.md)")


def benchmark(args) -> str:
    """"clear" or "mllmu": --benchmark, or what --data holds (bench.clear.detect)."""
    from ..bench import clear

    return clear.detect(args.data, args.benchmark)


def check_clear_protocol(args) -> None:
    """On CLEAR data a --protocol given is a one-line error (CLEAR is asked one way); the caller's default is None."""
    from ..bench import clear

    if args.protocol is not None:
        clear.refuse_protocol(args.protocol)


def add_forget_ratio_arg(parser: argparse.ArgumentParser) -> None:
    from ..bench import clear, data

    # MLLMU-Bench's forget_5/10/15 and CLEAR's forget01/05/10; each benchmark's reader refuses the others' sizes
    parser.add_argument("--forget-ratio", type=int, default=10,
                        choices=sorted(set(data.FORGET_RATIOS) | set(clear.FORGET_RATIOS)))


def forget_ratios(text: str) -> tuple[int, ...]:
    """--forget-ratio for compare and demo: one request size or several, comma-separated ("5,10,15"), each one of
    MLLMU-Bench's or CLEAR's (the benchmark's reader refuses the other's)."""
    from ..bench import clear, data

    sizes = tuple(sorted(set(data.FORGET_RATIOS) | set(clear.FORGET_RATIOS)))
    try:
        ratios = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected sizes from {sizes}, comma-separated; got {text!r}")
    if not ratios or any(r not in sizes for r in ratios):
        raise argparse.ArgumentTypeError(f"expected sizes from {sizes}, comma-separated; got {text!r}")
    return ratios


def add_forget_ratios_arg(parser: argparse.ArgumentParser, default: int = 10) -> None:
    from ..bench import clear, data

    parser.add_argument("--forget-ratio", type=forget_ratios, default=(default,), metavar="5,10,15",
                        help=f"request size(s), MLLMU-Bench's {data.FORGET_RATIOS} or CLEAR's {clear.FORGET_RATIOS}: "
                        f"several run on one loaded model, a table per size, plotted together (default: {default})")


def add_eraser_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--eraser", type=Path, default=None, help="an eraser .safetensors to attach")
    parser.add_argument("--alpha", type=float, default=None, help="override the eraser's strength")


def add_protocol_arg(parser: argparse.ArgumentParser, default: str | None = "testbed") -> None:
    from ..bench.protocols import PROTOCOLS

    parser.add_argument("--protocol", default=default, choices=PROTOCOLS,
                        help="MLLMU-Bench data: testbed (default): chat template, no few-shot, every Test_Set image; "
                        "mllmu: MLLMU-Bench's own evaluation script (docs/mllmu_protocol.md); paper: the MLLMEraser "
                        "authors' evaluation script (docs/paper_protocol.md)")


def add_erasure_arg(parser: argparse.ArgumentParser) -> None:
    from ..bench.data import ERASURE_SPLIT

    parser.add_argument("--erasure", default=None, help="the erasers' erasure inputs: questions the model refuses, "
                        f"a SPEC as for fit (default: {ERASURE_SPLIT} under the data, which only the testbed has)")


def add_cache_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help="the model cache (retain, erasure and calibration statistics, computed once per model, "
                        "data and settings; default $MLLMERASER_CACHE/fits, else ~/.cache/mllmeraser/fits)")
    parser.add_argument("--no-cache", action="store_true", help="compute the shared statistics, write nothing")


def cache_dir(args) -> Path | None:
    from ..core import cache

    return None if args.no_cache else (args.cache_dir or cache.default_cache_dir())


def load_eraser(path: Path | None, alpha: float | None):
    """The eraser file at `path` (with its strength replaced by `alpha`, if given), or None where none is given."""
    if path is None:
        return None
    from ..core.eraser import Eraser

    eraser = Eraser.load(path)
    if alpha is not None and not math.isfinite(alpha):  # argparse's float() takes "nan" and "inf"
        raise UserInputError(None, f"--alpha must be a finite number, got {alpha}")
    return eraser.with_alpha(alpha) if alpha is not None else eraser


def attached(model, eraser) -> AbstractContextManager:
    """`eraser` attached to `model`, or nothing attached; either way a context manager."""
    return eraser.attach(model) if eraser is not None else nullcontext()


def write_results(results: dict, table: str, json_path: Path | None) -> None:
    """Print a results table; with --json, also write the results there."""
    print(table)
    if json_path is not None:
        atomic_write_text(json_path, json.dumps(results, indent=2))
        print(f"wrote {json_path}")
