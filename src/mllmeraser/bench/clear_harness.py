"""`compare` on CLEAR: the question sets every method is fitted, chosen and measured on when `--data` holds CLEAR's
configs (compare.py picks this harness over MLLMU-Bench's; both answer the same calls).

- forget: the request's forget config (`forgetNN`) as questions (clear_rows.read_items: each image row asks for
  its caption and for the person's name): what the eraser and the baselines are fitted on.
- validation: CLEAR has no validation people, so some of the retain people are held out: the hash-chosen tenth of
  `retain_perturbed`'s people that MLLMU-Bench's retain split holds out (data.validation_rank; at least one). They
  are left out of the fit's retain config and of the reported retain split; they choose every method's setting
  and calibrate the erasers' prompt gates, and nothing else.
- retain_fit: the request's retain config (`retainNN`), less the validation people.
- the report: CLEAR's four splits and its model utility (clear.score), retain without the validation people.
- the validation score a setting must keep (>= RETAIN_KEEP x vanilla's): the arithmetic mean of CLEAR's six metrics
  on the validation people (ROUGE-L recall, Prob. and truth ratio, of the captions and of the names). Not CLEAR's
  harmonic mean: that is 0 as soon as one of the six is (a truth ratio clipped to 0 on every row of a few
  people), and then every setting would keep it.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Sequence

from ..core import models
from ..errors import UserInputError
from . import answering, attack_scoring, clear, clear_attacks, data, omu
from .data import VALIDATION_SPLIT
from .items import QAItem

VALIDATION_RULE = {
    "metric": "validation score (the mean of CLEAR's six metrics on them: ROUGE-L recall, Prob. and truth ratio of "
              "captions and names)",
    "people": f"held-out retain people (a hash-chosen tenth of {clear.RETAIN_PERTURBED}'s people, at least one, "
              f"left out of the fit's retain config and of the reported retain split)",
}


def validation_people(retain: Sequence[clear.ClearTask]) -> set[str]:
    """The retain people held out to choose settings: those MLLMU-Bench's rule holds out of a retain split (a
    hash-chosen tenth), or the first in its hash order where that rule picks none; one person at least stays."""
    names = sorted({q.item.subject_id for task in retain for q in task.questions}, key=data.validation_rank)
    if len(names) < 2:
        raise UserInputError(None, f"CLEAR's {clear.RETAIN_PERTURBED} has {len(names)} person: none can be held out "
                                   f"to choose settings on and still leave a retain split to report")
    fraction = data.VALIDATION_FRACTION["retain"]
    return {n for n in names if data.validation_rank(n) < fraction} or {names[0]}


def people_tasks(tasks: Sequence[clear.ClearTask], people: set[str], keep: bool) -> list[clear.ClearTask]:
    """The tasks with only the rows of `people` (keep) or only the others (not keep)."""
    return [replace(task, questions=tuple(q for q in task.questions if (q.item.subject_id in people) == keep))
            for task in tasks]


def asked_task(task: clear.ClearTask, ask) -> clear.ClearTask:
    """The task with its questions as a method asks them (`ask`: e.g. with its system prompt)."""
    items = ask([q.item for q in task.questions])
    return replace(task, questions=tuple(replace(q, item=item) for q, item in zip(task.questions, items)))


class ClearHarness:
    """The model, its processor and CLEAR's question sets every method is fitted, chosen and measured on."""

    benchmark = "clear"
    report_splits = clear.REPORT_SPLITS
    validation_rule = VALIDATION_RULE
    scoring = clear_attacks.SCORING  # how the attacked splits are scored
    skipped_attacks = clear_attacks.SKIPPED

    def __init__(self, model_dir: Path, data_dir: Path, settings, progress: bool,
                 erasure: list[QAItem] | None = None, loaded: tuple | None = None):
        self.model_dir, self.data_dir, self.settings, self.progress = model_dir, data_dir, settings, progress
        self.erasure = erasure
        ratio = settings.forget_ratio
        # Every config read and checked before the model loads.
        tasks = clear.report_tasks(data_dir, ratio, clear.REPORT_SPLITS, settings.seed)
        self.held_out = validation_people(tasks["retain"])
        self.tasks = {**tasks, "retain": people_tasks(tasks["retain"], self.held_out, keep=False),
                      VALIDATION_SPLIT: people_tasks(tasks["retain"], self.held_out, keep=True)}
        self.forget = clear.config_items(data_dir, clear.forget_config(ratio))
        self.retain_fit = [item for item in clear.config_items(data_dir, clear.retain_config(ratio))
                           if item.subject_id not in self.held_out]
        self.forget_names = clear.forget_names(data_dir, ratio)
        self.attacked = (clear_attacks.attack_set(data_dir, ratio, retain_people=settings.attack_retain_people,
                                                  seed=settings.seed, exclude=sorted(self.held_out))
                         if settings.attacks else None)
        self.attack_results: dict[str, dict] = {}
        self.fisher_cache: dict = {}
        self.model, self.processor = loaded or models.load_model(model_dir, **settings.model_options())

    @property
    def items(self) -> dict[str, list[QAItem]]:
        """Each split's questions (the gate's diagnostics and the report's examples read them)."""
        return {split: [q.item for task in tasks for q in task.questions] for split, tasks in self.tasks.items()}

    @property
    def validation(self) -> list[QAItem]:
        return self.items[VALIDATION_SPLIT]

    def evaluate(self, model=None, splits: Sequence[str] | None = None, ask=None,
                 reference: bool = False) -> dict[str, dict[str, float]]:
        """CLEAR's metrics on each split (and its model utility where retain and both real splits are asked);
        `ask` rewrites the questions first. `reference` plays no part: CLEAR has no fact-leak rate."""
        chosen = {split: self.tasks[split] for split in (splits or self.tasks) if split in self.tasks}
        if ask is not None:
            chosen = {split: [asked_task(task, ask) for task in tasks] for split, tasks in chosen.items()}
        return clear.score(model or self.model, self.processor, chosen, self.settings.batch_size, self.progress)

    def validation_score(self, metrics: dict[str, float]) -> float:
        values = list(metrics.values())
        return sum(values) / len(values)

    def omu_scores(self, results: dict[str, dict[str, float]]) -> dict[str, float]:
        return omu.clear_scores(results)

    def system_prompt(self) -> str:
        return answering.system_prompt(self.forget_names)

    def score_attacks(self, model, attacked) -> dict:
        return attack_scoring.score_attacks(model, self.processor, attacked, self.settings.batch_size,
                                            self.progress, self.scoring)
