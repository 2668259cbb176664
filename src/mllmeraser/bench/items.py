"""MLLMU-Bench's question: `QAItem`, a subject's question of one task and modality, asked in the benchmark's words.

Its `prompt` ends with the benchmark's instruction for its task (`prompts.py`), unless the item is `verbatim`; its
answer is capped by the task (MAX_NEW_TOKENS). It exposes the core's prompt protocol (core.inputs.PromptLike:
`text`, `image`, `history`, `prefill`, `answer`, `modality`, `max_new_tokens`, `cache_fields`), so fitting,
encoding and the model cache take it as they take a neutral `Prompt`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from PIL import Image

from ..core.inputs import Modality, holds_image_on_read
from . import prompts as mllmu_prompts

Task = Literal["classification", "cloze", "generation"]

MAX_NEW_TOKENS = {"classification": 5, "cloze": 20, "generation": 50}
"""How many tokens an answer may take, by task (MLLMU-Bench's protocol: a letter, a blank, a sentence)."""


@holds_image_on_read
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
    def prompt(self) -> str:
        """The question in MLLMU-Bench's words: its task's instruction appended (none where verbatim)."""
        if self.verbatim:
            return self.question
        if self.task == "classification":
            return mllmu_prompts.classification_prompt(self.question, self.options or {})
        if self.task == "cloze":
            return mllmu_prompts.cloze_prompt(self.question)
        return mllmu_prompts.generation_prompt(self.question)

    @property
    def text(self) -> str:
        """The prompt protocol's user text: `prompt`."""
        return self.prompt

    @property
    def max_new_tokens(self) -> int:
        return MAX_NEW_TOKENS[self.task]

    def cache_fields(self) -> list[Any]:
        """What names this item in a model-cache key (cache.item_digest), its image aside: every field that shapes
        its prompt or its answer, in the order keys have always been made of."""
        return [self.subject_id, self.task, self.modality, self.question, self.answer, self.options,
                self.verbatim, [list(turn) for turn in self.history], self.prefill]
