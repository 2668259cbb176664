"""MLLMU-Bench data: read a split's parquet, validate its schema, expand records into question items; the
split names, the validation hold-out and which splits a fit uses by default.

A split lives at `<data>/<split>/train-00000-of-00001.parquet` (the Hub layout). Records follow MLLMU-Bench:
`ID`, `image {bytes, path}` (Test_Set: `images`, a list of them), `biography`, `Classification_Task
{Image_Textual_Questions, Pure_Text_Questions}`, `Generation_Task [{Type, Question, Ground_Truth}]`,
`Mask_Task [{Type, Question, Ground_Truth}]`. Every problem is a `UserInputError` naming the file.
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path
from typing import Iterable, Sequence, get_args

import pyarrow.parquet as pq
from PIL import Image

from ..core.inputs import QAItem, Task
from ..errors import UserInputError

PARQUET_NAME = "train-00000-of-00001.parquet"

# The report's split names -> the directory names MLLMU-Bench (and the testbed) use, in report order.
SPLIT_DIRS = {
    "forget": "forget_{ratio}",
    "test": "Test_Set",
    "retain": "retain_{keep}",
    "real": "Retain_Set",
    "general": "General_Set",  # testbed only: visual skills on synthetic scenes
    "unknown": "Unknown_Set",  # testbed only: never-seen subjects, the right answer is a refusal
}
REPORT_SPLITS = tuple(SPLIT_DIRS)
VALIDATION_SPLIT = "validation"  # the validation people (see validation_split) of retain and real, as a report split
ERASURE_SPLIT = "Unknown_Train"  # testbed only: questions about strangers, answered with a refusal (trained)
GENERAL_TRAIN = "General_Train"  # testbed only: the visual-skill questions the model was trained on
FORGET_RATIOS = (5, 10, 15)
IMAGE_TYPES = {"image_textual", "image"}  # MLLMU-Bench spells the image modality "Image_Textual"


def split_dir_name(split: str, forget_ratio: int = 10) -> str:
    if split not in SPLIT_DIRS:
        raise UserInputError(None, f"unknown split {split!r}; expected one of {sorted(SPLIT_DIRS)}")
    if forget_ratio not in FORGET_RATIOS:
        raise UserInputError(None, f"--forget-ratio must be one of {FORGET_RATIOS}, got {forget_ratio}")
    return SPLIT_DIRS[split].format(ratio=forget_ratio, keep=100 - forget_ratio)


def split_parquet(data_dir: str | Path, split_dir: str) -> Path:
    return Path(data_dir) / split_dir / PARQUET_NAME


def read_records(parquet_path: str | Path) -> list[dict]:
    """Read one split's records, checking the MLLMU-Bench schema; a broken file is a one-line error."""
    path = Path(parquet_path)
    if path.is_dir():
        path = path / PARQUET_NAME
    if not path.is_file():
        raise UserInputError(path, "no such parquet file")
    try:
        records = pq.read_table(path).to_pylist()
    except Exception as exc:  # pyarrow raises several types for a corrupt or truncated file
        raise UserInputError(path, f"not a readable parquet file ({type(exc).__name__}: {_first_line(exc)})") from None
    for index, record in enumerate(records):
        _check_record(path, index, record)
    return records


