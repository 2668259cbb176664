"""The eraser on the shared small testbed: it forgets the forget set, keeps the rest, detaches exactly,
forgets monotonically as the request grows, and runs end to end from the command line."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from mllmeraser.bench import compare, data, evaluate
from mllmeraser.core.fitting import FitSettings
from mllmeraser.core.eraser import Eraser


@pytest.fixture(scope="module")
def items(testbed_data):
    return evaluate.report_items(testbed_data, 10, ("forget", "retain", "real", "general", "unknown"))


@pytest.fixture(scope="module")
def vanilla(testbed_model, items):
    model, processor = testbed_model
    return evaluate.evaluate(model, processor, None, items=items, progress=False)


def fitted(testbed_model, testbed_data, forget_ratio: int, **settings) -> Eraser:
    model, processor = testbed_model
    forget = data.load_split_items(testbed_data, "forget", forget_ratio)
    retain = data.retained_inputs(testbed_data, forget_ratio)
    return Eraser.fit(model, processor, forget=forget, retain=retain, erasure=data.default_erasure_items(testbed_data),
                      settings=FitSettings(**settings), progress=False)


@pytest.fixture(scope="module")
def eraser10(testbed_model, testbed_data):
    return fitted(testbed_model, testbed_data, 10)


@pytest.fixture(scope="module")
def erased(testbed_model, items, eraser10):
    model, processor = testbed_model
    with eraser10.attach(model):
        return evaluate.evaluate(model, processor, None, items=items, progress=False)


def test_vanilla_knows_the_forget_set(vanilla):
    # The small test preset (40 people, 3,500 steps) knows less than the full testbed. Measured on the build CI
    # makes: classification 1.00 forget (image and text), 0.98 retain, 1.00 real; text cloze 0.875; general
    # 0.92; unknown refusal 1.00; refusals on known people 0.00.
    assert compare.classification(vanilla["forget"]) >= 0.9 and vanilla["forget"]["classification_image"] >= 0.9
    assert compare.classification(vanilla["retain"]) >= 0.9 and compare.classification(vanilla["real"]) >= 0.9
    assert vanilla["forget"]["cloze_text"] >= 0.8 and compare.classification(vanilla["general"]) >= 0.85
    assert vanilla["unknown"]["refusal_rate"] >= 0.9
    assert max(vanilla[split]["refusal_rate"] for split in ("forget", "retain", "real", "general")) <= 0.02


def test_eraser_forgets_the_forget_set(vanilla, erased):
    # measured: classification 1.00 -> 0.26, ROUGE-L 0.96 -> 0.20, refusals 0.00 -> 0.89
    assert compare.classification(erased["forget"]) <= min(0.35, compare.classification(vanilla["forget"]) - 0.5)
    assert erased["forget"]["cloze_text"] <= 0.15 and erased["forget"]["cloze_image"] <= 0.05
    assert compare.rouge_l(erased["forget"]) < min(0.35, compare.rouge_l(vanilla["forget"]) - 0.5)
    assert erased["forget"]["refusal_rate"] >= 0.8  # it says it does not know, as for a stranger


def test_eraser_hits_the_forget_set_harder_than_the_rest(vanilla, erased):
    # measured: classification drops forget 0.74, retain 0.23, real 0.33 (people the fit never saw), general 0.04
    drop = {split: compare.classification(vanilla[split]) - compare.classification(erased[split])
            for split in ("forget", "retain", "real", "general")}
    assert drop["forget"] > 2 * max(drop["retain"], drop["real"], drop["general"]), drop
    assert compare.classification(erased["retain"]) >= 0.75 * compare.classification(vanilla["retain"])
    assert compare.classification(erased["real"]) >= 0.6 * compare.classification(vanilla["real"])
    # General_Train is among the retained inputs the gate is fitted on: visual-skill answers barely move
    assert drop["general"] <= 0.05
    assert abs(compare.rouge_l(erased["general"]) - compare.rouge_l(vanilla["general"])) <= 0.03
    assert erased["unknown"]["refusal_rate"] >= vanilla["unknown"]["refusal_rate"] - 0.05


def test_detaching_restores_vanilla_exactly(testbed_model, items, vanilla, eraser10):
    model, processor = testbed_model
    handle = eraser10.attach(model)
    handle.remove()
    assert evaluate.evaluate(model, processor, None, items=items, progress=False) == vanilla


def test_forgetting_grows_with_the_request(testbed_model, testbed_data, items, vanilla, eraser10):
    model, processor = testbed_model
    eraser5 = fitted(testbed_model, testbed_data, 5)
    forget10 = items["forget"]
    rouge = [compare.rouge_l(vanilla["forget"])]
    for eraser in (eraser5, eraser10):
        with eraser.attach(model):
            rouge.append(compare.rouge_l(evaluate.score_items(model, processor, forget10, progress=False)))
    assert rouge[0] > rouge[1] + 0.2 > rouge[2] + 0.2 + 0.05, rouge


def test_paper_mode_is_a_working_alternative(testbed_model, testbed_data, items, vanilla):
    model, processor = testbed_model
    paper = fitted(testbed_model, testbed_data, 10, **compare.PAPER_SETTINGS)
    with paper.attach(model):
        forget = evaluate.score_items(model, processor, items["forget"], progress=False)
    assert compare.classification(forget) < compare.classification(vanilla["forget"])


def test_fit_and_eval_from_the_command_line(testbed_dir, tmp_path):
    out = tmp_path / "forget10.safetensors"
    result = subprocess.run([sys.executable, "-m", "mllmeraser.cli", "fit", "--model", str(testbed_dir / "model"),
                             "--data", str(testbed_dir / "data"), "--forget", "forget_10",
                             "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert 0 < out.stat().st_size < 1024 * 1024
    report = tmp_path / "r.json"
    result = subprocess.run([sys.executable, "-m", "mllmeraser.cli", "eval", "--model", str(testbed_dir / "model"),
                             "--data", str(testbed_dir / "data"), "--eraser", str(out), "--splits", "forget",
                             "--json", str(report)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert compare.classification(json.loads(report.read_text())["forget"]) <= 0.55
