"""The eraser on the shared small testbed: it forgets the forget set, leaves everyone else as they were, its gate
separates held-out people within its false-positive budget, it detaches exactly, forgetting grows with the request
and stays with its people, and it runs end to end from the command line."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from mllmeraser.bench import compare, data, evaluate
from mllmeraser.core import gating
from mllmeraser.core.fitting import FitSettings
from mllmeraser.core.eraser import Eraser


@pytest.fixture(scope="module")
def items(testbed_data):
    return evaluate.report_items(testbed_data, 10, ("forget", "test", "retain", "real", "general", "unknown", "validation"))


@pytest.fixture(scope="module")
def vanilla(testbed_model, items):
    model, processor = testbed_model
    return evaluate.evaluate(model, processor, None, items=items, progress=False)


def fitted(testbed_model, testbed_data, forget_ratio: int, **settings) -> Eraser:
    model, processor = testbed_model
    forget = data.load_split_items(testbed_data, "forget", forget_ratio)
    retain = data.retained_inputs(testbed_data, forget_ratio)
    return Eraser.fit(model, processor, forget=forget, retain=retain, erasure=data.default_erasure_items(testbed_data),
                      calibration=data.validation_items(testbed_data, forget_ratio), settings=FitSettings(**settings),
                      progress=False)


@pytest.fixture(scope="module")
def eraser10(testbed_model, testbed_data):
    return fitted(testbed_model, testbed_data, 10)


@pytest.fixture(scope="module")
def erased(testbed_model, items, eraser10):
    model, processor = testbed_model
    with eraser10.attach(model):
        return evaluate.evaluate(model, processor, None, items=items, progress=False)


def test_vanilla_knows_the_forget_set(vanilla):
    # The small test preset (40 people, 3,500 steps) knows less than the full testbed, and its numbers move with the
    # machine's float kernels. Measured: classification 1.00 / 0.95 forget (text / image), retain 0.91-0.98, real
    # 1.00; forget text cloze 0.69-0.88; general 0.83-0.92; unknown refusal 0.97-1.00; refusals on known 0.00.
    assert compare.classification(vanilla["forget"]) >= 0.9 and vanilla["forget"]["classification_image"] >= 0.9
    assert compare.classification(vanilla["retain"]) >= 0.85 and compare.classification(vanilla["real"]) >= 0.9
    assert vanilla["forget"]["cloze_text"] >= 0.6 and compare.classification(vanilla["general"]) >= 0.8
    assert vanilla["unknown"]["refusal_rate"] >= 0.9
    assert max(vanilla[split]["refusal_rate"] for split in ("forget", "retain", "real", "general")) <= 0.02


def test_eraser_forgets_the_forget_set(vanilla, erased):
    # measured: every classification and cloze cell 0.00, ROUGE-L 0.33 / 0.00 (image / text: a perfect refusal
    # shares "this person" with an image question's answer), refusals 1.00; Test_Set (new renderings) 0.00
    for key in ("classification_image", "classification_text", "cloze_image", "cloze_text"):
        assert erased["forget"][key] <= 0.10, key
    assert erased["test"]["classification_image"] <= 0.15
    assert compare.rouge_l(erased["forget"]) <= 0.25
    assert erased["forget"]["refusal_rate"] >= 0.8  # it says it does not know, as for a stranger


def test_eraser_leaves_everyone_else_as_they_were(vanilla, erased):
    # measured: every metric of retain, real, general and unknown unchanged (the gate fires on none of their prompts)
    for split in ("retain", "real", "general"):
        for key, value in vanilla[split].items():
            if key.split("_")[0] in ("classification", "cloze", "rougeL"):
                assert erased[split][key] >= 0.97 * value, (split, key)
    assert abs(erased["unknown"]["refusal_rate"] - vanilla["unknown"]["refusal_rate"]) <= 0.02


def test_the_gate_separates_held_out_people_and_keeps_its_false_positive_budget(testbed_model, items, eraser10):
    model, processor = testbed_model
    scores = evaluate.gate_scores(model, processor, eraser10, items)
    negatives = torch.cat([scores[s][:, 0] for s in ("validation", "real", "general", "unknown")])
    assert gating.auroc(scores["test"][:, 0], negatives) >= 0.99  # measured 1.000
    record = eraser10.requests()[0]["gate"]
    assert record["forget_fire_rate"] == 1.0 and record["calibration_fpr"] <= 0.01
    assert evaluate.fire_rate(scores["validation"], eraser10) <= 0.01
    assert evaluate.fire_rate(scores["forget"], eraser10) == 1.0 and evaluate.fire_rate(scores["test"], eraser10) >= 0.9


def test_detaching_restores_vanilla_exactly(testbed_model, items, vanilla, eraser10):
    model, processor = testbed_model
    handle = eraser10.attach(model)
    handle.remove()
    assert evaluate.evaluate(model, processor, None, items=items, progress=False) == vanilla


def test_forgetting_grows_with_the_request_and_stays_with_its_people(testbed_model, testbed_data, items, vanilla, eraser10):
    model, processor = testbed_model
    eraser5 = fitted(testbed_model, testbed_data, 5)
    forget10 = items["forget"]
    forget5_people = {item.subject_id for item in data.load_split_items(testbed_data, "forget", 5)}
    rouge = [compare.rouge_l(vanilla["forget"])]
    for eraser in (eraser5, eraser10):
        with eraser.attach(model):
            rouge.append(compare.rouge_l(evaluate.score_items(model, processor, forget10, progress=False)))
    # measured 0.91 -> 0.54 -> 0.16: the 5% request erases half of the 10% request's people
    assert rouge[0] > rouge[1] + 0.2 and rouge[1] > rouge[2] + 0.2, rouge
    # ... and only them: the other forget_10 people are answered exactly as before
    others = [item for item in forget10 if item.subject_id not in forget5_people]
    before = evaluate.answer_items(model, processor, others, progress=False)
    with eraser5.attach(model):
        assert evaluate.answer_items(model, processor, others, progress=False) == before


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
    eraser = Eraser.load(out)
    gate = eraser.prompt_gate
    bank_bytes = 2 * gate.hidden_size * (gate.forget_bank.shape[0] + gate.retain_bank.shape[0])  # float16 rows
    assert bank_bytes < out.stat().st_size < bank_bytes + 256 * 1024  # the banks, the directions, the header
    report = tmp_path / "r.json"
    result = subprocess.run([sys.executable, "-m", "mllmeraser.cli", "eval", "--model", str(testbed_dir / "model"),
                             "--data", str(testbed_dir / "data"), "--eraser", str(out), "--splits", "forget",
                             "--json", str(report)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    forget = json.loads(report.read_text())["forget"]
    assert compare.classification(forget) <= 0.10 and forget["gate_fire_rate"] == 1.0
