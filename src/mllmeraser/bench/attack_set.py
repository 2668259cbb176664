"""The questions attacked: every attack's forget and retain questions (attacks.py applied to a benchmark's
report splits), and the context the transformations read (names, biographies, other people's questions, user
paraphrases).
"""

from __future__ import annotations

import json
import zlib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

from ..errors import UserInputError
from . import data, evaluate
from .attacks import ATTACKS, BY_NAME, MIXED_PEOPLE, Attack, Context, apply, mixed_people_pair
from .items import QAItem


def split_records(data_dir: Path, split_dirs: Sequence[str]) -> list[dict]:
    """The records of every split directory named (a missing one adds none)."""
    return [r for d in split_dirs for r in (data.read_split_records(data_dir, d) or [])]


def load_context(data_dir: str | Path, forget_ratio: int = 10, paraphrases: dict[str, str] | None = None) -> Context:
    data_dir = Path(data_dir)
    dirs = [data.split_dir_name(s, forget_ratio) for s in ("forget", "retain", "real")]
    records = split_records(data_dir, dirs)
    names = {str(r["ID"]): str(r.get("name") or "") for r in records}
    bios = {str(r["ID"]): str(r.get("biography") or "") for r in records}
    return Context(names, bios, paraphrases=paraphrases)


def first_people(items: Sequence[QAItem], count: int | None) -> list[QAItem]:
    """The items of the first `count` subjects in a hash order (all where count is None)."""
    ids = sorted({i.subject_id for i in items}, key=lambda s: zlib.crc32(s.encode()))
    keep = set(ids if count is None else ids[:count])
    return [i for i in items if i.subject_id in keep]


@dataclass
class AttackSet:
    """{attack name: {"forget": items, "retain": items}}, and the context they were made with."""

    items: dict[str, dict[str, list[QAItem]]]
    context: Context


def attack_set(data_dir: str | Path, forget_ratio: int = 10, names: Sequence[str] | None = None,
               retain_people: int | None = 8, forget_people: int | None = None,
               paraphrases: dict[str, str] | None = None, tasks: Sequence[str] | None = None) -> AttackSet:
    """Every attack's forget and retain questions. Retain is `retain_people` reported retain people (hash-chosen;
    validation people left out), to keep a run to minutes; None takes them all. `tasks` (None: all) keeps the
    attacked questions of those tasks only: on a large model, classification and cloze answer in a few tokens
    where a generation answer takes 50 (the attack bars read classification)."""
    report = evaluate.report_items(data_dir, forget_ratio, ("forget", "test", "retain"))
    forget, test = first_people(report["forget"], forget_people), report["test"]
    test = [i for i in test if i.subject_id in {f.subject_id for f in forget}]
    retain = first_people(report["retain"], retain_people)
    ctx = load_context(data_dir, forget_ratio, paraphrases)
    others = tuple(i.question for i in retain if i.task == "generation" and i.modality == "text")
    partners = tuple(i for i in retain if i.task == "cloze" and i.modality == "text")
    ctx = replace(ctx, others=others, partners=partners)
    if tasks is not None:  # after the context: its other people's questions and partners stay whole
        forget, test, retain = ([i for i in items if i.task in tasks] for items in (forget, test, retain))
    chosen = [BY_NAME[n] for n in names] if names else list(ATTACKS)
    return AttackSet({a.name: _attacked_splits(a, test if a.new_photos else forget, retain, ctx) for a in chosen}, ctx)


def _attacked_splits(attack: Attack, forget: Sequence[QAItem], retain: Sequence[QAItem],
                     ctx: Context) -> dict[str, list[QAItem]]:
    if attack.name == MIXED_PEOPLE:  # both parts live in one prompt: the retain side is the same prompts
        pairs = [pair for pair in (mixed_people_pair(item, ctx) for item in forget) if pair is not None]
        return {"forget": [f for f, _ in pairs], "retain": [r for _, r in pairs]}
    return {"forget": apply(attack, forget, ctx), "retain": apply(attack, retain, ctx)}


def read_paraphrases(path: str | Path) -> dict[str, str]:
    """{question: paraphrase} from a JSONL of {"question": ..., "paraphrase": ...} lines."""
    mapping = {}
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            mapping[str(row["question"])] = str(row["paraphrase"])
        except (ValueError, KeyError, TypeError) as exc:
            raise UserInputError(path, f"line {number}: expected {{\"question\": ..., \"paraphrase\": ...}} ({exc})")
    return mapping
