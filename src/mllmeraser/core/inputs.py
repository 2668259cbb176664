"""What a question asked of the model is: `QAItem`, and the plain tuples the public API also takes.

The item's tasks are MLLMU-Bench's (classification, cloze, generation), and so is the instruction its prompt
ends with: that one dependency on the benchmark, its prompt strings (`bench/prompts.py`), is imported here
explicitly. A `verbatim` item skips it: its prompt is its question exactly as given.

An item's image may be held encoded (`EncodedImage`: the file's bytes, as a benchmark split stores them) and is
then decoded each time `item.image` is read, never cached: thousands of items cost their files' bytes, not
their decoded pixels. So may an `OccludedImage` (another held image with one edge covered, made when read): the
gate's banks hold four of them per photo (`occluded_copies`), which must not cost four decoded photos each.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field, replace
from typing import Iterable, Literal

from PIL import Image, ImageDraw

from ..bench import prompts as mllmu_prompts
from ..errors import UserInputError

Task = Literal["classification", "cloze", "generation"]
Modality = Literal["image", "text"]
PlainInput = tuple["Image.Image | None", str, str]  # (image or None, question, answer)


class EncodedImage:
    """An image kept as its encoded bytes (PNG, JPEG, ...), decoded to RGB on every `decode()`. The bytes are
    checked against the formats Pillow knows when the object is made (a header check, nothing decoded), so
    empty or foreign bytes are a one-line error naming `source` at once; a file that passes the check but is
    broken further in is one when it is first decoded."""

    __slots__ = ("data", "source", "label")

    def __init__(self, data: bytes | None, source: str, label: str):
        self.data, self.source, self.label = data, source, label
        if not data:
            raise UserInputError(source, f"{label}: image has no bytes")
        if not _known_format(data):
            raise UserInputError(source, f"{label}: unreadable image (not an image format Pillow reads)")

    def decode(self) -> Image.Image:
        try:
            image = Image.open(io.BytesIO(self.data))
            image.load()
        except Exception as exc:
            lines = str(exc).strip().splitlines()
            raise UserInputError(self.source, f"{self.label}: unreadable image "
                                              f"({lines[0] if lines else type(exc).__name__})") from None
        return image.convert("RGB")


EDGES = ("top", "bottom", "left", "right")


class OccludedImage:
    """`source` (a PIL image or an EncodedImage) with a white band over `fraction` of its side along `edge`,
    drawn on every `decode()` (at least one pixel wide; the rest of the image untouched)."""

    __slots__ = ("source", "edge", "fraction")

    def __init__(self, source: "Image.Image | EncodedImage", edge: str, fraction: float):
        if edge not in EDGES:
            raise ValueError(f"edge must be one of {EDGES}, got {edge!r}")
        if not 0.0 < fraction < 1.0:
            raise ValueError(f"the band's fraction must be in (0, 1), got {fraction}")
        self.source, self.edge, self.fraction = source, edge, fraction

    def decode(self) -> Image.Image:
        image = (self.source.decode() if isinstance(self.source, EncodedImage) else self.source).convert("RGB")
        width, height = image.size
        across = width if self.edge in ("left", "right") else height
        band = max(1, round(across * self.fraction))
        box = {"top": (0, 0, width, band), "bottom": (0, height - band, width, height),
               "left": (0, 0, band, height), "right": (width - band, 0, width, height)}[self.edge]
        image = image.copy()
        ImageDraw.Draw(image).rectangle((box[0], box[1], box[2] - 1, box[3] - 1), fill="white")
        return image


def occluded_copies(items: "Iterable[QAItem]", fraction: float) -> "list[QAItem]":
    """Each item with an image once per edge (EDGES, in that order per item), that edge covered by a white band of
    `fraction` of the side; text items have none. Held lazily: a copy costs no decoded pixels until read."""
    if fraction <= 0.0:
        return []
    return [replace(item, image=OccludedImage(item.image_source, edge, fraction))
            for item in items if item.image_source is not None for edge in EDGES]


def _known_format(data: bytes) -> bool:
    """Whether a Pillow format claims these bytes' first 16 (what Image.open itself reads to choose one)."""
    Image.init()
    return any(accept is not None and accept(data[:16]) for _, accept in Image.OPEN.values())


@dataclass(frozen=True)
class QAItem:
    """One question asked of the model: what it sees (image, prompt) and what counts as right (answer)."""

    subject_id: str
    task: Task
    modality: Modality
    question: str
    answer: str  # classification: the correct letter; cloze and generation: the ground truth
    options: dict[str, str] | None = None
    image: Image.Image | None = field(default=None, compare=False, repr=False)  # or an EncodedImage, OccludedImage
    verbatim: bool = False  # True: the prompt is `question` as given, with no MLLMU-Bench instruction
    history: tuple[tuple[str, str], ...] = ()  # earlier (user, assistant) turns; the image goes in the first
    prefill: str = ""  # text the assistant turn starts with, after the generation prompt (the model continues it)

    @property
    def image_source(self) -> Image.Image | EncodedImage | OccludedImage | None:
        """The image as held: a PIL image, an EncodedImage or OccludedImage (not decoded by reading this), or None."""
        return self.__dict__.get("_image")

    @property
    def prompt(self) -> str:
        if self.verbatim:
            return self.question
        if self.task == "classification":
            return mllmu_prompts.classification_prompt(self.question, self.options or {})
        if self.task == "cloze":
            return mllmu_prompts.cloze_prompt(self.question)
        return mllmu_prompts.generation_prompt(self.question)


class _ImageOnRead:
    """`QAItem.image`: stores what the item was given; reading it gives a PIL image (an EncodedImage or
    OccludedImage is decoded anew on each read) or None."""

    def __get__(self, item, owner=None):
        if item is None:
            return None
        held = item.__dict__.get("_image")
        return held.decode() if isinstance(held, (EncodedImage, OccludedImage)) else held

    def __set__(self, item, value) -> None:  # reached only from the dataclass __init__ (the item is frozen)
        item.__dict__["_image"] = value


QAItem.image = _ImageOnRead()


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


def fold_system(system: str, user: str) -> str:
    """A system prompt as one user turn carries it (the server's rule for system messages, which every chat
    template here can render): the system text, a blank line, then the user's text (none: the system text alone)."""
    return system + ("\n\n" + user if user else "")
