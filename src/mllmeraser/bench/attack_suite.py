"""The attack suite's run: vanilla, each eraser and each reference method (refuse, prompt) under every attack, with
the verdicts, the prompt gates' fire rates under each attack, and on request the white-box attacks.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from . import evaluate
from .attack_scoring import MLLMU_SCORING, Scoring, asked, judge, score_attacks
from .attack_set import AttackSet, attack_set
from .white_box import white_box


def run_suite(model, processor, data_dir: str | Path, forget_ratio: int = 10, erasers: dict | None = None,
              names: Sequence[str] | None = None, retain_people: int | None = 8, batch_size: int = 64,
              white_box_too: bool = False, paraphrases: dict[str, str] | None = None,
              progress: bool = False, references: dict | None = None, tasks: Sequence[str] | None = None,
              scoring: Scoring = MLLMU_SCORING) -> dict:
    """Vanilla, each of `erasers` ({name: Eraser}) and each of `references` ({name: an answering.py method:
    refuse, prompt}) under every attack: {"attacks": {method: score_attacks}, "verdicts": {method: verdicts},
    "worst": {method: (attack, recovered)}, "white_box": {method: ...} (vanilla and the erasers: a reference
    method changes no activation or likelihood)}. `scoring`'s headline is what the verdicts read
    (attack_scoring.mllmu_scoring)."""
    attacked = attack_set(data_dir, forget_ratio, names, retain_people, paraphrases=paraphrases, tasks=tasks)
    summary = run_attacked(model, processor, attacked, erasers, references, batch_size, progress, scoring)
    if white_box_too:
        summary["white_box"] = {name: white_box(model, processor, data_dir, forget_ratio, attacked, eraser)
                                for name, eraser in {"vanilla": None, **(erasers or {})}.items()}
    return summary


def run_attacked(model, processor, attacked: AttackSet, erasers: dict | None = None, references: dict | None = None,
                 batch_size: int = 64, progress: bool = False, scoring: Scoring = MLLMU_SCORING) -> dict:
    """Vanilla, each eraser and each reference method under every attack of `attacked`, judged (`judge`), with
    each prompt-gated eraser's fire rate per attack: what run_suite reports, on any benchmark's attack set."""
    results = {"vanilla": score_attacks(model, processor, attacked, batch_size, progress, scoring)}
    for name, eraser in (erasers or {}).items():
        with eraser.attach(model):
            results[name] = score_attacks(model, processor, attacked, batch_size, progress, scoring)
    for name, method in (references or {}).items():
        with method.attached(model):
            results[name] = score_attacks(model, processor, asked(attacked, method.ask), batch_size, progress, scoring)
    summary = judge(results, scoring)
    summary["gate_fire_rate"] = {name: gate_fire_rates(model, processor, eraser, attacked, batch_size)
                                 for name, eraser in (erasers or {}).items() if eraser.prompt_gate is not None}
    return summary


def gate_fire_rates(model, processor, eraser, attacked: AttackSet, batch_size: int = 64) -> dict[str, dict[str, float]]:
    """{attack: {"forget"|"retain": the fraction of attacked prompts a prompt gate turns on}}: where an eraser's
    numbers equal vanilla's, whether that is the gate staying off or the model not answering anyway."""
    return {name: {split: evaluate.fire_rate(evaluate.gate_scores(model, processor, eraser, {split: items},
                                                                  batch_size)[split], eraser)
                   for split, items in splits.items()}
            for name, splits in attacked.items.items()}
