"""CLEAR: its metrics on hand-made numbers (as its calculate_metrics.py defines them), its layout read end to end
by `mllmeraser eval` on the tiny testbed model (a miniature dataset of random pixels, one config in two shards),
one-line errors for a missing or wrong config, and the testbed written in CLEAR's layout."""

from __future__ import annotations

import hashlib
import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mllmeraser import cli
from mllmeraser.bench import clear, data
from mllmeraser.testbed.clear_export import write_clear_layout, write_config


# ---- the metrics, on numbers worked out by hand ------------------------------------------------------------

def test_probability_is_plain_for_captions_and_normalised_over_wrong_answers_elsewhere():
    assert clear.probability([math.log(2)], None) == pytest.approx(0.5)  # exp(-ln 2)
    # right p = 0.6, wrong p = 0.1 + 0.1: 0.6 / 0.8
    assert clear.probability([-math.log(0.6)], [[-math.log(0.1), -math.log(0.1)]]) == pytest.approx(0.75)
    assert clear.probability([-math.log(0.6), 0.0], [[-math.log(0.2)], []]) == pytest.approx((0.75 + 1.0) / 2)


def test_truth_ratio_sets_each_paraphrase_against_the_wrong_answers_mean_over_the_whole_task():
    paraphrase, wrong = [1.0, 2.0], [[2.0, 2.0], [3.0]]
    # calculate_metrics.py: the wrong NLLs' mean over the whole array, 7/3; R = exp(7/3 - paraphrase NLL)
    r1, r2 = math.exp(7 / 3 - 1.0), math.exp(7 / 3 - 2.0)
    assert clear.truth_ratio(paraphrase, wrong, forget=True) == pytest.approx((1 / r1 + 1 / r2) / 2)  # min(R, 1/R)
    assert clear.truth_ratio(paraphrase, wrong, forget=False) == pytest.approx(((1 - 1 / r1) + (1 - 1 / r2)) / 2)
    per_row = (math.exp(-1.0) + math.exp(-1.0)) / 2  # what a per-row mean (2.0 and 3.0) would give instead
    assert abs(clear.truth_ratio(paraphrase, wrong, forget=True) - per_row) > 0.1
    assert clear.truth_ratio([0.5], [[0.1]], forget=False) == 0.0  # the paraphrase less likely: max(0, .) clips
    assert clear.truth_ratio([1.0], [[]], forget=True) is None


def test_rouge_is_l_recall_and_utility_a_harmonic_mean():
    assert clear.rouge_l_recall("the cat sat on the mat", "the cat") == pytest.approx(2 / 6)  # F1 would be 0.5
    assert clear.harmonic_mean([0.5, 1.0]) == pytest.approx(2 / 3)
    assert clear.harmonic_mean([0.5, 0.0]) == 0.0


# ---- a miniature CLEAR of random pixels -------------------------------------------------------------------

PEOPLE = ["Ada Quill", "Bo Tarn", "Cy Marr", "Di Fenn"]


def png(rng: np.random.Generator) -> dict:
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buffer, format="PNG")
    return {"bytes": buffer.getvalue(), "path": None}


def person_row(rng, name: str) -> dict:
    others = [p for p in PEOPLE if p != name]
    return {"image": png(rng), "caption": f"{name} was born in Lima.", "name": name,
            "paraphrased_caption": f"{name} comes from Lima.",
            "perturbed_captions": [f"{name} was born in {city}." for city in ("Oslo", "Kyoto")],
            "perturbed_names": others[:2]}


def write_mini_clear(root: Path) -> Path:
    rng = np.random.default_rng(0)
    forget = [person_row(rng, name) for name in PEOPLE[:2] for _ in range(2)]  # two images each
    write_config(root, "forget10_perturbed", forget, shards=2)  # every shard must be read
    write_config(root, "retain_perturbed", [person_row(rng, name) for name in PEOPLE[2:]])
    write_config(root, "real_faces", [{"image": png(rng), "answer": name, "options": PEOPLE}
                                      for name in ("Ada Quill", "Di Fenn")])
    write_config(root, "real_world", [{"image": png(rng), "question": "What colour is this?", "answer": "red",
                                       "options": ["red", "blue", "green"]} for _ in range(2)])
    return root


