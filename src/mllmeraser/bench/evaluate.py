"""The MLLMU-Bench protocol: classification, cloze and generation (ROUGE, BLEU), image+text and text-only.

`evaluate()` returns `{split: {metric: value}}` with values as fractions in [0, 1]. Splits: forget, test
(new renderings / images of the forget subjects), retain and real (pre-existing knowledge), both less their
validation people (the `validation` split, which chooses settings), and, on the testbed, general (visual skills) and unknown (refusal rate).
Three protocols (protocols.py): `testbed`, the default; `mllmu`, MLLMU-Bench's own evaluation script; and
`paper`, the MLLMEraser authors' script. The last two report retain and real whole (they have no validation
people) and ask and read answers their own ways.
"""

from __future__ import annotations

import re
import sys
from collections import defaultdict
from pathlib import Path
from typing import Iterable, Sequence

from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu
from rouge_score import rouge_scorer

import torch

from ..core import fitting
from ..core.eraser import Eraser
from .items import QAItem
from ..core.models import answer_items
from ..errors import UserInputError
from . import data, prompts, protocols
from .data import REPORT_SPLITS, VALIDATION_SPLIT

_SCORER = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
_SMOOTHING = SmoothingFunction().method1


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
        rouge = _SCORER.score(item.answer, answer)
        for name in ("rouge1", "rouge2", "rougeL"):
            scores[f"{name}_{suffix}"] = rouge[name].fmeasure
        reference, hypothesis = item.answer.split(), answer.split()
        scores[f"bleu_{suffix}"] = sentence_bleu([reference], hypothesis, smoothing_function=_SMOOTHING) if hypothesis else 0.0
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
                desc: str = "answer") -> dict[str, float]:
    answers = answer_items(model, processor, items, batch_size, progress, desc)
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
            print(f"mllmeraser: warning: no {directory} split in {data_dir}; the {split} split is skipped "
                  f"(only the offline testbed has it)", file=sys.stderr)
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
          progress: bool = True) -> dict[str, dict[str, float]]:
    """{split: metrics} of `prepare`d questions."""
    if protocols.check_protocol(protocol) == "testbed":
        return {split: score_items(model, processor, split_items, batch_size, progress, desc=f"eval {split}")
                for split, split_items in questions.items()}
    results = {}
    for split, prompted in questions.items():
        answers = protocols.answer_prompts(model, processor, prompted, batch_size, progress, desc=f"eval {split}",
                                           protocol=protocol)
        results[split] = aggregate(RAW_SCORERS[protocol](q.item, answer) for q, answer in zip(prompted, answers))
    return results


def evaluate(model, processor, data_dir: str | Path, forget_ratio: int = 10, splits: Sequence[str] = REPORT_SPLITS,
             batch_size: int = 64, progress: bool = True, items: dict[str, list[QAItem]] | None = None,
             protocol: str = "testbed") -> dict[str, dict[str, float]]:
    items = items if items is not None else report_items(data_dir, forget_ratio, splits, protocol)
    return score(model, processor, prepare(data_dir, forget_ratio, items, protocol), protocol, batch_size, progress)


def gate_scores(model, processor, eraser: Eraser, items: dict[str, list[QAItem]],
                batch_size: int = 64) -> dict[str, torch.Tensor]:
    """What the eraser's gate reads on each split's questions, {split: [N, K]} (see fitting.gate_scores)."""
    return {split: fitting.gate_scores(model, processor, eraser, split_items, batch_size)
            for split, split_items in items.items()}


def fire_rate(scores: torch.Tensor, eraser: Eraser) -> float:
    """The fraction of prompts on which at least one of the eraser's prompt gates fires (scores [N, K])."""
    return float((scores > torch.tensor(eraser.prompt_gate.threshold)).any(dim=1).double().mean())


HEADLINE = ("classification_image", "classification_text", "cloze_image", "cloze_text", "rougeL_image",
            "rougeL_text", "refusal_rate")


def format_table(results: dict[str, dict[str, float]], columns: Sequence[str] = HEADLINE) -> str:
    """A fixed-width table of one result set: a row per split, a column per headline metric (and the gate's
    fire rate where the results have it)."""
    if any("gate_fire_rate" in metrics for metrics in results.values()):
        columns = (*columns, "gate_fire_rate")
    width = max(len(c) for c in columns)
    header = "split".ljust(10) + "".join(c.rjust(width + 1) for c in columns)
    rows = [header, "-" * len(header)]
    for split, metrics in results.items():
        cells = "".join((f"{metrics[c]:.3f}" if c in metrics else "-").rjust(width + 1) for c in columns)
        rows.append(split.ljust(10) + cells)
    return "\n".join(rows)
