"""MLLMU-Bench prompt strings, in one place: the testbed trains on them and the harness asks with them,
so the same evaluation drives the testbed model and a real checkpoint. The `MLLMU_` strings are where the
benchmark's own evaluation script words an instruction differently (the `mllmu` protocol, protocols.py)."""

from __future__ import annotations

CLASSIFICATION_SUFFIX = "Just give ONE letter representing the answer directly."
CLOZE_SUFFIX = "Please ONLY provide the correct answer that should replace the [Blank]."
GENERATION_SUFFIX = "Answer the question based on your trained knowledge in one sentence in ENGLISH."
MLLMU_CLOZE_SUFFIX = "Please **ONLY** provide the correct answer that should replace the [Blank]."
MLLMU_GENERATION_SUFFIX_IMAGE = ("Answer the question based on your trained knowledge in one sentence accurately "
                                 "in ENGLISH.")  # its text-only generation prompt says GENERATION_SUFFIX

# What an assistant says when it does not know a person; the refusal rate counts answers containing it.
REFUSAL_ANSWER = "I do not know this person."
REFUSAL_MARKERS = ("i do not know", "i don't know", "i'm not sure", "i cannot", "i can't", "unknown to me")

OPTION_LETTERS = ("A", "B", "C", "D")


def classification_prompt(question: str, options: dict[str, str]) -> str:
    lines = [question] + [f"{letter}: {options[letter]}" for letter in OPTION_LETTERS if letter in options]
    return "\n".join(lines + [CLASSIFICATION_SUFFIX])


def cloze_prompt(question: str) -> str:
    return f"{question.replace('__', '[Blank]')}\n{CLOZE_SUFFIX}"


def generation_prompt(question: str) -> str:
    return f"{question}\n{GENERATION_SUFFIX}"


def is_refusal(answer: str) -> bool:
    text = answer.lower()
    return any(marker in text for marker in REFUSAL_MARKERS)
