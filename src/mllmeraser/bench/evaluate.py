"""The MLLMU-Bench protocol: classification, cloze and generation (ROUGE, BLEU), image+text and text-only.

`evaluate()` returns `{split: {metric: value}}` with values as fractions in [0, 1]. Splits: forget, test
(new renderings / images of the forget subjects), retain and real (pre-existing knowledge), both less their
validation people (the `validation` split, which chooses settings), and, on the testbed, general (visual skills) and unknown (refusal rate).
Three protocols (protocols.py): `testbed`, the default; `mllmu`, MLLMU-Bench's own evaluation script; and
`paper`, the MLLMEraser authors' script. The last two report retain and real whole (they have no validation
people) and ask and read answers their own ways.
"""

from __future__ import annotations

import functools
import logging
import re
from collections import defaultdict
from pathlib import Path
from typing import Iterable, Sequence

import torch

from ..core import diagnostics
from ..core.eraser import Eraser
from .items import QAItem
from ..core.models import answer_items
from ..errors import UserInputError
from . import data, facts, prompts, protocols
from .data import REPORT_SPLITS, VALIDATION_SPLIT

log = logging.getLogger(__name__)


@functools.cache
def _text_metrics():
    """(ROUGE scorer, BLEU, BLEU's smoothing), built on first use: importing this module (the CLI's parser reads
    its constants) loads neither rouge-score nor nltk, which only scoring needs (the bench extra)."""
    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True), sentence_bleu, \
        SmoothingFunction().method1


def first_letter(answer: str) -> str:
    match = re.search(r"[A-Za-z0-9]", answer)
    return match.group(0).upper() if match else ""


def item_scores(item: QAItem, answer: str) -> dict[str, float]:
    """The per-question scores; the split's metrics are their means by task and modality."""
    suffix = item.modality
    scores = {"refusal_rate": float(prompts.is_refusal(answer))} if item.task != "classification" else {}
    if item.task == "classification":
        scores[f"classification_{suffix}"] = float(first_letter(answer) == item.answer.upper())
    elif item.task == "cloze":
        scores[f"cloze_{suffix}"] = float(item.answer.strip().lower() in answer.lower())
    else:
        scorer, sentence_bleu, smoothing = _text_metrics()
        rouge = scorer.score(item.answer, answer)
        for name in ("rouge1", "rouge2", "rougeL"):
            scores[f"{name}_{suffix}"] = rouge[name].fmeasure
        reference, hypothesis = item.answer.split(), answer.split()
        scores[f"bleu_{suffix}"] = sentence_bleu([reference], hypothesis, smoothing_function=smoothing) if hypothesis else 0.0
    return scores


def mllmu_item_scores(item: QAItem, answer: str) -> dict[str, float]:
    """The mllmu protocol's per-question scores: eval.py's letter rule for classification, its unstripped
    ground truth for cloze; generation (ROUGE, BLEU) and the refusal rate as in `item_scores`."""
    suffix = item.modality
    if item.task == "classification":
        return {f"classification_{suffix}": float(protocols.answer_letter(answer, item.options or {}) == item.answer)}
    scores = item_scores(item, answer)
    if item.task == "cloze":
        scores[f"cloze_{suffix}"] = float(item.answer.lower() in answer.lower())
    return scores


def paper_item_scores(item: QAItem, answer: str) -> dict[str, float]:
    """The paper protocol's per-question scores: the paper script's letter rule for classification; cloze,
    generation and the refusal rate as under the mllmu protocol (the two scripts score them alike)."""
    if item.task == "classification":
        letter = protocols.paper_letter(answer, item.options or {}, item.modality == "image")
        return {f"classification_{item.modality}": float(letter == item.answer)}
    return mllmu_item_scores(item, answer)


RAW_SCORERS = {"mllmu": mllmu_item_scores, "paper": paper_item_scores}


def aggregate(scored: Iterable[dict[str, float]]) -> dict[str, float]:
    sums: dict[str, float] = defaultdict(float)
    counts: dict[str, int] = defaultdict(int)
    for scores in scored:
        for name, value in scores.items():
            sums[name] += value
            counts[name] += 1
    return {name: sums[name] / counts[name] for name in sorted(sums)}


