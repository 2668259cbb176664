"""`compare` and `attack` on CLEAR data: the small testbed written in CLEAR's layout (testbed/clear_export.py), cut
down to a few rows a config so a run takes minutes. Every method is fitted on the forget and retain configs, chosen
on held-out retain people and reported with CLEAR's metrics; the attacks that apply to CLEAR's questions run on its
rows and the others are named with their reason; a wrong or missing config is one line, exit 2, before any model
loads."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from mllmeraser import cli
from mllmeraser.bench import attack_scoring, attacks, clear, clear_attacks, clear_harness, compare, report
from mllmeraser.bench.clear_rows import CAPTION_QUESTIONS, NAME_QUESTION
from mllmeraser.bench.data import VALIDATION_SPLIT, validation_rank
from mllmeraser.bench.items import QAItem
from mllmeraser.errors import UserInputError
from mllmeraser.testbed.clear_export import write_clear_layout, write_config

RETAIN_PEOPLE = 12
BASELINES = ("ga", "graddiff", "kl", "npo", "mmunlearner")


def cut(root: Path, config: str, columns, keep) -> list[dict]:
    """Rewrite a config with only the rows `keep(index, row)` accepts; returns them."""
    rows = [row for index, (_, _, row) in enumerate(clear.read_config(root, config, columns)) if keep(index, row)]
    write_config(root, config, rows)
    return rows


def write_small_clear(testbed_dir: Path, out: Path) -> Path:
    """The small testbed in CLEAR's layout, cut down: each forget person's portrait row only (forget10 and its
    perturbed config), the first RETAIN_PEOPLE people of retain_perturbed (retain90 cut to the same people),
    three real faces and four real-world questions."""
    write_clear_layout(testbed_dir / "data", out)
    for config in ("forget10", "forget10_perturbed"):
        portraits: dict[str, dict] = {}  # each person's first row: the portrait
        for _, _, row in clear.read_config(out, config, clear.PERSON_COLUMNS):
            portraits.setdefault(row["name"], row)
        write_config(out, config, list(portraits.values()))
    names = list(dict.fromkeys(row["name"] for _, _, row in clear.read_config(out, clear.RETAIN_PERTURBED,
                                                                              clear.PERSON_COLUMNS)))[:RETAIN_PEOPLE]
    for config in (clear.RETAIN_PERTURBED, "retain90"):
        cut(out, config, clear.PERSON_COLUMNS, lambda i, row: row["name"] in names)
    cut(out, clear.REAL_FACES, clear.REAL_FACES_COLUMNS, lambda i, row: i < 3)
    cut(out, clear.REAL_WORLD, clear.REAL_WORLD_COLUMNS, lambda i, row: i < 4)
    return out


@pytest.fixture(scope="module")
def small_clear(testbed_dir, tmp_path_factory) -> Path:
    return write_small_clear(testbed_dir, tmp_path_factory.mktemp("clear") / "clear")


def erasure_spec(testbed_dir: Path) -> str:
    """The erasers' refusals: the build's Unknown_Train (CLEAR has no questions the model refuses)."""
    return str(testbed_dir / "data" / "Unknown_Train")


def run_error(args: list[str], capsys) -> str:
    assert cli.main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("mllmeraser: error: ") and "\n" not in err and "Traceback" not in err
    return err


# ---- the harness: what each method is fitted, chosen and measured on ---------------------------------------------

def test_the_harness_holds_out_retain_people_and_fits_on_the_configs(small_clear, testbed_dir, testbed_model):
    settings = compare.CompareSettings(benchmark="clear", cache_dir=None)
    h = clear_harness.ClearHarness(testbed_dir / "model", small_clear, settings, False, loaded=testbed_model)
    retain_people = {row["name"] for _, _, row in clear.read_config(small_clear, clear.RETAIN_PERTURBED, ("name",))}
    # the validation people: MLLMU-Bench's hash rule over retain_perturbed's people, at least one, one at least kept
    ranked = sorted(retain_people, key=validation_rank)
    assert h.held_out == ({n for n in ranked if validation_rank(n) < 0.1} or {ranked[0]})
    assert 1 <= len(h.held_out) < len(retain_people)
    subjects = {split: {i.subject_id for i in items} for split, items in h.items.items()}
    assert subjects[VALIDATION_SPLIT] == h.held_out
    assert subjects["retain"] == retain_people - h.held_out  # reported without them
    assert not {i.subject_id for i in h.retain_fit} & h.held_out  # fitted without them
    assert {i.subject_id for i in h.retain_fit} == retain_people - h.held_out
    # the fits read the forget config: a caption question and the name question per row
    forget_rows = clear.read_config(small_clear, "forget10", clear.PERSON_COLUMNS)
    assert len(h.forget) == 2 * len(forget_rows) and {i.subject_id for i in h.forget} == set(h.forget_names)
    assert {i.question for i in h.forget} - set(CAPTION_QUESTIONS) == {NAME_QUESTION}
    assert list(h.report_splits) == ["forget", "retain", "real_faces", "real_world"]
    # the validation score is the plain mean of the validation metrics; the prompt names the forget people only
    assert h.validation_score({"a": 0.2, "b": 0.0, "c": 1.0}) == pytest.approx(0.4)
    assert all(name in h.system_prompt() for name in h.forget_names)
    assert not any(name in h.system_prompt() for name in retain_people)


def test_people_tasks_and_asked_tasks_keep_the_row_order():
    item = lambda who: QAItem(who, "generation", "image", "q", who, verbatim=True)  # noqa: E731
    task = clear.ClearTask("eval_log", "", False, False,
                           tuple(clear.ClearQuestion(item(w), w, ("x",)) for w in ("a", "b", "c")))
    (kept,) = clear_harness.people_tasks([task], {"b"}, keep=True)
    (rest,) = clear_harness.people_tasks([task], {"b"}, keep=False)
    assert [q.item.subject_id for q in kept.questions] == ["b"]
    assert [q.item.subject_id for q in rest.questions] == ["a", "c"]
    asked = clear_harness.asked_task(task, lambda items: [QAItem(i.subject_id, i.task, i.modality, "S\n" + i.question,
                                                                 i.answer, verbatim=True) for i in items])
    assert [q.item.question for q in asked.questions] == ["S\nq"] * 3 and asked.questions[0].perturbed == ("x",)
    with pytest.raises(UserInputError) as raised:
        clear_harness.validation_people(clear_harness.people_tasks([task], {"a"}, keep=True))
    assert "none can be held out" in str(raised.value)


# ---- compare on CLEAR -----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def compared(small_clear, testbed_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("clear-compare")
    settings = compare.CompareSettings(methods=("vanilla", "eraser", "refuse", "prompt") + BASELINES,
                                       baseline_lrs=(1e-3,), baseline_epochs=1, mmunlearner_thresholds=(1.0,),
                                       curve_scales=(0.5, 1.0), batch_size=16, erasure=erasure_spec(testbed_dir),
                                       cache_dir=out / "cache")
    summary = compare.run_compare(testbed_dir / "model", small_clear, out, settings, progress=False)
    return summary, out


def test_compare_on_clear_reports_its_metrics_for_every_method(compared, capsys):
    summary, out = compared
    assert summary["benchmark"] == "clear" and summary["splits"] == ["forget", "retain", "real_faces", "real_world"]
    names = [m["name"] for m in summary["methods"]]
    assert names == ["vanilla", "eraser", "refuse", "prompt", *BASELINES]
    metrics = {"rougeL_recall", "prob", "truth_ratio"}
    for m in summary["methods"]:
        results = m["results"]
        assert list(results) == ["forget", "retain", "real_faces", "real_world", "utility"], m["name"]
        for split in ("forget", "retain"):
            assert set(results[split]) == metrics | {f"facerec_{k}" for k in metrics}, (m["name"], split)
        for split in ("real_faces", "real_world"):
            assert set(results[split]) == metrics, (m["name"], split)
        assert all(0.0 <= v <= 1.0 for split in results.values() for v in split.values()), m["name"]
        kept = [v for split in ("retain", "real_faces", "real_world") for v in results[split].values()]
        assert results["utility"]["model_utility"] == pytest.approx(clear.harmonic_mean(kept))
        # Open-MMUnlearning on CLEAR: its model utility is CLEAR's; its forget quality needs a retrained model
        assert m["omu"]["model_utility"] == results["utility"]["model_utility"]
        assert math.isnan(m["omu"]["forget_quality"]) and math.isnan(m["omu"]["hm"])
    table = (out / "results.md").read_text()
    assert all(f"| {name} |" in table for name in names)
    header = table.splitlines()[0]
    assert "| forget name R-L |" in header and "| real world TR |" in header and "| utility |" in header
    assert "cls" not in header  # no MLLMU-Bench column
    for plot in report.plots(summary):
        assert (out / plot).stat().st_size > 0, plot
    assert not (out / "omu.png").exists()
    page = (out / "report.html").read_text()
    assert "On CLEAR, Open-MMUnlearning reports CLEAR's own scores" in page
    assert "held-out retain people" in page


def test_compare_on_clear_chooses_each_setting_on_the_validation_people(compared):
    """The rule MLLMU-Bench's compare applies: the strongest setting whose validation score (here the mean of CLEAR's
    metrics on the held-out retain people) stays >= RETAIN_KEEP x vanilla's."""
    summary, _ = compared
    bar = compare.RETAIN_KEEP * summary["vanilla_validation"]
    score = lambda metrics: sum(metrics.values()) / len(metrics)  # noqa: E731
    methods = {m["name"]: m for m in summary["methods"]}
    eraser = methods["eraser"]
    assert [p["x"] for p in eraser["curve"]] == sorted(p["x"] for p in eraser["curve"]) and len(eraser["curve"]) == 2
    keepers = [p["x"] for p in eraser["curve"] if score(p[VALIDATION_SPLIT]) >= bar]
    assert eraser["settings"]["alpha"] == (max(keepers) if keepers else min(p["x"] for p in eraser["curve"]))
    for name in BASELINES:
        curve = methods[name]["curve"]
        assert len(curve) == 1 and set(curve[0][VALIDATION_SPLIT]) >= {"rougeL_recall", "facerec_prob"}, name
        assert methods[name]["settings"]["epochs"] == 1 and methods[name]["settings"]["lr"] == 1e-3
    assert 0.0 <= methods["mmunlearner"]["settings"]["mask_kept"] <= 1.0
    # the prompt reference names the forget people; refuse reuses the eraser's gate and its fit time
    assert all(name in methods["prompt"]["settings"]["system_prompt"] for name in
               clear.forget_names(summary["data"], 10))
    assert methods["refuse"]["fit_seconds"] == eraser["fit_seconds"]
    # the gate: scores on every split and the validation people; no held-out renderings, so no AUROC
    gate = eraser["gate"]
    assert set(gate["scores"]) == {"forget", "retain", "real_faces", "real_world", VALIDATION_SPLIT}
    assert math.isnan(gate["auroc"]) and all(0.0 <= r <= 1.0 for r in gate["fire_rate"].values())


