"""Reading MLLMU-Bench as the Hub stores it: every shard of a split in order (and the flat data/ layout), a
missing shard or split is an error (a testbed-only split a warning), images stay encoded until read."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image

from mllmeraser.bench import data, evaluate
from mllmeraser.bench.items import QAItem
from mllmeraser.core.inputs import EncodedImage
from mllmeraser.core.models import answer_items
from mllmeraser.errors import UserInputError

SPLIT_DIRS = ("forget_10", "Test_Set", "retain_90", "Retain_Set", "General_Set", "Unknown_Set")
FLAT_SPLIT = "Retain_Set"  # written in the flat layout: data/Retain_Set-0000i-of-00002.parquet
EVERY_SPLIT = data.REPORT_SPLITS + (data.VALIDATION_SPLIT,)


def trimmed(record: dict) -> dict:
    """A record with its first question of each list only (two Mask_Task and Generation_Task entries: one
    image, one text), so a whole evaluation of every split takes seconds."""
    out = dict(record)
    classification = dict(record["Classification_Task"] or {})
    for key in ("Image_Textual_Questions", "Pure_Text_Questions"):
        classification[key] = (classification.get(key) or [])[:1]
    out["Classification_Task"] = classification
    out["Mask_Task"] = (record["Mask_Task"] or [])[:2]
    out["Generation_Task"] = (record["Generation_Task"] or [])[:2]
    return out


def small_records(testbed_data: Path, split_dir: str) -> list[dict]:
    """Three subjects of a split (retain and real: two and a validation person), trimmed."""
    records = data.read_records(testbed_data / split_dir)
    if split_dir in ("retain_90", "Retain_Set"):
        fraction = data.VALIDATION_FRACTION["retain" if split_dir == "retain_90" else "real"]
        held = [r for r in records if data._is_validation_subject(str(r["ID"]), fraction)]
        records = [r for r in records if r not in held][:2] + held[:1]
    elif split_dir == "Test_Set":  # the forget people's new renderings
        forget = {str(r["ID"]) for r in data.read_records(testbed_data / "forget_10")[:3]}
        records = [r for r in records if str(r["ID"]) in forget]
    else:
        records = records[:3]
    return [trimmed(r) for r in records]


def write_shards(records: list[dict], directory: Path, stem: str, count: int, schema) -> list[Path]:
    """`records` as `count` shards `<stem>-0000i-of-0000N.parquet` of near-equal size, in order."""
    import pyarrow as pa
    directory.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pylist(records, schema=schema)
    bounds = [round(i * len(records) / count) for i in range(count + 1)]
    paths = []
    for index in range(count):
        path = directory / f"{stem}-{index:05d}-of-{count:05d}.parquet"
        pq.write_table(table.slice(bounds[index], bounds[index + 1] - bounds[index]), path)
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def hub_copies(testbed_data, tmp_path_factory) -> tuple[Path, Path]:
    """The same small benchmark twice: one parquet per split, and the Hub's sharded layouts (three shards a
    split; Test_Set in two, as on the Hub; Retain_Set in two in the flat data/ layout)."""
    root = tmp_path_factory.mktemp("hub")
    plain, sharded = root / "plain", root / "sharded"
    for split_dir in SPLIT_DIRS:
        records = small_records(testbed_data, split_dir)
        schema = pq.read_schema(testbed_data / split_dir / data.PARQUET_NAME)
        write_shards(records, plain / split_dir, "train", 1, schema)
        if split_dir == FLAT_SPLIT:
            write_shards(records, sharded / data.FLAT_LAYOUT_DIR, split_dir, 2, schema)
        else:
            write_shards(records, sharded / split_dir, "train", 2 if split_dir == "Test_Set" else 3, schema)
    return plain, sharded


def described(items: list[QAItem]) -> list[tuple]:
    """What an evaluation reads of each item, its image as the hash of its encoded bytes."""
    return [(i.subject_id, i.task, i.modality, i.question, i.answer, i.options,
             hashlib.sha256(i.image_source.data).hexdigest() if i.image_source is not None else None) for i in items]


def test_every_shard_is_read_in_order_in_both_hub_layouts(testbed_data, tmp_path):
    """The whole testbed resharded (3 shards a split, Retain_Set flat): every split reads as the original."""
    for split_dir in SPLIT_DIRS + ("forget_5", "retain_95", data.ERASURE_SPLIT, data.GENERAL_TRAIN):
        schema = pq.read_schema(testbed_data / split_dir / data.PARQUET_NAME)
        records = data.read_records(testbed_data / split_dir)
        target = tmp_path / data.FLAT_LAYOUT_DIR if split_dir == FLAT_SPLIT else tmp_path / split_dir
        shards = write_shards(records, target, split_dir if split_dir == FLAT_SPLIT else "train", 3, schema)
        assert data.split_shards(tmp_path, split_dir) == shards
        assert described(data.load_dir_items(tmp_path, split_dir)) == described(data.load_dir_items(testbed_data, split_dir))
    assert data.split_shards(tmp_path, "forget_15") is None  # not written: absent, not an error


def test_sharded_benchmark_evaluates_every_split_with_the_same_numbers(hub_copies, testbed_model):
    model, processor = testbed_model
    plain, sharded = hub_copies
    assert len(list((sharded / "Test_Set").glob("*.parquet"))) == 2 and (sharded / "data").is_dir()
    results = {}
    for name, root in (("plain", plain), ("sharded", sharded)):
        items = evaluate.report_items(root, 10, EVERY_SPLIT)
        assert set(items) == set(EVERY_SPLIT) and all(items.values()), {s: len(v) for s, v in items.items()}
        results[name] = evaluate.evaluate(model, processor, root, items=items, progress=False)
    assert results["sharded"] == results["plain"]
    assert set(results["plain"]) == set(EVERY_SPLIT)


def test_a_missing_shard_is_a_one_line_error_naming_directory_and_file(hub_copies, tmp_path, testbed_dir):
    _, sharded = hub_copies
    broken = tmp_path / "broken"
    shutil.copytree(sharded, broken)
    (broken / "forget_10" / "train-00001-of-00003.parquet").unlink()
    with pytest.raises(UserInputError) as raised:
        evaluate.report_items(broken, 10, ("forget",))
    assert str(broken / "forget_10") in str(raised.value) and "train-00001-of-00003.parquet" in str(raised.value)
    (broken / data.FLAT_LAYOUT_DIR / "Retain_Set-00000-of-00002.parquet").unlink()  # the flat layout too
    with pytest.raises(UserInputError, match="missing shard Retain_Set-00000-of-00002.parquet"):
        data.load_split_items(broken, "real")
    result = subprocess.run([sys.executable, "-m", "mllmeraser.cli", "eval", "--model", str(testbed_dir / "model"),
                             "--data", str(broken), "--splits", "forget"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert str(broken / "forget_10") in line and "missing shard train-00001-of-00003.parquet" in line


def test_shard_names_that_do_not_add_up_are_errors(tmp_path, testbed_data):
    schema = pq.read_schema(testbed_data / "forget_10" / data.PARQUET_NAME)
    records = data.read_records(testbed_data / "forget_10")
    split = tmp_path / "forget_10"
    write_shards(records, split, "train", 2, schema)
    shutil.copy(split / "train-00000-of-00002.parquet", split / "train-00000-of-00003.parquet")
    with pytest.raises(UserInputError, match="several sets"):
        data.read_records(split)
    shutil.rmtree(split)
    split.mkdir()
    with pytest.raises(UserInputError, match="no parquet file"):
        data.load_dir_items(tmp_path, "forget_10")
    pq.write_table(pq.read_table(testbed_data / "forget_10" / data.PARQUET_NAME), split / "any-name.parquet")
    assert len(data.read_records(split)) == len(records)  # one parquet file: read whatever its name


def test_missing_splits_error_and_testbed_only_splits_warn(testbed_data, tmp_path, caplog):
    for split_dir in ("forget_10", "Test_Set", "retain_90", "Retain_Set"):  # the real benchmark's splits
        (tmp_path / split_dir).symlink_to(testbed_data / split_dir)
    items = evaluate.report_items(tmp_path, 10)
    assert list(items) == ["forget", "test", "retain", "real"]
    warnings = [record.getMessage() for record in caplog.records if record.levelname == "WARNING"]  # logged
    assert len(warnings) == 2 and all(str(tmp_path) in line for line in warnings)
    assert "General_Set" in warnings[0] and "general" in warnings[0] and "Unknown_Set" in warnings[1]
    (tmp_path / "Test_Set").unlink()
    with pytest.raises(UserInputError, match="no such parquet file") as raised:
        evaluate.report_items(tmp_path, 10, ("forget", "test"))
    assert str(tmp_path / "Test_Set") in str(raised.value)
    (tmp_path / "Retain_Set").unlink()
    with pytest.raises(UserInputError, match="Retain_Set"):  # the validation people need both splits
        evaluate.report_items(tmp_path, 10, ("validation",))


def test_building_items_decodes_no_image_and_answers_are_unchanged(testbed_data, testbed_model, monkeypatch):
    opened = []
    real_open = Image.open
    monkeypatch.setattr(Image, "open", lambda *a, **k: opened.append(1) or real_open(*a, **k))
    items = evaluate.report_items(testbed_data, 10, EVERY_SPLIT)
    image_items = [i for split in items.values() for i in split if i.modality == "image"]
    assert len(image_items) > 1000 and not opened  # thousands of image questions, not one decoded
    assert all(isinstance(i.image_source, EncodedImage) for i in image_items)
    first = items["forget"][0]
    assert isinstance(first.image, Image.Image) and first.image.mode == "RGB" and len(opened) == 2  # on every read
    same_person = [i for i in items["forget"] if i.subject_id == first.subject_id and i.modality == "image"]
    assert len(same_person) > 1 and len({id(i.image_source) for i in same_person}) == 1  # one copy of the bytes
    # the first question of each task and modality of three splits
    chosen = [i for split in ("forget", "test", "retain")
              for i in {(i.task, i.modality): i for i in reversed(items[split])}.values()]
    eager = [QAItem(i.subject_id, i.task, i.modality, i.question, i.answer, i.options, i.image) for i in chosen]
    assert all(isinstance(i.image_source, (Image.Image, type(None))) for i in eager)
    model, processor = testbed_model
    assert answer_items(model, processor, chosen, progress=False) == answer_items(model, processor, eager, progress=False)


def test_bytes_that_are_no_image_are_caught_when_read_without_decoding(tmp_path):
    with pytest.raises(UserInputError, match="f.parquet: subject 7: unreadable image"):
        EncodedImage(b"definitely not a png", str(tmp_path / "f.parquet"), "subject 7")
    with pytest.raises(UserInputError, match="image has no bytes"):
        EncodedImage(b"", "f.parquet", "subject 7")
    truncated = EncodedImage(b"\x89PNG\r\n\x1a\n" + b"\0" * 40, "f.parquet", "subject 7")  # header only
    with pytest.raises(UserInputError, match="f.parquet: subject 7: unreadable image"):
        truncated.decode()