def score_items(model, processor, items: Sequence[QAItem], batch_size: int = 64, progress: bool = True,
                desc: str = "answer", answers_out: list[str] | None = None) -> dict[str, float]:
    """The split's metrics; `answers_out` (a list), where given, receives the answers in item order."""
    answers = answer_items(model, processor, items, batch_size, progress, desc)
    if answers_out is not None:
        answers_out.extend(answers)
    return aggregate(item_scores(item, answer) for item, answer in zip(items, answers))


def report_items(data_dir: str | Path, forget_ratio: int = 10, splits: Sequence[str] = REPORT_SPLITS,
                 protocol: str = "testbed") -> dict[str, list[QAItem]]:
    """The questions of each report split in `data_dir`. A testbed-only split the data lacks (general, unknown)
    is skipped with a one-line warning on stderr; any other missing split is an error. The testbed protocol
    leaves the validation people out of retain and real; the mllmu and paper protocols report them whole."""
    protocols.check_protocol(protocol)
    forget = data.load_split_items(data_dir, "forget", forget_ratio)
    if forget is None:
        raise data.missing_split(data_dir, data.split_dir_name("forget", forget_ratio),
                                 " (is --data an MLLMU-Bench directory?)")
    forget_ids = {item.subject_id for item in forget}
    items: dict[str, list[QAItem]] = {}
    for split in splits:
        if split == VALIDATION_SPLIT:
            for needed in data.VALIDATION_FRACTION:  # never a shorter validation set without a word
                if data.split_shards(data_dir, data.split_dir_name(needed, forget_ratio)) is None:
                    raise data.missing_split(data_dir, data.split_dir_name(needed, forget_ratio))
            items[split] = data.validation_items(data_dir, forget_ratio)
            continue
        loaded = forget if split == "forget" else data.load_split_items(data_dir, split, forget_ratio)
        if loaded is None:
            directory = data.split_dir_name(split, forget_ratio)
            if split not in data.TESTBED_ONLY_SPLITS:
                raise data.missing_split(data_dir, directory)
            log.warning("no %s split in %s; the %s split is skipped (only the offline testbed has it)",
                        directory, data_dir, split)
            continue
        if split == "test":  # Test_Set holds the largest forget set's subjects: keep this request's
            loaded = [i for i in loaded if i.subject_id in forget_ids] or loaded
        if split in data.VALIDATION_FRACTION and protocol == "testbed":  # validation people choose settings
            loaded = data.validation_split(loaded, split)[0]
        items[split] = loaded
    return items


def prepare(data_dir: str | Path, forget_ratio: int, items: dict[str, list[QAItem]],
            protocol: str = "testbed", seed: int = 0) -> dict[str, list]:
    """What each split's questions are under `protocol`: the items themselves (testbed), or the mllmu or paper
    protocol's prompts for the same subjects (protocols.mllmu_questions, protocols.paper_questions)."""
    if protocols.check_protocol(protocol) == "testbed":
        return items
    questions = protocols.mllmu_questions if protocol == "mllmu" else protocols.paper_questions
    return {split: questions(data_dir, split, forget_ratio, {i.subject_id for i in split_items}, seed)
            for split, split_items in items.items()}


def score(model, processor, questions: dict[str, list], protocol: str = "testbed", batch_size: int = 64,
          progress: bool = True, answers_out: dict[str, list[str]] | None = None) -> dict[str, dict[str, float]]:
    """{split: metrics} of `prepare`d questions; `answers_out` (a dict), where given, receives {split: answers}
    in question order (what the fact-leak rate compares across methods)."""
    if answers_out is not None:
        answers_out.update({split: [] for split in questions})
    if protocols.check_protocol(protocol) == "testbed":
        return {split: score_items(model, processor, split_items, batch_size, progress, desc=f"eval {split}",
                                   answers_out=None if answers_out is None else answers_out[split])
                for split, split_items in questions.items()}
    results = {}
    for split, prompted in questions.items():
        answers = protocols.answer_prompts(model, processor, prompted, batch_size, progress, desc=f"eval {split}",
                                           protocol=protocol)
        if answers_out is not None:
            answers_out[split].extend(answers)
        results[split] = aggregate(RAW_SCORERS[protocol](q.item, answer) for q, answer in zip(prompted, answers))
    return results


