"""What a question asked of the model is: `Prompt`, the neutral form, and the plain tuples the public API also takes.

The core knows no benchmark. What it reads of a question is the prompt protocol (`PromptLike`): the user turn's
text exactly as the model is to read it, the image, earlier turns, the start of the answer, the answer expected, how
many tokens an answer may take, and the fields that name it in a model-cache key. `Prompt` is that and nothing
more. A benchmark's question type formats its own text (MLLMU-Bench's `bench.items.QAItem` appends the
benchmark's instruction for its task) and exposes the same attributes, so both flow through the core unchanged.

A question's image may be held encoded (`EncodedImage`: the file's bytes, as a benchmark split stores them) and is
then decoded each time `item.image` is read, never cached: thousands of items cost their files' bytes, not
their decoded pixels. So may an `OccludedImage` (another held image with one edge covered, made when read): the
gate's banks hold four of them per photo (`occluded_copies`), which must not cost four decoded photos each.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field, replace
from typing import Any, Iterable, Literal, Protocol

from PIL import Image, ImageDraw

from ..errors import UserInputError

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


def occluded_copies(items: "Iterable[PromptLike]", fraction: float) -> "list[PromptLike]":
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


class PromptLike(Protocol):
    """What the core reads of a question (for typing and documentation; `Prompt` and bench's QAItem have it).

    text: the user turn's text as the model reads it; image: a PIL image or None, decoded on read;
    image_source: the image as held (reading it decodes nothing); history: earlier (user, assistant) turns, the
    image in the first; prefill: text the assistant turn starts with; answer: what the model should say (the PGD
    target, the teacher-forced answer; never shown as input); modality: "image" or "text", whether the image is
    encoded; max_new_tokens: how many tokens an answer may take (questions batch together only where it agrees);
    cache_fields(): the JSON-able fields that name the question in a model-cache key, its image aside. Copies are
    made with `dataclasses.replace(item, image=...)` (occluded_copies), so an implementation is a dataclass with an
    `image` field (held as `holds_image_on_read` holds it)."""

    text: str
    answer: str
    history: tuple[tuple[str, str], ...]
    prefill: str
    modality: Modality
    max_new_tokens: int

    @property
    def image(self) -> Image.Image | None: ...

    @property
    def image_source(self) -> Image.Image | EncodedImage | OccludedImage | None: ...

    def cache_fields(self) -> list[Any]: ...


class _ImageOnRead:
    """An item's `image`: stores what the item was given; reading it gives a PIL image (an EncodedImage or
    OccludedImage is decoded anew on each read) or None."""

    def __get__(self, item, owner=None):
        if item is None:
            return None
        held = item.__dict__.get("_image")
        return held.decode() if isinstance(held, (EncodedImage, OccludedImage)) else held

    def __set__(self, item, value) -> None:  # reached only from the dataclass __init__ (items are frozen)
        item.__dict__["_image"] = value


def _image_source(item) -> Image.Image | EncodedImage | OccludedImage | None:
    """The image as held: a PIL image, an EncodedImage or OccludedImage (not decoded by reading this), or None."""
    return item.__dict__.get("_image")


def holds_image_on_read(cls):
    """Class decorator, above `@dataclass`: the dataclass's `image` field keeps what it is given (a PIL image, an
    EncodedImage, an OccludedImage or None), `item.image` decodes it on every read and `item.image_source` gives it
    as held. Shared by `Prompt` and the benchmarks' question types, so an image is held one way everywhere."""
    cls.image = _ImageOnRead()
    cls.image_source = property(_image_source, doc=_image_source.__doc__)
    return cls


DEFAULT_MAX_NEW_TOKENS = 50
"""A Prompt's answer cap unless it says otherwise: a sentence (what a plain tuple's answer was capped at before)."""


@holds_image_on_read
@dataclass(frozen=True)
class Prompt:
    """One question in no benchmark's format: `text` is asked exactly as given, with `image` if there is one.

    answer: what the model should say (fitting's PGD target on an image question; never shown to the model);
    history: earlier (user, assistant) turns, the image in the first; prefill: text the assistant turn starts with
    (the model continues it); max_new_tokens: how many tokens an answer may take; name: what the prompt is called
    (a plain tuple's position in its list), part of its model-cache key."""

    text: str
    answer: str = ""
    image: Image.Image | None = field(default=None, compare=False, repr=False)  # or an EncodedImage, OccludedImage
    history: tuple[tuple[str, str], ...] = ()
    prefill: str = ""
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    name: str = ""

    @property
    def modality(self) -> Modality:
        return "text" if _image_source(self) is None else "image"

    def cache_fields(self) -> list[Any]:
        # Laid out as a verbatim generation question's fields were before prompts were neutral (subject, task,
        # modality, question, answer, options, verbatim, history, prefill): model-cache entries made from plain
        # tuples keep their keys.
        return [self.name, "generation", self.modality, self.text, self.answer, None, True,
                [list(turn) for turn in self.history], self.prefill]


def is_prompt(entry: object) -> bool:
    """Whether `entry` is a question the core can ask: a Prompt, or an object whose class has the prompt protocol's
    `cache_fields` method (PromptLike; looked up on the class, so no image is decoded to find out)."""
    return isinstance(entry, Prompt) or callable(getattr(type(entry), "cache_fields", None))


def as_items(inputs: Iterable[PromptLike | PlainInput]) -> list[PromptLike]:
    """Questions from prompts (a Prompt or a benchmark's item: kept as they are) and plain
    `(image or None, question, answer)` tuples.

    A tuple becomes a Prompt: the model is asked the question exactly as given (no benchmark's instruction is
    appended), with the image if there is one, and `answer` is what it should say (fitting uses it as the PGD
    target of an image question; it is never shown to the model). Its name is its position in `inputs`.
    """
    items = []
    for index, entry in enumerate(inputs):
        if is_prompt(entry):
            items.append(entry)
            continue
        if not (isinstance(entry, tuple) and len(entry) == 3):
            raise TypeError(f"input {index}: expected a prompt (a Prompt, or a benchmark's item such as QAItem) or an "
                            f"(image or None, question, answer) tuple, got {type(entry).__name__}")
        image, question, answer = entry
        if image is not None and not isinstance(image, Image.Image):
            raise TypeError(f"input {index}: the image must be a PIL.Image or None, got {type(image).__name__}")
        if not isinstance(question, str) or not isinstance(answer, str):
            raise TypeError(f"input {index}: question and answer must be strings")
        items.append(Prompt(question, answer, image=image, name=str(index)))
    return items


def fold_system(system: str, user: str) -> str:
    """A system prompt as one user turn carries it (the server's rule for system messages, which every chat
    template here can render): the system text, a blank line, then the user's text (none: the system text alone)."""
    return system + ("\n\n" + user if user else "")
