"""MLLMU-Bench data: read a split's parquet shards, validate its schema, expand records into question items;
the split names, the validation hold-out and which splits a fit uses by default.

A split is read from `<data>/<split>/`: every shard `<name>-NNNNN-of-NNNNN.parquet` in it, in shard order
(the Hub layout; MLLMU-Bench's Test_Set is `train-00000-of-00002.parquet` and `train-00001-of-00002.parquet`),
or the one parquet file there whatever its name; where that directory is missing, from the Hub's flat layout
`<data>/data/<split>-NNNNN-of-NNNNN.parquet`. A shard missing from its `-of-N` count is an error. Records
follow MLLMU-Bench: `ID`, `image {bytes, path}` (Test_Set: `images`, a list of them), `biography`,
`Classification_Task {Image_Textual_Questions, Pure_Text_Questions}`, `Generation_Task [{Type, Question,
Ground_Truth}]`, `Mask_Task [{Type, Question, Ground_Truth}]`. Images stay encoded in the items and are decoded
when an item's `.image` is read. Every problem is a `UserInputError` naming the file.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence, get_args

from PIL import Image

from ..core.inputs import EncodedImage
from ..errors import UserInputError, json_lines
from . import clear_rows
from .items import QAItem, Task
from .parquet import first_line, image_bytes, read_table

PARQUET_NAME = "train-00000-of-00001.parquet"  # what a one-shard split is called (the testbed writes it)
SHARD_NAME = re.compile(r"(?P<stem>.+)-(?P<index>\d+)-of-(?P<count>\d+)\.parquet")
FLAT_LAYOUT_DIR = "data"  # the Hub's other layout: <data>/data/<split>-NNNNN-of-NNNNN.parquet

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
TESTBED_ONLY_SPLITS = ("general", "unknown")  # absent from the real benchmark: skipped with a warning there
VALIDATION_SPLIT = "validation"  # the validation people (see validation_split) of retain and real, as a report split
ERASURE_SPLIT = "Unknown_Train"  # testbed only: questions about strangers, answered with a refusal (trained)
GENERAL_TRAIN = "General_Train"  # testbed only: the visual-skill questions the model was trained on
FULL_SET = "Full_Set"  # MLLMU-Bench: every fictitious profile (forget + retain); its evaluation draws few-shot examples here
FORGET_RATIOS = (5, 10, 15)
IMAGE_TYPES = {"image_textual", "image"}  # MLLMU-Bench spells the image modality "Image_Textual"


def split_dir_name(split: str, forget_ratio: int = 10) -> str:
    if split not in SPLIT_DIRS:
        raise UserInputError(None, f"unknown split {split!r}; expected one of {sorted(SPLIT_DIRS)}")
    if forget_ratio not in FORGET_RATIOS:
        raise UserInputError(None, f"--forget-ratio must be one of {FORGET_RATIOS}, got {forget_ratio}")
    return SPLIT_DIRS[split].format(ratio=forget_ratio, keep=100 - forget_ratio)


def split_location(data_dir: str | Path, split_dir: str) -> Path:
    """Where a split is expected: its directory under `data_dir` (what errors about a missing split name)."""
    return Path(data_dir) / split_dir


def split_shards(data_dir: str | Path, split_dir: str) -> list[Path] | None:
    """The parquet files of a split in shard order, or None where `data_dir` has no such split in either
    layout (its own directory, or the flat `data/<split>-NNNNN-of-NNNNN.parquet`)."""
    directory = split_location(data_dir, split_dir)
    if directory.is_dir():
        return shard_files(directory)
    flat = Path(data_dir) / FLAT_LAYOUT_DIR
    return (shard_files(flat, stem=split_dir) or None) if flat.is_dir() else None


def missing_split(data_dir: str | Path, split_dir: str, why: str = "") -> UserInputError:
    """The error for a split the data lacks, naming the file a one-shard split would be."""
    return UserInputError(split_location(data_dir, split_dir) / PARQUET_NAME, f"no such parquet file{why}")


def shard_files(directory: Path, stem: str | None = None) -> list[Path]:
    """The shards `<stem>-NNNNN-of-NNNNN.parquet` in `directory` (of the one stem there, or of `stem`), in shard
    order; without shard names, the one parquet file there. An empty split directory, a shard missing from the
    `-of-N` count, or files of several stems are errors naming the directory."""
    files = sorted(directory.glob("*.parquet"))
    named = {path: SHARD_NAME.fullmatch(path.name) for path in files}
    if stem is not None:
        named = {path: match for path, match in named.items() if match and match["stem"] == stem}
        if not named:
            return []
    if not named:
        raise UserInputError(directory, "no parquet file in this split directory")
    plain = [path.name for path, match in named.items() if match is None]
    if plain:
        if len(named) == 1:
            return list(named)
        raise UserInputError(directory, f"{plain[0]} is not named as a shard (<name>-NNNNN-of-NNNNN.parquet) "
                                        f"and there are other parquet files beside it")
    stems = sorted({match["stem"] for match in named.values()})
    counts = sorted({match["count"] for match in named.values()})
    if len(stems) > 1 or len(counts) > 1:
        raise UserInputError(directory, f"shards of several sets here ({', '.join(p.name for p in named)}); "
                                        f"expected one <name>-NNNNN-of-NNNNN.parquet series")
    total, width = int(counts[0]), len(next(iter(named.values()))["index"])
    by_index = {int(match["index"]): path for path, match in named.items()}
    for index in range(total):
        if index not in by_index:
            raise UserInputError(directory, f"missing shard {stems[0]}-{index:0{width}d}-of-{counts[0]}.parquet "
                                            f"(the shard names say {total})")
    extra = sorted(set(by_index) - set(range(total)))
    if extra:
        raise UserInputError(by_index[extra[0]], f"shard index {extra[0]} is beyond the -of-{counts[0]} count")
    return [by_index[index] for index in range(total)]


def read_records(parquet_path: str | Path, ids: Iterable[str] | None = None) -> list[dict]:
    """Read one split's records (a split directory: every shard in order; or one parquet file), checking the
    MLLMU-Bench schema; only the subjects in `ids` where given. A broken file is a one-line error naming it."""
    path = Path(parquet_path)
    shards = shard_files(path) if path.is_dir() else [path]
    return [record for shard in shards for record in _read_shard(shard, ids)]


def read_split_records(data_dir: str | Path, split_dir: str, ids: Iterable[str] | None = None) -> list[dict] | None:
    """A split's records by directory name (either layout), or None where the data has no such split."""
    shards = split_shards(data_dir, split_dir)
    return None if shards is None else [record for shard in shards for record in _read_shard(shard, ids)]


