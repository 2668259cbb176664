"""Open-MMUnlearning's scores (bench/omu.py) on hand-made metric dicts, and `compare --forget-ratio 5,10` on the
cached testbed with the evaluation replaced by canned numbers (what is under test is the run's shape: one run
per request size on one loaded model, a table each, the plot over sizes)."""

from __future__ import annotations

import json
import math

import pytest

from mllmeraser import cli
from mllmeraser.bench import compare, omu, report

FORGET = {"classification_image": 0.8, "classification_text": 0.6, "cloze_image": 0.5, "cloze_text": 0.3,
          "rougeL_image": 0.4, "rougeL_text": 0.2, "bleu_image": 0.9, "refusal_rate": 0.7}  # the last two: not task metrics
RETAIN = {"classification_image": 0.9, "classification_text": 0.7, "cloze_image": 0.6, "cloze_text": 0.4,
          "rougeL_image": 0.5, "rougeL_text": 0.3}
REAL = {"classification_text": 0.5, "rougeL_text": 0.1}  # a split with only some of the metrics


def test_omu_scores_equal_the_hand_computation():
    results = {"forget": FORGET, "test": {"classification_image": 0.0}, "retain": RETAIN, "real": REAL,
               "general": {"classification_image": 0.0}}
    fq = 1 - (0.8 + 0.6 + 0.5 + 0.3 + 0.4 + 0.2) / 6  # = 0.5333...
    mu = ((0.9 + 0.7 + 0.6 + 0.4 + 0.5 + 0.3) / 6 + (0.5 + 0.1) / 2) / 2  # retain 0.5667, real 0.3: 0.4333...
    scores = omu.scores(results)
    assert scores["forget_quality"] == pytest.approx(fq, abs=1e-12) == pytest.approx(0.533333, abs=1e-6)
    assert scores["model_utility"] == pytest.approx(mu, abs=1e-12) == pytest.approx(0.433333, abs=1e-6)
    assert scores["hm"] == pytest.approx(2 * fq * mu / (fq + mu), abs=1e-12) == pytest.approx(0.478161, abs=1e-6)
    # test and general never count; a run without real is utility on retain alone
    assert omu.model_utility({"retain": RETAIN}) == pytest.approx(3.4 / 6)
    nothing_kept = omu.scores({"forget": {k: 0.0 for k in omu.TASK_METRICS}, "retain": {k: 0.0 for k in omu.TASK_METRICS}})
    assert nothing_kept == {"forget_quality": 1.0, "model_utility": 0.0, "hm": 0.0}
    assert math.isnan(omu.scores({})["hm"])
    # their reference points sit where the definitions put a retain-only model: forgets some, keeps some
    assert all(0 < fq < 1 and 0 < mu < 1 for fq, mu in omu.REFERENCE.values())


def canned_results(ratio: int):
    """Hand-made {split: metrics} whose forget numbers depend on the request size."""
    forget = {k: ratio / 100 for k in omu.TASK_METRICS}
    kept = {k: 0.8 for k in omu.TASK_METRICS}
    return {"forget": forget, "test": {"classification_image": 0.5}, "retain": kept, "real": kept,
            "general": {"classification_image": 0.9}, "unknown": {"refusal_rate": 0.9}, "validation": kept}


@pytest.fixture
def cheap_compare(monkeypatch):
    """compare's model loads counted and evaluations canned (by the harness's request size); no examples."""
    loads = []
    real_load = compare.models.load_model

    def counted_load(*args, **kwargs):
        loads.append(args)
        return real_load(*args, **kwargs)

    def canned_evaluate(self, model=None, splits=None, **options):  # reference=True for vanilla: nothing to keep
        results = canned_results(self.settings.forget_ratio)
        return {s: results[s] for s in (splits or results) if s in results}

    monkeypatch.setattr(compare.models, "load_model", counted_load)
    monkeypatch.setattr(compare.Harness, "evaluate", canned_evaluate)
    monkeypatch.setattr(compare, "examples", lambda h, methods, out_dir, people=2: [])
    return loads


def test_compare_over_two_request_sizes_writes_a_table_each_and_one_plot(testbed_dir, tmp_path, cheap_compare, capsys):
    out = tmp_path / "run"
    args = ["compare", "--model", str(testbed_dir / "model"), "--data", str(testbed_dir / "data"), "--methods", "",
            "--forget-ratio", "5,10", "--out", str(out), "--no-cache"]
    assert cli.main(args) == 0
    assert len(cheap_compare) == 1  # one model for both sizes
    combined = json.loads((out / "results.json").read_text())
    assert combined["forget_ratios"] == [5, 10] and [r["forget_ratio"] for r in combined["runs"]] == [5, 10]
    markdown = (out / "results.md").read_text()
    assert markdown.count("## forget ") == 2 and "## forget 5%" in markdown and "## forget 10%" in markdown
    assert markdown.count("| method |") == 2 and markdown.count("| vanilla |") == 2
    # each size's OMU numbers are its own: forget quality 1 - ratio/100, utility 0.8
    for run, ratio in zip(combined["runs"], (5, 10)):
        vanilla = run["methods"][0]
        assert vanilla["omu"]["forget_quality"] == pytest.approx(1 - ratio / 100)
        assert vanilla["omu"]["model_utility"] == pytest.approx(0.8)
        assert f"| vanilla | {ratio / 100:.3f} |" in markdown  # forget cls img, the first column
        assert (out / report.ratio_dir(ratio) / "results.md").is_file()
        assert (out / report.ratio_dir(ratio) / "report.html").is_file()
    assert (out / report.RATIO_PLOT).stat().st_size > 0
    page = (out / "report.html").read_text()
    assert page.count("<h2>Forget ") == 2 and f'src="{report.RATIO_PLOT}"' in page and "forget_5/report.html" in page
    printed = capsys.readouterr().out
    assert printed.count("## forget ") == 2


def test_one_request_size_keeps_the_single_run(testbed_dir, tmp_path, cheap_compare):
    out = tmp_path / "single"
    args = ["compare", "--model", str(testbed_dir / "model"), "--data", str(testbed_dir / "data"), "--methods", "",
            "--forget-ratio", "10", "--out", str(out), "--no-cache"]
    assert cli.main(args) == 0
    summary = json.loads((out / "results.json").read_text())
    assert summary["forget_ratio"] == 10 and "runs" not in summary  # today's results.json, in --out itself
    assert not (out / report.ratio_dir(10)).exists() and not (out / report.RATIO_PLOT).exists()
    table = (out / "results.md").read_text()
    assert "## forget" not in table and table.count("| vanilla |") == 1 and "OMU FQ" in table