@pytest.fixture(scope="module")
def mini_clear(tmp_path_factory) -> Path:
    return write_mini_clear(tmp_path_factory.mktemp("clear"))


def test_every_shard_of_a_config_is_read_and_the_options_answer_is_not_a_wrong_one(mini_clear):
    assert len(list((mini_clear / "forget10_perturbed").glob("*.parquet"))) == 2
    tasks = clear.report_tasks(mini_clear, 10)
    captions, faces = tasks["forget"]
    assert [q.item.subject_id for q in captions.questions] == ["Ada Quill"] * 2 + ["Bo Tarn"] * 2  # both shards
    assert (captions.name, captions.normalised, captions.forget) == ("eval_log_forget", False, True)
    assert (faces.name, faces.normalised, faces.questions[0].item.question) == (
        "eval_forget_facerec", True, clear.NAME_QUESTION)
    assert captions.questions[0].item.question in clear.CAPTION_QUESTIONS
    assert captions.questions[0].paraphrase == "Ada Quill comes from Lima."
    (real,) = tasks["real_faces"]
    assert real.questions[0].perturbed == ("Bo Tarn", "Cy Marr", "Di Fenn")  # its options, less the answer
    again = clear.report_tasks(mini_clear, 10)
    assert [q.item.question for q in again["forget"][0].questions] == [q.item.question for q in captions.questions]


def test_eval_reads_the_clear_layout_and_reports_its_four_splits(mini_clear, testbed_dir, tmp_path, capsys):
    out = tmp_path / "clear.json"
    assert cli.main(["eval", "--model", str(testbed_dir / "model"), "--data", str(mini_clear),
                     "--json", str(out), "--batch-size", "8"]) == 0
    results = json.loads(out.read_text())
    assert list(results) == ["forget", "retain", "real_faces", "real_world", "utility"]
    for split in ("forget", "retain"):
        assert set(results[split]) == {"rougeL_recall", "prob", "truth_ratio", "facerec_rougeL_recall",
                                       "facerec_prob", "facerec_truth_ratio"}
    for split in ("real_faces", "real_world"):
        assert set(results[split]) == {"rougeL_recall", "prob", "truth_ratio"}
    assert all(0.0 <= v <= 1.0 for metrics in results.values() for v in metrics.values())
    assert results["real_faces"]["prob"] < 1.0  # normalised over three wrong names: never the whole mass
    values = [v for split in ("retain", "real_faces", "real_world") for v in results[split].values()]
    assert results["utility"]["model_utility"] == pytest.approx(clear.harmonic_mean(values))
    assert "model_utility" in capsys.readouterr().out


# ---- one-line errors ----------------------------------------------------------------------------------------

def run_error(args: list[str], capsys) -> str:
    assert cli.main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("mllmeraser: error: ") and "\n" not in err and "Traceback" not in err
    return err


@pytest.fixture
def broken(tmp_path) -> Path:
    return write_mini_clear(tmp_path / "clear")


def eval_args(data_dir: Path, *extra: str) -> list[str]:
    return ["eval", "--model", "no-model-is-loaded", "--data", str(data_dir), *extra]


def test_a_missing_config_is_one_line_naming_it(broken, capsys):
    for path in (broken / "real_world").iterdir():
        path.unlink()
    (broken / "real_world").rmdir()
    assert "real_world" in run_error(eval_args(broken), capsys)
    assert "forget05_perturbed" in run_error(eval_args(broken, "--forget-ratio", "5", "--splits", "forget"), capsys)
    assert "forget15" in run_error(eval_args(broken, "--forget-ratio", "15"), capsys)  # CLEAR has 1, 5, 10


