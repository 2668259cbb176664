"""Bad input: one line naming the file and the problem, exit status 2, no traceback, nothing lost."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mllmeraser.bench import data
from mllmeraser.errors import UserInputError, atomic_write_text


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mllmeraser.cli", *args], capture_output=True, text=True, timeout=300)


def assert_one_line_error(result: subprocess.CompletedProcess, *needles: str) -> None:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.fixture()
def small_data(tmp_path, testbed_data) -> Path:
    """A writable copy of the testbed's forget_10 / retain_90 splits."""
    root = tmp_path / "data"
    for split in ("forget_10", "retain_90"):
        shutil.copytree(testbed_data / split, root / split)
    return root


def test_missing_parquet_names_the_file(small_data, testbed_dir):
    shutil.rmtree(small_data / "forget_10")
    result = run_cli("eval", "--model", str(testbed_dir / "model"), "--data", str(small_data))
    assert_one_line_error(result, str(small_data / "forget_10" / data.PARQUET_NAME), "no such parquet file")


def test_corrupt_parquet(small_data, testbed_dir):
    path = small_data / "forget_10" / data.PARQUET_NAME
    path.write_bytes(path.read_bytes()[:200])
    result = run_cli("eval", "--model", str(testbed_dir / "model"), "--data", str(small_data))
    assert_one_line_error(result, str(path), "not a readable parquet file")


def test_wrong_schema(tmp_path):
    path = tmp_path / "forget_10" / data.PARQUET_NAME
    path.parent.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist([{"name": "x", "text": "y"}]), path)
    with pytest.raises(UserInputError, match="missing column 'ID'"):
        data.read_records(path)


def test_unreadable_image(small_data, testbed_dir):
    path = small_data / "forget_10" / data.PARQUET_NAME
    records = pq.read_table(path).to_pylist()
    records[0]["image"] = {"bytes": b"definitely not a png", "path": "x.png"}
    pq.write_table(pa.Table.from_pylist(records), path)
    result = run_cli("eval", "--model", str(testbed_dir / "model"), "--data", str(small_data))
    assert_one_line_error(result, str(path), f"subject {records[0]['ID']}", "unreadable image")


def test_model_dir_that_is_not_a_checkpoint(tmp_path, small_data):
    (tmp_path / "notamodel").mkdir()
    result = run_cli("eval", "--model", str(tmp_path / "notamodel"), "--data", str(small_data))
    assert_one_line_error(result, str(tmp_path / "notamodel"), "not a model checkpoint")


def test_generate_with_missing_image(testbed_dir, tmp_path):
    result = run_cli("generate", "--model", str(testbed_dir / "model"), "--image", str(tmp_path / "none.png"),
                     "--prompt", "Who is this?")
    assert_one_line_error(result, str(tmp_path / "none.png"), "no such image file")


def test_atomic_write_keeps_old_file_on_failure(tmp_path, monkeypatch):
    target = tmp_path / "results.json"
    atomic_write_text(target, "old")

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr("mllmeraser.errors.os.replace", broken_replace)
    with pytest.raises(OSError):
        atomic_write_text(target, "new")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]  # no temp file left behind


def test_image_column_is_required_only_where_a_question_shows_an_image(tmp_path):
    """A text-only record (the pretrained testbed's real-knowledge split) reads without an image column; a record
    with an image question and no image column is one error naming the file."""
    text_only = {"ID": "K0000", "name": "France", "biography": "",
                 "Classification_Task": {"Image_Textual_Questions": [], "Pure_Text_Questions": [
                     {"Question": "What is the capital of France?", "Options": {"A": "Paris", "B": "Rome"},
                      "Correct_Answer": "A"}]},
                 "Generation_Task": [{"Type": "Pure_Text", "Question": "What is the capital of France?",
                                      "Ground_Truth": "The capital of France is Paris."}],
                 "Mask_Task": [{"Type": "Pure_Text", "Question": "The capital of France is __.", "Ground_Truth": "Paris"}]}
    path = tmp_path / "text.parquet"
    pq.write_table(pa.Table.from_pylist([text_only]), path)
    assert [r["ID"] for r in data.read_records(path)] == ["K0000"]
    with_image_question = dict(text_only, Mask_Task=[{"Type": "Image_Textual", "Question": "This is __.",
                                                       "Ground_Truth": "Paris"}])
    path = tmp_path / "image.parquet"
    pq.write_table(pa.Table.from_pylist([with_image_question]), path)
    with pytest.raises(UserInputError, match="missing column 'image' or 'images'") as error:
        data.read_records(path)
    assert str(path) in str(error.value)