def test_compare_on_clear_the_eraser_lowers_the_forget_names(compared, bar):
    """What the eraser does to the forget people on CLEAR's own yardsticks, beside vanilla: where its gate fires on
    the forget rows, the likelihood of each right name falls."""
    summary, _ = compared
    methods = {m["name"]: m["results"] for m in summary["methods"]}
    vanilla, eraser = methods["vanilla"], methods["eraser"]
    fired = summary["methods"][1]["gate"]["fire_rate"]["forget"]
    bar("clear compare: eraser gate fires on forget rows", fired, at_least=0.5)
    if fired > 0:
        assert eraser["forget"]["facerec_prob"] < vanilla["forget"]["facerec_prob"]


# ---- several request sizes, and the errors ------------------------------------------------------------------------

def test_compare_on_clear_over_two_request_sizes(small_clear, testbed_dir, tmp_path, monkeypatch):
    """`--forget-ratio 1,10` on CLEAR: one run per size on one loaded model (evaluations canned: what is under test
    is the run's shape), CLEAR's tables and its plot over sizes."""
    def canned(self, model=None, splits=None, ask=None, reference=False):
        forget = {k: self.settings.forget_ratio / 100 for k in ("rougeL_recall", "facerec_rougeL_recall")}
        results = {"forget": forget, "retain": {"rougeL_recall": 0.8, "facerec_rougeL_recall": 0.9},
                   "real_faces": {"prob": 0.5}, "real_world": {"prob": 0.5}, VALIDATION_SPLIT: {"rougeL_recall": 0.7}}
        out = {s: results[s] for s in (splits or results) if s in results}
        if {"retain", "real_faces", "real_world"} <= set(out):  # as clear.score adds it
            out["utility"] = {"model_utility": 0.6}
        return out

    monkeypatch.setattr(clear_harness.ClearHarness, "evaluate", canned)
    monkeypatch.setattr(compare, "examples", lambda h, methods, out_dir, people=2: [])
    out = tmp_path / "run"
    assert cli.main(["compare", "--model", str(testbed_dir / "model"), "--data", str(small_clear), "--methods", "",
                     "--forget-ratio", "1,10", "--out", str(out), "--no-cache"]) == 0
    combined = json.loads((out / "results.json").read_text())
    assert combined["benchmark"] == "clear" and [r["forget_ratio"] for r in combined["runs"]] == [1, 10]
    for run, ratio in zip(combined["runs"], (1, 10)):
        vanilla = run["methods"][0]
        assert vanilla["results"]["forget"]["facerec_rougeL_recall"] == pytest.approx(ratio / 100)
        assert vanilla["omu"]["model_utility"] == 0.6
    assert (out / report.RATIO_PLOT).stat().st_size > 0
    assert (out / "results.md").read_text().count("| forget name R-L |") == 2


