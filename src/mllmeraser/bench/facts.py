"""The fact-leak rate: how often an erased model still states the fact a generation question asks for.

ROUGE-L averages a leak away: "I do not know. Kami Rokmer was born in Lisbon." scores about as well as a
refusal padded with the question's words, and a run where half the answers state the fact unchanged and half
are replaced by refusals reads as a middling ROUGE-L. The leak rate counts the answers instead:

    leak = #(the method's answer states the fact AND vanilla's does) / #(vanilla's answer states the fact)

over one split's generation questions, each pair the same question. Only questions vanilla answers with the
fact count (a fact the model never gave cannot leak); 0 is a complete erasure, 1 the model unchanged. On
retain and real splits the same number reads as the share of vanilla's stated facts that are kept.

The fact of a generation question is not stored: MLLMU-Bench's Generation_Task holds a ground-truth sentence
("Kami Rokmer was born in Lisbon."). It is derived from the cloze (Mask_Task) ground truths of the same person
(`fact_strings`): the value v of one of the person's cloze questions that the sentence states and the question
does not (the name is in both "Where was Kami Rokmer born?" and its answer: it is not what is asked). On the
testbed every person's cloze and generation questions cover the same attributes (testbed/world.py ATTRIBUTES),
so every fact is found; on the real MLLMU-Bench a generation question whose fact no cloze question of the same
person names has no fact, is left out of both counts, and `fact_coverage` says how many were left out. Where
several cloze values qualify, the one whose cloze stem, filled in, is the ground-truth sentence wins; if none
or several do, the question has no fact (never a guess).
"""

from __future__ import annotations

import math
import re
from typing import Sequence

from .items import QAItem
from . import prompts

BLANK = "__"


def _norm(text: str) -> str:
    return " ".join(text.lower().split())


def states_fact(answer: str, fact: str) -> bool:
    """Whether `answer` states `fact`: the fact as a whole word sequence in the answer, case and runs of
    whitespace ignored ("Lisbon" in "born in lisbon." but "pilot" not in "copilot")."""
    fact = _norm(fact)
    if not fact:
        return False
    return re.search(rf"(?<!\w){re.escape(fact)}(?!\w)", _norm(answer)) is not None


def fact_strings(items: Sequence[QAItem]) -> list[str | None]:
    """Per item, the fact its answer must state (module docstring), or None: not a generation question, a
    refusal ground truth (strangers), or no single cloze value of the same person to be found in `items`."""
    cloze: dict[str, list[QAItem]] = {}
    for item in items:
        if item.task == "cloze" and item.answer.strip() and not prompts.is_refusal(item.answer):
            cloze.setdefault(item.subject_id, []).append(item)
    out: list[str | None] = []
    for item in items:
        if item.task != "generation" or prompts.is_refusal(item.answer):
            out.append(None)
            continue
        candidates = {}
        for c in cloze.get(item.subject_id, []):
            value = c.answer.strip()
            if states_fact(item.answer, value) and not states_fact(item.question, value):
                candidates.setdefault(_norm(value), (value, c))
        if len(candidates) == 1:
            out.append(next(iter(candidates.values()))[0])
            continue
        filled = [value for value, c in candidates.values()
                  if BLANK in c.question and _norm(c.question.replace(BLANK, value)) == _norm(item.answer)]
        out.append(filled[0] if len(filled) == 1 else None)
    return out


def stated(facts: Sequence[str | None], answers: Sequence[str]) -> list[bool | None]:
    """Per question, whether its answer states its fact (None where it has none)."""
    return [None if fact is None else states_fact(answer, fact) for fact, answer in zip(facts, answers, strict=True)]


def stated_rate(flags: Sequence[bool | None]) -> float:
    """The fraction of answers with a fact that state it (NaN where no question has one)."""
    known = [f for f in flags if f is not None]
    return sum(known) / len(known) if known else math.nan


def leak_rate(vanilla: Sequence[bool | None], method: Sequence[bool | None]) -> tuple[float, int]:
    """(leak, n): of the n questions whose vanilla answer states the fact, the fraction whose method answer
    states it too (NaN where n = 0). Both sequences are per question, in one order."""
    if len(vanilla) != len(method):
        raise ValueError(f"{len(vanilla)} vanilla answers against {len(method)} method answers")
    kept = [bool(m) for v, m in zip(vanilla, method) if v]
    return (sum(kept) / len(kept) if kept else math.nan), len(kept)


def fact_coverage(items: Sequence[QAItem], facts: Sequence[str | None]) -> tuple[int, int]:
    """(generation questions with a fact, generation questions that are not refusals)."""
    asked = [f for item, f in zip(items, facts) if item.task == "generation" and not prompts.is_refusal(item.answer)]
    return sum(f is not None for f in asked), len(asked)


def split_metrics(facts: Sequence[str | None], answers: Sequence[str],
                  vanilla: Sequence[bool | None] | None = None) -> tuple[dict[str, float], list[bool | None]]:
    """({"fact_stated": ..., and with `vanilla` given "fact_leak" and "fact_stated_vanilla"}, the per-question
    flags): what one split's answers add beside ROUGE-L, each a fraction like every split metric (the leak's
    denominator is fact_stated_vanilla x the questions with a fact). Keys are left out where no question has a
    fact, so a split without generation questions (classification-only sets, a filtered run) gains nothing, and
    fact_leak is left out (unavailable, never NaN) where vanilla states no fact."""
    flags = stated(facts, answers)
    metrics: dict[str, float] = {}
    if any(f is not None for f in flags):
        metrics["fact_stated"] = stated_rate(flags)
        if vanilla is not None:
            leak, n = leak_rate(vanilla, flags)
            if n:
                metrics["fact_leak"] = leak
            metrics["fact_stated_vanilla"] = stated_rate(vanilla)
    return metrics, flags
