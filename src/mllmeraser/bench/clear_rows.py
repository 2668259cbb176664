"""A CLEAR config's rows as questions: the questions CLEAR asks of an image, a row's image, and a shard's rows as
plain questions for fitting (`fit --forget/--retain` with a CLEAR config). Apart from the scoring (clear.py), so
that the split reader (data.py), which reads a CLEAR shard where one is named, needs neither the scorer nor clear.py.
"""

from __future__ import annotations

from pathlib import Path

from ..core.inputs import EncodedImage
from ..errors import UserInputError
from .items import QAItem
from .parquet import image_bytes, read_table

# The questions CLEAR asks of an image (mm/dataset.py): a caption question drawn at random per row, and the
# name prompt (with its trailing space) for face recognition.
CAPTION_QUESTIONS = (
    "What can you see in this picture?",
    "Tell me about the content of this image",
    "Can you give a description of the image?",
    "What is depicted in the image?",
    "Explain what you observe in the picture.",
    "Describe the image in detail.",
    "What is the main subject of this image?",
    "Can you describe the scene or objects in the image?",
    "What is happening in this image?",
)
NAME_QUESTION = "The name of the person on the image is "


def is_clear_file(path: Path) -> bool:
    """Whether a parquet file is a CLEAR config's shard: no MLLMU-Bench `ID`, and a caption or an answer column."""
    import pyarrow.parquet as pq  # only where a config is read: the module imports without pyarrow

    try:
        names = set(pq.read_schema(path).names)
    except Exception:  # unreadable: the MLLMU-Bench reader words the error
        return False
    return "ID" not in names and bool(names & {"caption", "answer"})


def row_image(shard: Path, number: int, row: dict) -> EncodedImage | None:
    field = row.get("image")
    if field is None or (isinstance(field, dict) and not field.get("bytes")):
        return None
    return EncodedImage(image_bytes(field), str(shard), f"row {number}")


def read_items(path: Path) -> list[QAItem]:
    """One CLEAR shard's rows as verbatim generation questions, for fitting: an image row with a caption asks
    for it (a caption question chosen by row number) and, where the row names the person, for the name; an
    image row with an answer asks its question (or, in real_faces, for the name); a text row (+tofu) asks its
    question."""
    table = read_table(path)
    items = []
    for number, row in enumerate(table.to_pylist()):
        image = row_image(path, number, row)
        subject = str(row.get("name") or f"{path.parent.name}-{number}")
        if image is not None and row.get("caption"):
            question = CAPTION_QUESTIONS[number % len(CAPTION_QUESTIONS)]
            items.append(QAItem(subject, "generation", "image", question, row["caption"], image=image, verbatim=True))
            if row.get("name"):
                items.append(QAItem(subject, "generation", "image", NAME_QUESTION, row["name"], image=image,
                                    verbatim=True))
        elif row.get("answer"):
            question = row.get("question") or NAME_QUESTION
            items.append(QAItem(subject, "generation", "image" if image is not None else "text", question,
                                str(row["answer"]), image=image, verbatim=True))
    if not items:
        raise UserInputError(path, "no CLEAR rows with a caption or an answer")
    return items
