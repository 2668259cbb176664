"""What a question asked of the model is: `QAItem`, and the plain tuples the public API also takes.

The item's tasks are MLLMU-Bench's (classification, cloze, generation), and so is the instruction its prompt
ends with: that one dependency on the benchmark, its prompt strings (`bench/prompts.py`), is imported here
explicitly. A `verbatim` item skips it: its prompt is its question exactly as given.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Literal

from PIL import Image

from ..bench import prompts as mllmu_prompts

Task = Literal["classification", "cloze", "generation"]
Modality = Literal["image", "text"]
PlainInput = tuple["Image.Image | None", str, str]  # (image or None, question, answer)


@dataclass(frozen=True)
class QAItem:
    """One question asked of the model: what it sees (image, prompt) and what counts as right (answer)."""

    subject_id: str
    task: Task
    modality: Modality
    question: str
    answer: str  # classification: the correct letter; cloze and generation: the ground truth
    options: dict[str, str] | None = None
    image: Image.Image | None = field(default=None, compare=False, repr=False)
    verbatim: bool = False  # True: the prompt is `question` as given, with no MLLMU-Bench instruction

    @property
    def prompt(self) -> str:
        if self.verbatim:
            return self.question
        if self.task == "classification":
            return mllmu_prompts.classification_prompt(self.question, self.options or {})
        if self.task == "cloze":
            return mllmu_prompts.cloze_prompt(self.question)
        return mllmu_prompts.generation_prompt(self.question)


def as_items(inputs: Iterable[QAItem | PlainInput]) -> list[QAItem]:
    """Items from QAItems (kept as they are) and plain `(image or None, question, answer)` tuples.

    A tuple becomes a verbatim generation item: the model is asked the question exactly as given (no
    MLLMU-Bench instruction is appended, unlike a benchmark generation item), with the image if there is one,
    and `answer` is what it should say (fitting uses it as the PGD target of an image question; it is never
    shown to the model). Its subject_id is its position in `inputs`.
    """
    items = []
    for index, entry in enumerate(inputs):
        if isinstance(entry, QAItem):
            items.append(entry)
            continue
        if not (isinstance(entry, tuple) and len(entry) == 3):
            raise TypeError(f"input {index}: expected a QAItem or an (image or None, question, answer) tuple, "
                            f"got {type(entry).__name__}")
        image, question, answer = entry
        if image is not None and not isinstance(image, Image.Image):
            raise TypeError(f"input {index}: the image must be a PIL.Image or None, got {type(image).__name__}")
        if not isinstance(question, str) or not isinstance(answer, str):
            raise TypeError(f"input {index}: question and answer must be strings")
        items.append(QAItem(str(index), "generation", "text" if image is None else "image", question, answer,
                            image=image, verbatim=True))
    return items