def _first_line(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _check_record(path: Path, index: int, record: dict) -> None:
    where = f"record {index}"
    if "ID" not in record:
        raise UserInputError(path, f"{where}: missing column 'ID' (not an MLLMU-Bench split)")
    if "image" not in record and "images" not in record:
        raise UserInputError(path, f"{where}: missing column 'image' or 'images'")
    tasks = ("Classification_Task", "Generation_Task", "Mask_Task")
    if not any(name in record for name in tasks):
        raise UserInputError(path, f"{where}: none of the task columns {tasks}")
    classification = record.get("Classification_Task") or {}
    if not isinstance(classification, dict):
        raise UserInputError(path, f"{where}: Classification_Task must be a struct")
    for key in ("Image_Textual_Questions", "Pure_Text_Questions"):
        for q in classification.get(key) or []:
            if not {"Question", "Options", "Correct_Answer"} <= set(q or {}):
                raise UserInputError(path, f"{where}: a {key} entry lacks Question/Options/Correct_Answer")
    for column in ("Generation_Task", "Mask_Task"):
        for q in record.get(column) or []:
            if not {"Type", "Question", "Ground_Truth"} <= set(q or {}):
                raise UserInputError(path, f"{where}: a {column} entry lacks Type/Question/Ground_Truth")


def decode_image(path: Path, subject_id: str, image_field) -> Image.Image:
    data = image_field.get("bytes") if isinstance(image_field, dict) else image_field
    if not data:
        raise UserInputError(path, f"subject {subject_id}: image has no bytes")
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except Exception as exc:
        raise UserInputError(path, f"subject {subject_id}: unreadable image ({_first_line(exc)})") from None
    return image.convert("RGB")


def record_images(path: Path, record: dict) -> list[Image.Image]:
    """The record's images: one for most splits, several for Test_Set (new renderings of the subject)."""
    subject_id = str(record["ID"])
    if record.get("images"):
        return [decode_image(path, subject_id, field) for field in record["images"]]
    if record.get("image"):
        return [decode_image(path, subject_id, record["image"])]
    return []


def expand_items(records: Iterable[dict], path: str | Path = "<records>") -> list[QAItem]:
    """Every question of every record as a QAItem; image questions are repeated for each image."""
    path = Path(path)
    items: list[QAItem] = []
    for record in records:
        subject_id = str(record["ID"])
        images = record_images(path, record)
        classification = record.get("Classification_Task") or {}
        for key, modality in (("Image_Textual_Questions", "image"), ("Pure_Text_Questions", "text")):
            for q in classification.get(key) or []:
                options = {k: str(v) for k, v in (q["Options"] or {}).items() if v is not None}
                answer = str(q["Correct_Answer"]).strip()[:1].upper()
                items += _with_images(subject_id, "classification", modality, q["Question"], answer, options, images)
        for column, task in (("Mask_Task", "cloze"), ("Generation_Task", "generation")):
            for q in record.get(column) or []:
                modality = "image" if str(q["Type"]).lower() in IMAGE_TYPES else "text"
                items += _with_images(subject_id, task, modality, q["Question"], str(q["Ground_Truth"]), None, images)
    return items


def _with_images(subject_id, task, modality, question, answer, options, images) -> list[QAItem]:
    if modality == "text":
        return [QAItem(subject_id, task, "text", question, answer, options)]
    return [QAItem(subject_id, task, "image", question, answer, options, image) for image in images]


def load_split_items(data_dir: str | Path, split: str, forget_ratio: int = 10) -> list[QAItem] | None:
    """Items of a report split, or None where the data has no such split (e.g. no General_Set)."""
    path = split_parquet(data_dir, split_dir_name(split, forget_ratio))
    if not path.exists():
        return None
    return read_items(path)


def read_items(path: str | Path) -> list[QAItem]:
    """Every question of one split (its directory or parquet file)."""
    return expand_items(read_records(path), path)


VALIDATION_FRACTION = {"retain": 0.1, "real": 0.2}
"""Per report split, the hash-chosen fraction of its subjects held out as validation people: they choose settings
and calibrate the gate, and are never fitted on or reported. A fifth of the real people (on the testbed 3 of 10)
so that settings are also chosen on people outside the fit's retain split."""


def validation_split(items: Sequence[QAItem], split: str = "retain") -> tuple[list[QAItem], list[QAItem]]:
    """(the rest, the validation hold-out) of a retain or real split's questions: a fixed, hash-chosen fraction
    of its subjects (VALIDATION_FRACTION) is held out for choosing settings; never fitted on, never reported."""
    rest: list[QAItem] = []
    held_out: list[QAItem] = []
    for item in items:
        (held_out if _is_validation_subject(item.subject_id, VALIDATION_FRACTION[split]) else rest).append(item)
    return rest, held_out


def _is_validation_subject(subject_id: str, fraction: float) -> bool:
    digest = hashlib.sha256(f"mllmeraser-validation:{subject_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def validation_items(data_dir: str | Path, forget_ratio: int = 10) -> list[QAItem]:
    """The validation people's questions: the held-out parts of the retain and real splits. `compare` chooses
    settings on them, and `fit` calibrates the gate's threshold on them by default."""
    return [item for split in VALIDATION_FRACTION
            for item in validation_split(load_split_items(data_dir, split, forget_ratio) or [], split)[1]]


def retained_inputs(data_dir: str | Path, forget_ratio: int = 10) -> list[QAItem]:
    """The inputs the gate must leave alone: the retain split less its validation hold-out and, where the data
    has it, the testbed's training-only General_Train (visual-skill prompts). The compare job, the demo, the
    benchmarks and `mllmeraser fit` without `--retain` all fit on exactly this."""
    retain, _ = validation_split(load_split_items(data_dir, "retain", forget_ratio) or [])
    general = split_parquet(data_dir, GENERAL_TRAIN)
    return retain + (read_items(general) if general.exists() else [])


def default_erasure_items(data_dir: str | Path | None) -> list[QAItem]:
    """Questions the model refuses, for the erasure direction: the testbed's Unknown_Train split."""
    if data_dir is not None:
        path = split_parquet(data_dir, ERASURE_SPLIT)
        if path.exists():
            return read_items(path)
    raise UserInputError(data_dir, f"no {ERASURE_SPLIT} split here: pass --erasure SPEC (questions the model refuses)")


def resolve_spec(spec: str, data_dir: str | Path | None, forget_ratio: int = 10) -> list[QAItem]:
    """A --forget/--retain argument: a split name under --data (forget_10, retain_90, Test_Set, ...), a report
    split name (forget, retain, ...), a split directory or parquet file, or a JSONL of {image, question, answer};
    several, comma-separated, are concatenated (e.g. `retain_90,General_Train`)."""
    if "," in spec:
        return [item for part in spec.split(",") if part for item in resolve_spec(part, data_dir, forget_ratio)]
    candidate = Path(spec)
    if candidate.suffix == ".jsonl":
        return read_jsonl_items(candidate)
    if candidate.exists():
        return read_items(candidate)
    if data_dir is None:
        raise UserInputError(spec, "no such file; to name a split, also pass --data DIR")
    directory = split_dir_name(spec, forget_ratio) if spec in SPLIT_DIRS else spec
    return read_items(split_parquet(data_dir, directory))


def read_jsonl_items(path: str | Path) -> list[QAItem]:
    """User-supplied pairs: one JSON object a line with `question`, `answer` and optionally `image` (a path
    relative to the JSONL file) and `task` (default generation)."""
    path = Path(path)
    if not path.is_file():
        raise UserInputError(path, "no such JSONL file")
    items = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserInputError(path, f"line {number}: not JSON ({exc.msg})") from None
        if not isinstance(row, dict) or "question" not in row or "answer" not in row:
            raise UserInputError(path, f"line {number}: needs 'question' and 'answer'")
        image = None
        if row.get("image"):
            image_path = (path.parent / row["image"]).resolve()
            try:
                image = Image.open(image_path).convert("RGB")
            except Exception as exc:
                raise UserInputError(image_path, f"unreadable image ({_first_line(exc)}), named on line {number} of {path}") from None
        task = row.get("task", "generation")
        if task not in get_args(Task):
            raise UserInputError(path, f"line {number}: task must be classification, cloze or generation")
        items.append(QAItem(str(row.get("id", number)), task, "image" if image else "text",
                            str(row["question"]), str(row["answer"]), row.get("options"), image))
    if not items:
        raise UserInputError(path, "no items")
    return items
