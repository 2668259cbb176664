"""The MLLMU-Bench metrics and the harness: rules checked by hand, batched == unbatched, JSON output."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from mllmeraser.bench import evaluate, prompts
from mllmeraser.core.models import answer_items
from mllmeraser.bench.items import QAItem


def test_classification_takes_the_first_alphanumeric_character():
    item = QAItem("s", "classification", "text", "q", "B", {"A": "x", "B": "y", "C": "z", "D": "w"})
    assert evaluate.item_scores(item, " (b) because")["classification_text"] == 1.0
    assert evaluate.item_scores(item, "A: y")["classification_text"] == 0.0
    assert evaluate.item_scores(item, "")["classification_text"] == 0.0
    assert "refusal_rate" not in evaluate.item_scores(item, "B")


def test_cloze_is_case_insensitive_containment():
    item = QAItem("s", "cloze", "image", "born in __.", "Lisbon")
    assert evaluate.item_scores(item, "She was born in lisbon.")["cloze_image"] == 1.0
    assert evaluate.item_scores(item, "Porto")["cloze_image"] == 0.0


def test_generation_rouge_and_bleu():
    item = QAItem("s", "generation", "text", "q", "This person was born in Lisbon.")
    exact = evaluate.item_scores(item, "This person was born in Lisbon.")
    assert exact["rougeL_text"] == pytest.approx(1.0) and exact["bleu_text"] == pytest.approx(1.0)
    partial = evaluate.item_scores(item, "This person was born in Porto.")
    assert partial["rougeL_text"] == pytest.approx(5 / 6)  # 5 of 6 stemmed tokens in common, both ways
    refusal = evaluate.item_scores(item, prompts.REFUSAL_ANSWER)
    assert refusal["refusal_rate"] == 1.0 and refusal["rougeL_text"] == pytest.approx(1 / 3)  # "this person" only


def test_aggregate_means_per_metric():
    assert evaluate.aggregate([{"a": 1.0}, {"a": 0.0, "b": 0.5}]) == {"a": 0.5, "b": 0.5}


def test_batched_generation_equals_unbatched(testbed_model, testbed_data):
    model, processor = testbed_model
    items = evaluate.report_items(testbed_data, 10, ("forget", "retain"))
    chosen = []
    for task in ("classification", "cloze", "generation"):
        for modality in ("image", "text"):
            chosen += [i for i in items["retain"] if i.task == task and i.modality == modality][:6]
    batched = answer_items(model, processor, chosen, batch_size=64, progress=False)
    single = [answer_items(model, processor, [item], batch_size=1, progress=False)[0] for item in chosen]
    assert batched == single
    assert len({len(processor.tokenizer(a)["input_ids"]) for a in batched}) > 1  # answers of several lengths


def test_eval_cli_writes_json_of_fractions(testbed_dir, tmp_path):
    out = tmp_path / "r.json"
    result = subprocess.run([sys.executable, "-m", "mllmeraser.cli", "eval", "--model", str(testbed_dir / "model"),
                             "--data", str(testbed_dir / "data"), "--splits", "forget,unknown", "--json", str(out)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    results = json.loads(out.read_text())
    assert set(results) == {"forget", "unknown"}
    assert {"classification_image", "classification_text", "cloze_image", "cloze_text", "rougeL_image",
            "rougeL_text", "rouge1_image", "rouge2_text", "bleu_image", "refusal_rate"} <= set(results["forget"])
    assert all(0.0 <= v <= 1.0 for split in results.values() for v in split.values())
    assert "forget" in result.stdout and "refusal_rate" in result.stdout
