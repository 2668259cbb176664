"""`compare` on the shared small testbed (a reduced grid), its files, and report.html in headless Chromium."""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess

import pytest

from mllmeraser.bench import compare


@pytest.fixture(scope="module")
def compared(testbed_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("compare")
    settings = compare.CompareSettings(methods=("vanilla", "eraser", "refuse", "prompt", "ga"), baseline_lrs=(3e-4,),
                                       baseline_epochs=2,
                                       curve_scales=(0.5, 1.0), cache_dir=out / "cache")
    summary = compare.run_compare(testbed_dir / "model", testbed_dir / "data", out, settings, progress=False)
    return summary, out


def test_compare_writes_every_artifact(compared):
    summary, out = compared
    for name in ("results.json", "results.md", "report.html", *compare_plots()):
        assert (out / name).stat().st_size > 0, name
    on_disk = json.loads((out / "results.json").read_text())
    assert [m["name"] for m in on_disk["methods"]] == ["vanilla", "eraser", "refuse", "prompt", "ga"]
    table, fit_line, dominance_line = (out / "results.md").read_text().strip().split("\n\n")
    assert table.count("\n") == 2 + 4 and "| eraser |" in table and "| refuse |" in table and "| prompt |" in table
    # the request's fit against the fastest baseline's, both measured in this run; the model cache built apart
    request = on_disk["request_fit"]
    eraser, ga = (next(m for m in on_disk["methods"] if m["name"] == name) for name in ("eraser", "ga"))
    assert request["eraser_seconds"] == eraser["fit_seconds"] and request["baseline_seconds"] == ga["fit_seconds"]
    assert request["fastest_baseline"] == "ga" and request["model_cache"] == "built"
    assert abs(request["ratio"] - eraser["fit_seconds"] / ga["fit_seconds"]) < 1e-12
    assert fit_line.startswith("Request fit: eraser") and f"{request['ratio']:.3f}x" in fit_line
    # the dominance check over ga's grid, recounted here from the points themselves
    mean = lambda r: (r["classification_image"] + r["classification_text"]) / 2  # noqa: E731
    e = (mean(eraser["results"]["forget"]), mean(eraser["results"]["retain"]))
    beaten = sum(e[0] <= mean(p["forget"]) and e[1] >= mean(p["retain"]) for p in ga["curve"])
    assert dominance_line.startswith(f"Dominance on classification accuracy (forget lower, retain higher; image and "
                                     f"text averaged): the eraser's point ({e[0]:.3f}, {e[1]:.3f}) dominates ga "
                                     f"{beaten} of 2")
    assert len(list((out / "cache").glob("shared-*.safetensors"))) == 1
    # before/after examples: each one's portrait is written beside the report, with every method's answer
    assert on_disk["examples"], "no before/after examples"
    for example in on_disk["examples"]:
        assert example["split"] in compare.EXAMPLE_SPLITS and example["question"]
        assert (out / example["image"]).is_file() and (out / example["image"]).stat().st_size > 0, example["image"]
        assert list(example["answers"]) == ["vanilla", "eraser", "refuse", "prompt"]
    page = (out / "report.html").read_text()
    assert "Before and after" in page and "Gate" in page


def test_dominance_counts_each_baselines_grid_against_the_erasers_point():
    from mllmeraser.bench.report import dominance, dominance_line

    point = lambda forget, retain: {"forget": {"classification_image": forget, "classification_text": forget},  # noqa: E731
                                    "retain": {"classification_image": retain, "classification_text": retain}}
    summary = {"benchmark": "mllmu", "methods": [
        {"name": "vanilla", "results": point(0.9, 0.99), "curve": []},
        {"name": "eraser", "results": point(0.0, 0.99), "curve": [{"x": 1.0, **point(0.0, 0.99)}]},
        {"name": "ga", "results": point(0.5, 0.9), "curve": [
            {"lr": 1e-4, "x": 1, **point(0.8, 0.99)},   # forgets less, keeps as much: dominated
            {"lr": 1e-4, "x": 2, **point(0.0, 0.99)},   # the eraser's own point: equal
            {"lr": 3e-4, "x": 1, **point(0.9, 0.995)},  # keeps more: not dominated
            {"lr": 3e-4, "x": 2, **point(0.0, 0.5)}]},  # as forgetful, keeps less: dominated
    ]}
    rows = dominance(summary, "classification")
    assert list(rows) == ["ga"]  # the eraser's strength curve is not a training grid, vanilla has none
    assert rows["ga"] == {"points": 4, "dominated": 2, "equal": 1, "undominated": [(0.9, 0.995)]}
    line = dominance_line(summary)
    assert "the eraser's point (0.000, 0.990) dominates ga 2 of 4 (1 equal) (the other 1: forget 0.900-0.900, " \
           "retain up to 0.005 higher) grid points." in line
    assert dominance({"methods": summary["methods"][:1]}, "classification") is None  # no eraser in the run


def compare_plots():
    from mllmeraser.bench.report import PLOTS
    return PLOTS


def test_compare_measures_every_method_on_the_same_splits(compared):
    summary, _ = compared
    vanilla, eraser, refuse, prompt, ga = summary["methods"]
    assert set(vanilla["results"]) == set(eraser["results"]) == set(refuse["results"]) == set(prompt["results"]) \
        == set(ga["results"])
    assert eraser["fit_seconds"] > 0 and ga["fit_seconds"] > 0 and eraser["peak_extra_mib"] >= 0
    assert len(eraser["curve"]) == 2 and [(p["lr"], p["x"]) for p in ga["curve"]] == [(3e-4, 1), (3e-4, 2)]
    assert "generation_overhead" not in eraser and "eraser_strength" not in summary
    # the chosen strength is the largest whose validation accuracy stays >= RETAIN_KEEP x vanilla (else the smallest)
    bar = compare.RETAIN_KEEP * summary["vanilla_validation"]
    keepers = [p["x"] for p in eraser["curve"] if compare.classification(p["validation"]) >= bar]
    assert eraser["settings"]["alpha"] == (max(keepers) if keepers else min(p["x"] for p in eraser["curve"]))


def test_compare_reports_the_fact_leak_beside_rouge(compared, bar):
    """Every method's splits carry the fact-leak rate against vanilla's answers (facts.py): vanilla keeps every fact
    it states (1), the eraser keeps every retain fact (its gate never fires there: vanilla's answers) and loses
    the forget ones; the table has the columns."""
    summary, out = compared
    methods = {m["name"]: m["results"] for m in summary["methods"]}
    vanilla, eraser = methods["vanilla"], methods["eraser"]
    for split in ("forget", "test", "retain", "real"):
        assert vanilla[split]["fact_leak"] == 1.0 and vanilla[split]["fact_stated_vanilla"] == vanilla[split]["fact_stated"]
        for name, results in methods.items():
            assert 0.0 <= results[split]["fact_leak"] <= 1.0, (name, split)
            assert results[split]["fact_stated_vanilla"] == vanilla[split]["fact_stated"], (name, split)
    assert eraser["retain"]["fact_leak"] == 1.0
    bar("compare: eraser forget fact leak", eraser["forget"]["fact_leak"], at_most=0.10)
    assert "general" not in methods["vanilla"] or "fact_leak" in vanilla["general"]  # scenes: the value named
    assert "unknown" not in vanilla or "fact_leak" not in vanilla["unknown"]  # strangers: a refusal, no fact
    header = (out / "results.md").read_text().splitlines()[0]
    assert all(f"| {split} leak |" in header for split in ("forget", "test", "retain", "real"))


def test_compare_reports_the_gate_of_every_eraser(compared):
    summary, _ = compared
    vanilla = summary["methods"][0]
    for m in summary["methods"]:
        if m["name"] not in compare.ERASER_METHODS:
            assert m["gate"] is None, m["name"]
            continue
        gate = m["gate"]
        assert 0.0 <= gate["auroc"] <= 1.0, gate["auroc"]
        # scores on every report split and on the validation people
        assert set(gate["scores"]) == set(vanilla["results"]) | {"validation"}
        assert all(gate["scores"][s] for s in gate["scores"]), {s: len(v) for s, v in gate["scores"].items()}
        if m["settings"]["gate"]["name"] == "paper":  # the paper's per-layer gate has no prompt threshold
            assert gate["fire_rate"] is None and gate["threshold"] is None
        else:
            assert all(0.0 <= gate["fire_rate"][s] <= 1.0 for s in gate["scores"]), gate["fire_rate"]
            assert gate["threshold"] and all(map(math.isfinite, gate["threshold"]))


def render_dom(html_path, profile) -> str:
    """The DOM of a page after headless Chromium has loaded it (and run its scripts)."""
    result = subprocess.run(
        ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={profile}",
         "--virtual-time-budget=5000", "--dump-dom", html_path.resolve().as_uri()],
        capture_output=True, text=True, timeout=120)
    return result.stdout