def compare_args(data_dir: Path, *extra: str) -> list[str]:
    return ["compare", "--model", "no-model-is-loaded", "--data", str(data_dir), "--methods", "ga", *extra]


def test_compare_and_attack_on_a_broken_clear_are_one_line(testbed_dir, tmp_path, capsys):
    broken = write_small_clear(testbed_dir, tmp_path / "clear")
    err = run_error(compare_args(broken, "--protocol", "mllmu"), capsys)
    assert "--protocol mllmu is for MLLMU-Bench data" in err
    assert "forget15" in run_error(compare_args(broken, "--forget-ratio", "10,15"), capsys)
    err = run_error(compare_args(broken, "--methods", "eraser"), capsys)  # CLEAR has no questions the model refuses
    assert "--erasure SPEC" in err
    for path in (broken / "retain90").iterdir():
        path.unlink()
    (broken / "retain90").rmdir()
    assert "the CLEAR config 'retain90' is missing" in run_error(compare_args(broken, "--benchmark", "clear"), capsys)
    write_config(broken, "forget10", [{"image": {"bytes": b"x", "path": None}, "caption": "c"}])
    err = run_error(compare_args(broken), capsys)
    assert "forget10/train-00000-of-00001.parquet" in err and "missing column 'name'" in err
    attack = ["attack", "--model", "no-model-is-loaded", "--data", str(broken)]
    assert "not on CLEAR data: --white-box" in run_error(attack + ["--white-box"], capsys)
    assert "not on CLEAR data: --tasks" in run_error(attack + ["--tasks", "cloze"], capsys)
    err = run_error(attack + ["--attacks", "rephrase,mixed-people"], capsys)
    assert "the mixed-people attack does not apply to CLEAR: it pairs two people's cloze questions" in err
    assert "unknown attack 'nope'" in run_error(attack + ["--attacks", "nope"], capsys)
    (broken / "real_world").rename(broken / "elsewhere")  # the attack reads forget and retain only
    for path in (broken / "retain_perturbed").iterdir():
        path.unlink()
    assert "retain_perturbed" in run_error(attack, capsys)


