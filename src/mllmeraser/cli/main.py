"""The `mllmeraser` command: the parser, assembled from one module per subcommand (or group of them), and the
dispatch. Bad input is one line on stderr and exit status 2, never a traceback.

Each subcommand's module imports what it runs (benchmarks, metrics, the server, the testbed's training code)
inside its handler, so a command loads only its own dependencies and `--help` none of the optional ones."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager

from ..errors import UserInputError
from . import attack, compare, evaluate, fit, generate, serve, testbed

COMMANDS = (testbed, evaluate, fit, generate, serve, attack, compare)
"""The subcommand modules, in --help's order; each adds its parsers (add_parsers) with their handlers."""

EXTRAS = {"pyarrow": "bench", "nltk": "bench", "rouge_score": "bench", "matplotlib": "bench", "peft": "bench",
          "fastapi": "serve", "uvicorn": "serve", "starlette": "serve", "multipart": "serve", "gguf": "testbed"}
"""Which extra installs an optional dependency: a command that needs a missing one says so in one line."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mllmeraser", description=__import__("mllmeraser").__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    for module in COMMANDS:
        module.add_parsers(commands)
    return parser


class _MessageFormat(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return f"mllmeraser: {record.levelname.lower()}: {record.getMessage()}"


@contextmanager
def _library_messages() -> Iterator[None]:
    """The library's log messages (warnings: a split skipped, a cache entry rebuilt) on stderr while a command
    runs, as "mllmeraser: warning: ..."; the library itself configures no logging. Removed afterwards, so a
    caller of main() (a test, a notebook) is left as it was."""
    from ..core.models import quiet_transformers

    logger = logging.getLogger("mllmeraser")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_MessageFormat())
    logger.addHandler(handler)
    try:
        with quiet_transformers():  # the CLI's stderr holds its own lines, not transformers' bars and notices
            yield
    finally:
        logger.removeHandler(handler)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        with _library_messages():
            return args.handler(args)
    except UserInputError as exc:
        print(f"mllmeraser: error: {exc}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as exc:  # an optional dependency this command needs is not installed
        extra = EXTRAS.get((exc.name or "").partition(".")[0])
        if extra is None:
            raise
        print(f"mllmeraser: error: {args.command} needs the {extra} extra ({exc.name} is missing): "
              f'pip install "mllmeraser[{extra}]"', file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mllmeraser: interrupted", file=sys.stderr)
        return 130
