"""Shared fixtures. The trained testbed is built once per machine (the `small` preset, cached under the
per-user cache dir) and reused by every test and every later run; nothing retrains per test."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

SMALL_PRESET = "small"
SEED = 0


@pytest.fixture(scope="session")
def testbed_dir() -> Path:
    from mllmeraser.testbed.build import build
    return build(seed=SEED, preset=SMALL_PRESET, progress=False)


@pytest.fixture(scope="session")
def testbed_data(testbed_dir) -> Path:
    return testbed_dir / "data"


@pytest.fixture(scope="session")
def testbed_model(testbed_dir):
    """(model, processor) of the cached testbed. Tests must not modify it (attach erasers in `with`)."""
    from mllmeraser.core import models
    torch.manual_seed(SEED)
    return models.load_model(testbed_dir / "model")


def pytest_configure(config):
    torch.manual_seed(SEED)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