# ---- attack on CLEAR ------------------------------------------------------------------------------------------

def test_clear_attack_transforms():
    ctx = attacks.Context(names={"Ada Quill": "Ada Quill"}, biographies={})
    caption = QAItem("Ada Quill", "generation", "image", CAPTION_QUESTIONS[-1], "Ada Quill was born in Lima.",
                     verbatim=True)
    name = QAItem("Ada Quill", "generation", "image", NAME_QUESTION, "Ada Quill", verbatim=True)
    assert clear_attacks.rephrase(caption, ctx).question == CAPTION_QUESTIONS[0]  # the next of the nine, cycling
    assert clear_attacks.rephrase(name, ctx).question == clear_attacks.NAME_REPHRASE
    user = attacks.Context(names={}, biographies={}, paraphrases={NAME_QUESTION: "Who is this?"})
    assert clear_attacks.rephrase(name, user).question == "Who is this?"
    assert clear_attacks.rephrase(caption, user) is None
    assert clear_attacks.prefill(name, ctx).prefill == clear_attacks.PREFILLS["name"]  # never the name itself
    assert "Ada" not in clear_attacks.prefill(caption, ctx).prefill
    assert clear_attacks.is_name_question(name) and not clear_attacks.is_name_question(caption)
    # ROUGE-L recall of what the user reads (the prefill, then the answer), by hand
    scored = clear_attacks.summarise([name, caption, clear_attacks.prefill(name, ctx)],
                                     ["Ada", "Ada Quill was born.", "Quill"])
    assert scored["facerec_rougeL_recall"] == pytest.approx((1 / 2 + 1 / 2) / 2)
    assert scored["rougeL_recall"] == pytest.approx(4 / 6) and scored["n"] == 3.0
    assert set(clear_attacks.BY_NAME) | set(clear_attacks.SKIPPED) == set(attacks.BY_NAME)
    assert not set(clear_attacks.BY_NAME) & set(clear_attacks.SKIPPED)