def evaluate(model, processor, data_dir: str | Path, forget_ratio: int = 10, splits: Sequence[str] = REPORT_SPLITS,
             batch_size: int = 64, progress: bool = True, items: dict[str, list[QAItem]] | None = None,
             protocol: str = "testbed", answers_out: dict[str, list[str]] | None = None) -> dict[str, dict[str, float]]:
    items = items if items is not None else report_items(data_dir, forget_ratio, splits, protocol)
    return score(model, processor, prepare(data_dir, forget_ratio, items, protocol), protocol, batch_size, progress,
                 answers_out)


# ---- the fact-leak rate beside ROUGE-L (facts.py) -------------------------------------------------------

def question_items(questions: Sequence) -> list[QAItem]:
    """The QAItems behind prepared questions (a protocol's Prompted holds its item; a QAItem is its own)."""
    return [getattr(q, "item", q) for q in questions]


def split_facts(questions: dict[str, list]) -> dict[str, list[str | None]]:
    """{split: each question's fact or None} (facts.fact_strings over the split's own questions)."""
    return {split: facts.fact_strings(question_items(qs)) for split, qs in questions.items()}


def add_fact_metrics(results: dict[str, dict[str, float]], split_fact: dict[str, list[str | None]],
                     answers: dict[str, list[str]],
                     vanilla: dict[str, list[bool | None]] | None = None) -> dict[str, list[bool | None]]:
    """Adds each split's `fact_stated` (and, against vanilla's per-question flags, `fact_leak` and
    `fact_stated_vanilla`)
    to `results` in place, beside its ROUGE-L; every other number is left as it is. Returns {split: flags}."""
    flags = {}
    for split, split_answers in answers.items():
        if split not in split_fact or split not in results:
            continue
        reference = None if vanilla is None else vanilla.get(split)
        metrics, flags[split] = facts.split_metrics(split_fact[split], split_answers, reference)
        results[split].update(metrics)
    return flags


def vanilla_fact_flags(model, processor, items: dict[str, list[QAItem]], split_fact: dict[str, list[str | None]],
                       batch_size: int = 64, progress: bool = True) -> dict[str, list[bool | None]]:
    """{split: per question, whether vanilla's answer states its fact (None: no fact)}, answering only the
    questions with a fact, with nothing attached to `model` (the caller detaches). They are batched as a full
    evaluation batches them (answer_items groups by modality and task, in order), so the answers are the ones a
    vanilla `eval` gives."""
    flags = {}
    for split, split_items in items.items():
        asked = [i for i, fact in enumerate(split_fact.get(split, [])) if fact is not None]
        answers = answer_items(model, processor, [split_items[i] for i in asked], batch_size, progress,
                               desc=f"vanilla {split}")
        flags[split] = [None] * len(split_items)
        for i, answer in zip(asked, answers):
            flags[split][i] = facts.states_fact(answer, split_fact[split][i])
    return flags


def gate_scores(model, processor, eraser: Eraser, items: dict[str, list[QAItem]],
                batch_size: int = 64) -> dict[str, torch.Tensor]:
    """What the eraser's gate reads on each split's questions, {split: [N, K]} (see diagnostics.gate_scores)."""
    return {split: diagnostics.gate_scores(model, processor, eraser, split_items, batch_size)
            for split, split_items in items.items()}


def fire_rate(scores: torch.Tensor, eraser: Eraser) -> float:
    """The fraction of prompts on which at least one of the eraser's prompt gates fires (scores [N, K])."""
    return float((scores > torch.tensor(eraser.prompt_gate.threshold)).any(dim=1).double().mean())


HEADLINE = ("classification_image", "classification_text", "cloze_image", "cloze_text", "rougeL_image",
            "rougeL_text", "refusal_rate")


def format_table(results: dict[str, dict[str, float]], columns: Sequence[str] = HEADLINE) -> str:
    """A fixed-width table of one result set: a row per split, a column per headline metric (and the gate's
    fire rate where the results have it)."""
    for extra in ("fact_stated", "fact_leak", "gate_fire_rate"):  # beside the headline where a run has them
        if any(extra in metrics for metrics in results.values()):
            columns = (*columns, extra)
    width = max(len(c) for c in columns)
    header = "split".ljust(10) + "".join(c.rjust(width + 1) for c in columns)
    rows = [header, "-" * len(header)]
    for split, metrics in results.items():
        cells = "".join((f"{metrics[c]:.3f}" if c in metrics else "-").rjust(width + 1) for c in columns)
        rows.append(split.ljust(10) + cells)
    return "\n".join(rows)
