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
from mllmeraser.core.settings import FitSettings
from mllmeraser.core.eraser import Eraser
from mllmeraser.core.eraser_fitter import fit_eraser


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
    return fit_eraser(model, processor, forget=forget, retain=retain, erasure=data.default_erasure_items(testbed_data),
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


def test_vanilla_knows_the_forget_set(vanilla, bar):
    # The small test preset (40 people, 3,500 steps) knows less than the full testbed, and its numbers move with the
    # machine's float kernels, the thread count and the seed (the measured ranges: README, "Tests").
    bar("vanilla forget classification", compare.classification(vanilla["forget"]), at_least=0.9)
    bar("vanilla forget classification_image", vanilla["forget"]["classification_image"], at_least=0.85)  # 0.90-1.00
    bar("vanilla retain classification", compare.classification(vanilla["retain"]), at_least=0.85)
    bar("vanilla real classification", compare.classification(vanilla["real"]), at_least=0.9)
    bar("vanilla forget cloze_text", vanilla["forget"]["cloze_text"], at_least=0.6)
    bar("vanilla general classification", compare.classification(vanilla["general"]), at_least=0.65)  # 0.71-0.94
    bar("vanilla unknown refusal_rate", vanilla["unknown"]["refusal_rate"], at_least=0.85)
    bar("vanilla known refusal_rate (max)",
        max(vanilla[split]["refusal_rate"] for split in ("forget", "retain", "real", "general")), at_most=0.02)


def test_eraser_forgets_the_forget_set(vanilla, erased, bar):
    for key in ("classification_image", "classification_text", "cloze_image", "cloze_text"):
        bar(f"erased forget {key}", erased["forget"][key], at_most=0.10)
    # Test_Set (new renderings of the forget people) leaks where the gate does not fire on them: 0.00-0.25 over the
    # builds measured, as the gate's fire rate there is 0.75-1.00 (the gate issue's finding, not this test's bar)
    bar("erased test classification_image", erased["test"]["classification_image"], at_most=0.3)
    bar("erased forget rougeL", compare.rouge_l(erased["forget"]), at_most=0.25)
    bar("erased forget refusal_rate", erased["forget"]["refusal_rate"], at_least=0.8)  # says it does not know


def ratios(vanilla: dict, erased: dict, splits: tuple[str, ...]) -> list[float]:
    """erased / vanilla for every classification, cloze and ROUGE-L cell of `splits`."""
    return [erased[split][key] / value for split in splits for key, value in vanilla[split].items()
            if key.split("_")[0] in ("classification", "cloze", "rougeL") and value > 0]


def test_eraser_leaves_everyone_else_as_they_were(vanilla, erased, bar):
    # The retained fictitious people and the scenes are in the gate's retain bank: it fires on none of their
    # prompts on any build measured, and every metric is unchanged. The "real" people are in no bank and the
    # threshold is calibrated on fictitious validation people: on one build (seed 1, one thread) the gate fired
    # on 5.9% of their prompts (real cloze_image 1.00 -> 0.84), on the others on none. That is what the method
    # guarantees today, and the gate issue's finding.
    bar("erased/vanilla, retain and general (min)", min(ratios(vanilla, erased, ("retain", "general"))), at_least=0.97)
    bar("erased/vanilla, real (min)", min(ratios(vanilla, erased, ("real",))), at_least=0.8)
    bar("unknown refusal_rate change", abs(erased["unknown"]["refusal_rate"] - vanilla["unknown"]["refusal_rate"]),
        at_most=0.02)


def test_the_gate_separates_held_out_people_and_keeps_its_false_positive_budget(testbed_model, items, eraser10, bar):
    model, processor = testbed_model
    scores = evaluate.gate_scores(model, processor, eraser10, items)
    negatives = torch.cat([scores[s][:, 0] for s in ("validation", "real", "general", "unknown")])
    bar("gate auroc, test vs negatives", gating.auroc(scores["test"][:, 0], negatives), at_least=0.99)
    record = eraser10.requests()[0]["gate"]
    assert record["forget_fire_rate"] == 1.0 and record["calibration_fpr"] <= 0.01  # by construction of tau
    bar("gate fire rate, validation", evaluate.fire_rate(scores["validation"], eraser10), at_most=0.01)
    bar("gate fire rate, forget", evaluate.fire_rate(scores["forget"], eraser10), at_least=1.0)
    # new renderings: 0.75-1.00 over the builds measured (AMD Zen 4, seed 0, two threads: 0.75)
    bar("gate fire rate, test (new renderings)", evaluate.fire_rate(scores["test"], eraser10), at_least=0.7)


def test_detaching_restores_vanilla_exactly(testbed_model, items, vanilla, eraser10):
    model, processor = testbed_model
    handle = eraser10.attach(model)
    handle.remove()
    assert evaluate.evaluate(model, processor, None, items=items, progress=False) == vanilla


def test_forgetting_grows_with_the_request_and_stays_with_its_people(testbed_model, testbed_data, items, vanilla, eraser10,
                                                                     bar):
    model, processor = testbed_model
    eraser5 = fitted(testbed_model, testbed_data, 5)
    forget10 = items["forget"]
    forget5_people = {item.subject_id for item in data.load_split_items(testbed_data, "forget", 5)}
    rouge = [compare.rouge_l(vanilla["forget"])]
    for eraser in (eraser5, eraser10):
        with eraser.attach(model):
            rouge.append(compare.rouge_l(evaluate.score_items(model, processor, forget10, progress=False)))
    # the 5% request erases half of the 10% request's people
    bar("forget rougeL drop, vanilla -> 5% eraser", rouge[0] - rouge[1], at_least=0.2)
    bar("forget rougeL drop, 5% -> 10% eraser", rouge[1] - rouge[2], at_least=0.2)
    # ... and only them: the other forget_10 people are answered exactly as before
    others = [item for item in forget10 if item.subject_id not in forget5_people]
    before = evaluate.answer_items(model, processor, others, progress=False)
    with eraser5.attach(model):
        assert evaluate.answer_items(model, processor, others, progress=False) == before


def test_paper_mode_is_a_working_alternative(testbed_model, testbed_data, items, vanilla, bar):
    model, processor = testbed_model
    paper = fitted(testbed_model, testbed_data, 10, **compare.PAPER_SETTINGS)
    with paper.attach(model):
        forget = evaluate.score_items(model, processor, items["forget"], progress=False)
    bar("paper mode: forget classification drop", compare.classification(vanilla["forget"]) - compare.classification(forget),
        at_least=0.01)


def test_fit_and_eval_from_the_command_line(testbed_dir, tmp_path, bar):
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
    bar("cli: erased forget classification", compare.classification(forget), at_most=0.10)
    bar("cli: gate fire rate, forget", forget["gate_fire_rate"], at_least=1.0)