def test_clear_attack_set_attacks_the_forget_and_some_retain_rows(small_clear):
    attacked = clear_attacks.attack_set(small_clear, 10, retain_people=3, exclude=["nobody"])
    forget = [q.item for task in clear.report_tasks(small_clear, 10, ("forget",))["forget"] for q in task.questions]
    assert set(attacked.items) == set(clear_attacks.BY_NAME)
    for name, splits in attacked.items.items():
        assert len(splits["forget"]) == len(forget), name  # every applicable attack applies to every row
        assert len({i.subject_id for i in splits["retain"]}) == 3, name
        assert all(i.modality == "image" for i in splits["forget"] + splits["retain"]), name
    assert attacked.items["photo-as-is"]["forget"] == forget  # CLEAR's own rows, as asked
    assert all(i.prefill for i in attacked.items["prefill"]["forget"])
    one = next(iter({i.subject_id for i in attacked.items["rephrase"]["retain"]}))
    fewer = clear_attacks.attack_set(small_clear, 10, ["rephrase"], retain_people=None, exclude=[one])
    assert one not in {i.subject_id for i in fewer.items["rephrase"]["retain"]} and list(fewer.items) == ["rephrase"]


@pytest.fixture(scope="module")
def clear_eraser(small_clear, testbed_dir, tmp_path_factory) -> Path:
    """An eraser fitted on the CLEAR configs with `fit` (retain90, the build's refusals, real_faces to calibrate)."""
    out = tmp_path_factory.mktemp("clear-eraser") / "eraser.safetensors"
    assert cli.main(["fit", "--model", str(testbed_dir / "model"), "--data", str(small_clear), "--forget", "forget10",
                     "--retain", "retain90", "--erasure", erasure_spec(testbed_dir), "--calibration", "real_faces",
                     "--out", str(out), "--no-cache"]) == 0
    return out


def test_attack_on_clear_runs_the_applicable_attacks(small_clear, testbed_dir, clear_eraser, tmp_path, capsys):
    out = tmp_path / "attack.json"
    assert cli.main(["attack", "--model", str(testbed_dir / "model"), "--data", str(small_clear), "--eraser",
                     str(clear_eraser), "--references", "--retain-people", "3", "--batch-size", "16",
                     "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    summary = json.loads(out.read_text())
    assert list(summary["attacks"]) == ["vanilla", "eraser", "refuse", "prompt"]
    assert summary["headline"] == "facerec_rougeL_recall" and summary["skipped"] == clear_attacks.SKIPPED
    for method, per_attack in summary["attacks"].items():
        assert list(per_attack) == list(clear_attacks.BY_NAME), method
        for name, splits in per_attack.items():
            for split in ("forget", "retain"):
                assert set(splits[split]) == {"facerec_rougeL_recall", "rougeL_recall", "n"}, (method, name)
                assert all(0.0 <= splits[split][k] <= 1.0 for k in ("facerec_rougeL_recall", "rougeL_recall"))
    verdicts = summary["verdicts"]["eraser"]
    vanilla = summary["attacks"]["vanilla"]
    for name, row in verdicts.items():  # counted where vanilla gives >= 0.8 of the forget names under the attack
        assert row["counted"] == (vanilla[name]["forget"]["facerec_rougeL_recall"] >= attack_scoring.COUNTED_FROM)
    rates = summary["gate_fire_rate"]["eraser"]
    assert set(rates) == set(clear_attacks.BY_NAME)
    for name, rate in rates.items():
        if rate["retain"] == 0.0:  # the gate let every retain prompt through: vanilla's answers, exactly
            assert summary["attacks"]["eraser"][name]["retain"] == vanilla[name]["retain"], name
    # CLEAR's own forget questions, as the eraser was fitted on them: the gate fires on them and on no retain
    # question, so the eraser acts on exactly the forget people.
    as_asked = "photo-as-is"
    assert rates[as_asked]["forget"] >= 0.9 and rates[as_asked]["retain"] == 0.0, rates[as_asked]
    if verdicts[as_asked]["counted"]:  # vanilla names them: the eraser gives no more of the names.
        # Asserted only where counted: where vanilla names nobody (the small model does not know CLEAR's wording),
        # a steered answer may share a name's token by chance, which ROUGE recall counts (0.125 on one fixture).
        assert summary["attacks"]["eraser"][as_asked]["forget"][clear_attacks.HEADLINE] \
            <= vanilla[as_asked]["forget"][clear_attacks.HEADLINE]
    assert "not run on this benchmark: mixed-people (it pairs two people's cloze questions" in printed
    assert "| vanilla forget name R-L | vanilla forget caption R-L | vanilla retain name R-L |" in printed
    assert "forget name R-L <= 0.2" in printed