def _read_shard(path: Path, ids: Iterable[str] | None) -> list[dict]:
    import pyarrow as pa
    import pyarrow.compute as pc

    table = read_table(path)
    if ids is not None and "ID" in table.column_names:
        table = table.filter(pc.is_in(table["ID"], value_set=pa.array(sorted(ids)).cast(table["ID"].type)))
    records = table.to_pylist()
    for index, record in enumerate(records):
        _check_record(path, index, record)
    return records


def _check_record(path: Path, index: int, record: dict) -> None:
    where = f"record {index}"
    if "ID" not in record:
        raise UserInputError(path, f"{where}: missing column 'ID' (not an MLLMU-Bench split)")
    if "image" not in record and "images" not in record and _asks_about_an_image(record):
        # A text-only record (the pretrained testbed's real-knowledge split: capitals) needs no image column.
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


def _asks_about_an_image(record: dict) -> bool:
    """Whether any question of the record is an image question (a record without one needs no image)."""
    classification = record.get("Classification_Task")
    if isinstance(classification, dict) and classification.get("Image_Textual_Questions"):
        return True
    return any(isinstance(q, dict) and q.get("Type") == "Image_Textual"
               for column in ("Generation_Task", "Mask_Task") for q in record.get(column) or [])


def record_images(path: Path, record: dict) -> list[EncodedImage]:
    """The record's images, still encoded: one for most splits, several for Test_Set (new renderings of the
    subject). Their headers are checked here; their pixels are decoded where an item's `.image` is read."""
    label = f"subject {record['ID']}"
    if record.get("images"):
        return [EncodedImage(image_bytes(field), str(path), label) for field in record["images"]]
    if record.get("image"):
        return [EncodedImage(image_bytes(record["image"]), str(path), label)]
    return []


@dataclass(frozen=True)
class RecordQuestion:
    """One question of a record, as stored: `index` is its position in its list (Image_Textual_Questions or
    Pure_Text_Questions for classification; Mask_Task; Generation_Task), `answer` the stored answer
    (Correct_Answer or Ground_Truth)."""

    task: Task
    modality: str  # "image" or "text"
    index: int
    question: str
    answer: str
    options: dict[str, str] | None = None


def record_questions(record: dict) -> list[RecordQuestion]:
    """Every question of one record, in the order items are made: classification (image, then text), cloze
    (Mask_Task), generation (Generation_Task)."""
    questions = []
    classification = record.get("Classification_Task") or {}
    for key, modality in (("Image_Textual_Questions", "image"), ("Pure_Text_Questions", "text")):
        for index, q in enumerate(classification.get(key) or []):
            options = {k: str(v) for k, v in (q["Options"] or {}).items() if v is not None}
            questions.append(RecordQuestion("classification", modality, index, q["Question"],
                                            str(q["Correct_Answer"]), options))
    for column, task in (("Mask_Task", "cloze"), ("Generation_Task", "generation")):
        for index, q in enumerate(record.get(column) or []):
            modality = "image" if str(q["Type"]).lower() in IMAGE_TYPES else "text"
            questions.append(RecordQuestion(task, modality, index, q["Question"], str(q["Ground_Truth"])))
    return questions