def test_a_wrong_config_is_one_line_naming_the_file_and_column(broken, capsys):
    write_config(broken, "real_faces", [{"image": {"bytes": b"x", "path": None}, "answer": "Ada Quill"}])
    err = run_error(eval_args(broken, "--splits", "real_faces"), capsys)
    assert "real_faces/train-00000-of-00001.parquet" in err and "'options'" in err
    (broken / "forget10_perturbed" / "train-00001-of-00002.parquet").unlink()
    assert "missing shard train-00001-of-00002.parquet" in run_error(eval_args(broken, "--splits", "forget"), capsys)
    err = run_error(eval_args(broken, "--protocol", "mllmu"), capsys)
    assert "--protocol mllmu is for MLLMU-Bench data" in err
    err = run_error(eval_args(broken, "--splits", "test"), capsys)
    assert "unknown CLEAR split 'test'" in err


# ---- the testbed in CLEAR's layout ------------------------------------------------------------------------------

def tree_digest(root: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        if path.is_file():
            digest.update(str(path.relative_to(root)).encode() + path.read_bytes())
    return digest.hexdigest()


def test_testbed_export_writes_every_clear_config_and_leaves_the_build_alone(testbed_dir, tmp_path, capsys):
    before = tree_digest(testbed_dir / "data")
    out = tmp_path / "clear"
    assert cli.main(["testbed", "export", "--layout", "clear", "--build", str(testbed_dir), "--out", str(out)]) == 0
    assert tree_digest(testbed_dir / "data") == before
    assert clear.is_clear_layout(out) and not clear.is_clear_layout(testbed_dir / "data")  # what eval detects
    assert {p.name for p in out.iterdir()} == {
        "full", "full+tofu", "real_faces", "real_world", "retain_perturbed",
        *(f"{kind}{n}{suffix}" for kind, n in (("forget", "01"), ("forget", "05"), ("forget", "10"),
                                               ("retain", "99"), ("retain", "95"), ("retain", "90"))
          for suffix in ("", "+tofu")),
        "forget01_perturbed", "forget05_perturbed", "forget10_perturbed"}
    forget_ids = {str(r["ID"]) for r in data.read_records(testbed_dir / "data" / "forget_10")}
    test_images = {str(r["ID"]): len(r["images"]) for r in data.read_records(testbed_dir / "data" / "Test_Set")}
    forget_names = {r["name"] for r in data.read_records(testbed_dir / "data" / "forget_10")}
    rows = [row for _, _, row in clear.read_config(out, "forget10", clear.PERSON_COLUMNS)]
    assert {row["name"] for row in rows} == forget_names
    assert len(rows) == sum(1 + test_images.get(i, 0) for i in forget_ids)  # the portrait and each rendering
    retained = {row["name"] for _, _, row in clear.read_config(out, "retain90", clear.PERSON_COLUMNS)}
    assert not retained & forget_names and len(retained) == 36
    assert len({row["name"] for _, _, row in clear.read_config(out, "forget01", clear.PERSON_COLUMNS)}) == 1
    tofu = [row for _, _, row in clear.read_config(out, "forget10+tofu", clear.TOFU_COLUMNS)]
    assert sum(row["image"] is None for row in tofu) == 4 * len(forget_ids)  # the four text generation questions
    real = [row for _, _, row in clear.read_config(out, "real_faces", clear.REAL_FACES_COLUMNS)]
    assert all(row["answer"] in row["options"] and len(row["options"]) == 4 for row in real)
    tasks = clear.report_tasks(out, 10)
    assert all(len(q.perturbed) == 3 for task in tasks["forget"] + tasks["real_faces"] for q in task.questions)
    items = data.resolve_spec("forget10", out)  # fit --forget forget10 --data OUT reads a CLEAR config
    assert len(items) == 2 * len(rows) and {i.answer for i in items} >= forget_names
    assert all(i.verbatim and i.task == "generation" for i in items)
    capsys.readouterr()
    again = ["testbed", "export", "--layout", "clear", "--build", str(testbed_dir), "--out", str(out)]
    assert "already exists" in run_error(again, capsys)


def test_fit_on_clear_data_needs_its_retain_and_calibration_named(broken, tmp_path, capsys):
    args = ["fit", "--model", "no-model-is-loaded", "--data", str(broken), "--forget", "forget10_perturbed",
            "--out", str(tmp_path / "eraser.safetensors")]
    assert "pass --retain SPEC" in run_error(args, capsys)
    assert "pass --calibration SPEC" in run_error(args + ["--retain", "retain_perturbed"], capsys)
