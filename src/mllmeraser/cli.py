"""The `mllmeraser` command line. Bad input is one line on stderr and exit status 2, never a traceback."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .errors import UserInputError, atomic_write_text


def _add_model_args(parser: argparse.ArgumentParser, required: bool = True) -> None:
    parser.add_argument("--model", required=required, help="checkpoint directory (or a model id in the local HF cache)")


def _add_eval_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, help="MLLMU-Bench directory (forget_10/, retain_90/, Test_Set/, ...)")
    parser.add_argument("--forget-ratio", type=int, default=10, choices=(5, 10, 15))
    parser.add_argument("--batch-size", type=int, default=64)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mllmeraser", description=__import__("mllmeraser").__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    testbed = commands.add_parser("testbed", help="the offline testbed").add_subparsers(dest="testbed_command", required=True)
    build = testbed.add_parser("build", help="generate the benchmark and train the testbed model (cached)")
    build.add_argument("--seed", type=int, default=0)
    build.add_argument("--out", type=Path, default=None, help="build directory (default: the per-user cache)")
    build.add_argument("--preset", default="full", choices=("full", "small"))
    build.add_argument("--force", action="store_true", help="rebuild even if a matching build exists")

    evaluate = commands.add_parser("eval", help="MLLMU-Bench evaluation (optionally with an eraser attached)")
    _add_model_args(evaluate)
    _add_eval_args(evaluate)
    evaluate.add_argument("--eraser", type=Path, default=None, help="an eraser .safetensors to attach")
    evaluate.add_argument("--alpha", type=float, default=None, help="override the eraser's strength")
    evaluate.add_argument("--json", type=Path, default=None, help="write {split: {metric: value}} here")
    evaluate.add_argument("--splits", default=None, help="comma-separated subset of forget,test,retain,real,general,unknown,retain_val")

    from .core import fitting as fit_module  # the fit command's options live next to the fit code
    fit_module.add_cli(commands)
    from . import generate as generate_module
    generate_module.add_cli(commands)
    from .bench import compare as compare_module
    compare_module.add_cli(commands)
    return parser


def cmd_testbed_build(args) -> int:
    from .testbed.build import build
    directory = build(out=args.out, seed=args.seed, preset=args.preset, force=args.force)
    print(f"testbed ready: {directory}\n  model: {directory / 'model'}\n  data:  {directory / 'data'}")
    return 0


def cmd_eval(args) -> int:
    from .core import models
    from .bench import evaluate
    from contextlib import nullcontext
    splits = tuple(args.splits.split(",")) if args.splits else evaluate.REPORT_SPLITS
    model, processor = models.load_model(args.model)
    attached = nullcontext()
    if args.eraser is not None:
        from .core.eraser import Eraser
        eraser = Eraser.load(args.eraser)
        if args.alpha is not None:
            eraser = eraser.with_alpha(args.alpha)
        attached = eraser.attach(model)
    with attached:
        results = evaluate.evaluate(model, processor, args.data, args.forget_ratio, splits, args.batch_size)
    print(evaluate.format_table(results))
    if args.json is not None:
        atomic_write_text(args.json, json.dumps(results, indent=2))
        print(f"wrote {args.json}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handlers = {"testbed": cmd_testbed_build, "eval": cmd_eval}
    handler = handlers.get(args.command) or getattr(args, "handler", None)
    try:
        return handler(args)
    except UserInputError as exc:
        print(f"mllmeraser: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mllmeraser: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