def expand_items(records: Iterable[dict], path: str | Path = "<records>") -> list[QAItem]:
    """Every question of every record as a QAItem; image questions are repeated for each image."""
    path = Path(path)
    items: list[QAItem] = []
    for record in records:
        subject_id = str(record["ID"])
        images = record_images(path, record)
        for q in record_questions(record):
            answer = q.answer.strip()[:1].upper() if q.task == "classification" else q.answer
            if q.modality == "text":
                items.append(QAItem(subject_id, q.task, "text", q.question, answer, q.options))
            else:
                items += [QAItem(subject_id, q.task, "image", q.question, answer, q.options, image) for image in images]
    return items


def load_split_items(data_dir: str | Path, split: str, forget_ratio: int = 10) -> list[QAItem] | None:
    """Items of a report split, or None where the data has no such split (e.g. no General_Set)."""
    return load_dir_items(data_dir, split_dir_name(split, forget_ratio))


def load_dir_items(data_dir: str | Path, split_dir: str) -> list[QAItem] | None:
    """Items of a split by directory name (either layout, every shard), or None where the data has none."""
    shards = split_shards(data_dir, split_dir)
    return None if shards is None else [item for shard in shards for item in read_items(shard)]


def read_items(path: str | Path) -> list[QAItem]:
    """Every question of one split (its directory or parquet file)."""
    path = Path(path)
    if path.is_dir():
        return [item for shard in shard_files(path) for item in read_items(shard)]
    if clear_rows.is_clear_file(path):  # a CLEAR config's shard (no ID column): its rows as plain questions
        return clear_rows.read_items(path)
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


def validation_rank(subject_id: str) -> float:
    """A subject's place in [0, 1) in the hash order the validation hold-out draws from (below the fraction:
    held out)."""
    digest = hashlib.sha256(f"mllmeraser-validation:{subject_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def _is_validation_subject(subject_id: str, fraction: float) -> bool:
    return validation_rank(subject_id) < fraction


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
    return retain + (load_dir_items(data_dir, GENERAL_TRAIN) or [])


def default_erasure_items(data_dir: str | Path | None) -> list[QAItem]:
    """Questions the model refuses, for the erasure direction: the testbed's Unknown_Train split. The real
    MLLMU-Bench has none, so there `--erasure SPEC` must name such questions."""
    items = load_dir_items(data_dir, ERASURE_SPLIT) if data_dir is not None else None
    if items is None:
        raise UserInputError(data_dir, f"no {ERASURE_SPLIT} split here (the testbed's questions about strangers; "
                                       f"the real MLLMU-Bench has none): pass --erasure SPEC, questions this model "
                                       f"refuses (a split, parquet, or JSONL of {{image, question, answer}})")
    return items


def erasure_items(spec: str | None, data_dir: str | Path | None, forget_ratio: int = 10) -> list[QAItem]:
    """The erasure inputs of a fit: `--erasure SPEC` where given, else the data's Unknown_Train."""
    return resolve_spec(spec, data_dir, forget_ratio) if spec else default_erasure_items(data_dir)


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
    items = load_dir_items(data_dir, directory)
    if items is None:
        raise missing_split(data_dir, directory)
    return items


def read_jsonl_items(path: str | Path) -> list[QAItem]:
    """User-supplied pairs: one JSON object a line with `question`, `answer` and optionally `image` (a path
    relative to the JSONL file) and `task` (default generation)."""
    path = Path(path)
    if not path.is_file():
        raise UserInputError(path, "no such JSONL file")
    items = []
    for number, row in json_lines(path):
        if "question" not in row or "answer" not in row:
            raise UserInputError(path, f"line {number}: needs 'question' and 'answer'")
        image = None
        if row.get("image"):
            image_path = (path.parent / row["image"]).resolve()
            try:
                image = Image.open(image_path).convert("RGB")
            except Exception as exc:
                raise UserInputError(image_path, f"unreadable image ({first_line(exc)}), named on line {number} of {path}") from None
        task = row.get("task", "generation")
        if task not in get_args(Task):
            raise UserInputError(path, f"line {number}: task must be classification, cloze or generation")
        items.append(QAItem(str(row.get("id", number)), task, "image" if image else "text",
                            str(row["question"]), str(row["answer"]), row.get("options"), image))
    if not items:
        raise UserInputError(path, "no items")
    return items
