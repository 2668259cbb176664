"""Device, dtype and device_map: the defaults, and a bfloat16 model loaded with device_map="auto", fitted and
steered through the same code as a float32 one. (Without a GPU, "auto" keeps every layer on the CPU; the hooks
move their terms to each layer's device, which is what a model spread over GPUs needs.)"""

from __future__ import annotations

import pytest
import torch

import tiny_families
from mllmeraser.bench import prompts
from mllmeraser.core import models
from mllmeraser.core.settings import FitSettings, PGDSettings
from mllmeraser.core.eraser_fitter import fit_eraser
from mllmeraser.bench.items import QAItem
from mllmeraser.errors import UserInputError


def test_default_placement_is_the_gpu_in_bfloat16_where_there_is_one(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert models.resolve_device(None) == torch.device("cpu")
    assert models.resolve_dtype(None, torch.device("cpu")) == torch.float32
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert models.resolve_device(None) == torch.device("cuda")
    assert models.resolve_dtype(None, torch.device("cuda")) == torch.bfloat16
    assert models.resolve_dtype("fp16", torch.device("cuda")) == torch.float16
    assert models.resolve_dtype("auto", torch.device("cpu")) == "auto"  # the checkpoint's own dtype
    with pytest.raises(UserInputError, match="--dtype 'float8'"):
        models.resolve_dtype("float8", torch.device("cpu"))
    with pytest.raises(UserInputError, match="--device 'gpu0'"):
        models.resolve_device("gpu0")


@pytest.mark.parametrize("name", list(tiny_families.BUILDERS))
def test_a_bfloat16_device_mapped_model_fits_and_steers(name, tmp_path):
    directory = tiny_families.BUILDERS[name](tmp_path / name, seed=0)
    model, processor = models.load_model(directory, dtype="bfloat16", device_map="auto")
    assert next(model.parameters()).dtype == torch.bfloat16
    assert model.device.type == "cpu"  # with no GPU, "auto" puts every layer on the CPU
    forget, retain = tiny_families.make_items(0, 2), tiny_families.make_items(2, 2)
    erasure = [QAItem(i.subject_id, i.task, i.modality, i.question, prompts.REFUSAL_ANSWER, i.options, i.image)
               for i in tiny_families.make_items(4, 2) if i.task != "classification"]
    settings = FitSettings(pgd=PGDSettings(steps=2), batch_size=8)
    eraser = fit_eraser(model, processor, forget=forget, retain=retain, erasure=erasure, settings=settings,
                        progress=False)
    assert bool(torch.isfinite(eraser.r).all()) and eraser.r.dtype == torch.float32  # fitted in bf16, kept in fp32
    assert eraser.requests()[0]["gate"]["forget_fire_rate"] == 1.0
    questions = [i for i in forget if i.task != "classification"]
    before = models.answer_items(model, processor, questions, progress=False)
    with eraser.with_alpha(200.0).attach(model):
        during = models.answer_items(model, processor, questions, progress=False)
    assert models.answer_items(model, processor, questions, progress=False) == before
    assert during != before
