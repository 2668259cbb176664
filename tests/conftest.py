"""Shared fixtures. The trained testbed is built once per machine (the `small` preset, cached under the
per-user cache dir) and reused by every test and every later run; nothing retrains per test.

The fixture's weights depend on the machine's float kernels (CPU type) and on the thread count, so its quality
numbers move from build to build. Every quality number the suite asserts on it goes through `bar`, which records
the value; the bars were set from the distribution measured over several seeds, thread counts and CPU types
(README, "Tests"). To measure that distribution again:

    MLLMERASER_TEST_SEED=1 MLLMERASER_TEST_THREADS=1 MLLMERASER_BARS=bars.jsonl python -m pytest
    python benchmarks/suite_bars.py bars.jsonl        # a table: each bar's values, per build

MLLMERASER_TEST_SEED picks the fixture's seed (default 0); MLLMERASER_TEST_THREADS builds and runs it under that
many torch threads, cached apart from the default build; MLLMERASER_BARS appends one JSON line per bar checked
and lets every bar of a test be measured before the test fails on the ones it missed.
"""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path

import pytest
import torch

SMALL_PRESET = "small"
SEED = int(os.environ.get("MLLMERASER_TEST_SEED", "0"))
THREADS = int(os.environ["MLLMERASER_TEST_THREADS"]) if os.environ.get("MLLMERASER_TEST_THREADS") else None
BARS_LOG = os.environ.get("MLLMERASER_BARS")


def cpu_name() -> str:
    """The CPU's model name (what decides the float kernels a build ran on)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@pytest.fixture(scope="session")
def testbed_dir() -> Path:
    from mllmeraser.core.cache import cache_root
    from mllmeraser.testbed.build import BUILD_VERSION, build
    out = None
    if THREADS is not None:  # another thread count trains other weights: never share the default build's cache
        out = cache_root() / f"testbed-v{BUILD_VERSION}-{SMALL_PRESET}-seed{SEED}-threads{THREADS}"
    return build(out, seed=SEED, preset=SMALL_PRESET, progress=False)


@pytest.fixture(scope="session")
def testbed_data(testbed_dir) -> Path:
    return testbed_dir / "data"


@pytest.fixture(scope="session")
def testbed_model(testbed_dir):
    """(model, processor) of the cached testbed. Tests must not modify it (attach erasers in `with`)."""
    from mllmeraser.core import models
    torch.manual_seed(SEED)
    return models.load_model(testbed_dir / "model")


@pytest.fixture(scope="session")
def default_eraser(testbed_model, testbed_data):
    """The default eraser (FitSettings()) of the 10% forget request, fitted once for every test that reads it."""
    from mllmeraser import FitSettings, fit_eraser
    from mllmeraser.bench import data
    model, processor = testbed_model
    return fit_eraser(model, processor, forget=data.load_split_items(testbed_data, "forget", 10),
                      retain=data.retained_inputs(testbed_data, 10), erasure=data.default_erasure_items(testbed_data),
                      calibration=data.validation_items(testbed_data, 10), settings=FitSettings(), progress=False)


@pytest.fixture
def bar(request):
    """`bar(name, value, at_least=..., at_most=...)`: assert a quality number of the trained fixture against its
    bar, recording the value (MLLMERASER_BARS). Without recording a missed bar fails at once; with it, the test
    measures all its bars and then fails naming every one it missed."""
    missed: list[str] = []

    def check(name: str, value: float, *, at_least: float | None = None, at_most: float | None = None) -> None:
        value = float(value)
        low_ok = at_least is None or value >= at_least
        high_ok = at_most is None or value <= at_most
        if BARS_LOG:
            record = {"test": request.node.nodeid, "bar": name, "value": value, "at_least": at_least,
                      "at_most": at_most, "seed": SEED, "threads": SESSION_THREADS[0], "cpu": cpu_name()}
            with open(BARS_LOG, "a") as log:
                log.write(json.dumps(record) + "\n")
        if not (low_ok and high_ok):
            message = f"{name} = {value:.4f}, bar " + (f">= {at_least}" if not low_ok else f"<= {at_most}")
            if not BARS_LOG:
                raise AssertionError(message)
            missed.append(message)

    yield check
    if missed:
        pytest.fail("missed bars: " + "; ".join(missed), pytrace=False)


SESSION_THREADS = [torch.get_num_threads()]  # the suite's thread count (the fixture was built under it)


@pytest.fixture(autouse=True)
def keep_the_thread_count():
    """A test may run under another torch thread count, but must not leave it changed for the tests after it
    (they would run slower, and the fixture's numbers are the suite's thread count's)."""
    yield
    left = torch.get_num_threads()
    if left != SESSION_THREADS[0]:
        torch.set_num_threads(SESSION_THREADS[0])
        pytest.fail(f"the test left torch's thread count at {left}, not {SESSION_THREADS[0]}", pytrace=False)


def pytest_configure(config):
    if THREADS is not None:
        torch.set_num_threads(THREADS)
    SESSION_THREADS[0] = torch.get_num_threads()
    torch.manual_seed(SEED)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_report_header(config):
    return f"testbed fixture: preset {SMALL_PRESET}, seed {SEED}, {torch.get_num_threads()} torch threads, {cpu_name()}"