@pytest.mark.skipif(shutil.which("chromium") is None, reason="needs Debian's chromium (make test installs it)")
def test_report_renders_with_its_images_in_chromium(compared, tmp_path):
    _, out = compared
    dom = render_dom(out / "report.html", tmp_path / "profile")
    match = re.search(r'data-images-loaded="(\d+)/(\d+)"', dom)
    assert match, dom[:500]
    loaded, total = map(int, match.groups())
    examples = json.loads((out / "results.json").read_text())["examples"]
    assert total == len(compare_plots()) + len(examples) and loaded == total
    # a report whose plots and portraits went missing says so
    broken = tmp_path / "broken"
    broken.mkdir()
    shutil.copy(out / "report.html", broken / "report.html")
    dom = render_dom(broken / "report.html", tmp_path / "profile2")
    assert f'data-images-loaded="0/{total}"' in dom and "failed to load" in dom


def test_compare_refuse_and_prompt_rows(compared):
    """refuse: the eraser's gate (reused, with its fit time) and the refusal where it fires: on a split the gate
    never fires on, vanilla's scores exactly; on one it always fires on, the refusal's (no cloze, no letter).
    prompt: nothing fitted, the forget people named in its settings."""
    summary, out = compared
    methods = {m["name"]: m for m in summary["methods"]}
    vanilla, eraser, refuse, prompt = (methods[n] for n in ("vanilla", "eraser", "refuse", "prompt"))
    assert refuse["settings"]["gate_from"] == "eraser" and refuse["fit_seconds"] == eraser["fit_seconds"]
    assert refuse["gate"] is None and prompt["fit_seconds"] is None
    fire_rate = eraser["gate"]["fire_rate"]
    for split, rate in fire_rate.items():
        if split not in refuse["results"]:
            continue
        if rate == 0.0:
            assert refuse["results"][split] == vanilla["results"][split], split
        if rate == 1.0:
            scores = refuse["results"][split]
            assert all(scores[k] == 0.0 for k in scores if k.startswith(("classification", "cloze"))), split
            assert scores.get("refusal_rate", 1.0) == 1.0, split
    assert any(rate == 0.0 for rate in fire_rate.values())  # the retain people, on the testbed
    assert "Do not reveal any information" in prompt["settings"]["system_prompt"]
    page = (out / "report.html").read_text()
    assert "<td>refuse</td>" in page and "<td>prompt</td>" in page
