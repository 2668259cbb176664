"""CLEAR (arXiv 2410.18057, the Hub's `therem/CLEAR`): read its configs, and score a model the way its authors'
evaluation does (their repository `somvy/multimodal_unlearning`: `config/mm/eval.yaml` names the tasks,
`mm/eval.py` computes the losses and generations, `mm/calculate_metrics.py` the metrics). docs/clear_protocol.md
goes through it line by line and says where this differs.

Layout: one directory per config, each holding `train-NNNNN-of-NNNNN.parquet` shards (every shard is read, in
order: `data.split_shards`, which also reads the flat `data/<config>-NNNNN-of-NNNNN.parquet`). The configs:
`forget01|05|10` and `retain99|95|90` and `full` (image, caption, name); `forgetNN_perturbed` and
`retain_perturbed` (adding paraphrased_caption, perturbed_captions, perturbed_names); `real_faces` (image,
answer, options); `real_world` (image, question, answer, options); the `+tofu` configs (image rows with a
caption, and text rows with question and answer). A missing config, or one without its columns, is a one-line
`UserInputError` naming it.

The report splits and the CLEAR tasks behind them (eval.yaml's `eval_task` list):
- forget: `forgetNN_perturbed`, captions (eval_log_forget) and the person's name (eval_forget_facerec)
- retain: `retain_perturbed`, the same two (eval_log, eval_retain_facerec)
- real_faces: the name of a real person (eval_real_faces_wo_options)
- real_world: a question about a real-world photo (eval_real_world_wo_options)
Per task: ROUGE-L recall of the greedy answer, the answer's probability (plain for captions; normalised over
the wrong answers elsewhere) and the truth ratio (paraphrase against the wrong answers). `utility` is their
harmonic mean over the non-forget tasks (CLEAR's model utility, less chrF++).
"""

from __future__ import annotations

import functools
import math
import random
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

from tqdm import tqdm

from ..core import models
from ..errors import UserInputError
from . import data
from .clear_rows import CAPTION_QUESTIONS, NAME_QUESTION, read_items, row_image
from .items import QAItem

FORGET_RATIOS = (1, 5, 10)  # forget01, forget05, forget10
REPORT_SPLITS = ("forget", "retain", "real_faces", "real_world")
UTILITY_SPLIT = "utility"
RETAIN_PERTURBED = "retain_perturbed"
REAL_FACES = "real_faces"
REAL_WORLD = "real_world"
PERTURBED_SUFFIX = "_perturbed"
TOFU_SUFFIX = "+tofu"

# The columns each kind of config must have (the Hub's dataset card lists them per config).
PERSON_COLUMNS = ("image", "caption", "name")
PERTURBED_COLUMNS = PERSON_COLUMNS + ("paraphrased_caption", "perturbed_captions", "perturbed_names")
REAL_FACES_COLUMNS = ("image", "answer", "options")
REAL_WORLD_COLUMNS = ("image", "question", "answer", "options")
TOFU_COLUMNS = ("image", "caption", "question", "answer")

MAX_NEW_TOKENS = 300  # eval.yaml: generation.max_new_tokens
HEADLINE = ("rougeL_recall", "prob", "truth_ratio", "facerec_rougeL_recall", "facerec_prob", "facerec_truth_ratio",
            "model_utility")


@functools.cache
def _rouge_l():
    """ROUGE-L's scorer, built on first use: importing this module (the CLI's parser reads its constants) does not
    load rouge-score, which only scoring needs (the bench extra)."""
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def forget_config(forget_ratio: int) -> str:
    if forget_ratio not in FORGET_RATIOS:
        raise UserInputError(None, f"CLEAR has no forget{forget_ratio:02d} config: --forget-ratio must be one of "
                                   f"{FORGET_RATIOS} for CLEAR (forget01, forget05, forget10)")
    return f"forget{forget_ratio:02d}"


def retain_config(forget_ratio: int) -> str:
    forget_config(forget_ratio)
    return f"retain{100 - forget_ratio}"


# ---- reading -------------------------------------------------------------------------------------------------

CLEAR_MARKERS = (REAL_FACES, REAL_WORLD, RETAIN_PERTURBED) + tuple(
    f"{kind}{n}" for kind, numbers in (("forget", ("01", "05", "10")), ("retain", ("99", "95", "90")))
    for n in numbers)


def is_clear_layout(data_dir: str | Path) -> bool:
    """Whether `data_dir` holds CLEAR configs (any of its config names, as a directory or flat shards)."""
    root = Path(data_dir)
    flat = root / data.FLAT_LAYOUT_DIR
    return any((root / name).is_dir() or (flat.is_dir() and any(flat.glob(f"{name}-*.parquet")))
               for name in CLEAR_MARKERS)


def detect(data_dir: str | Path, benchmark: str = "auto") -> str:
    """Which benchmark `data_dir` holds, "clear" or "mllmu": `benchmark` where it names one, else CLEAR where the
    directory holds any of CLEAR's configs (the `--benchmark` option of eval, compare and attack)."""
    if benchmark != "auto":
        return benchmark
    return "clear" if is_clear_layout(data_dir) else "mllmu"


def refuse_protocol(protocol: str) -> None:
    """CLEAR is asked one way: `--protocol` (MLLMU-Bench's choice of evaluation) is an error on CLEAR data."""
    raise UserInputError(None, f"--protocol {protocol} is for MLLMU-Bench data; CLEAR is scored one way, its "
                               f"authors' (docs/clear_protocol.md)")


def config_shards(data_dir: str | Path, config: str) -> list[Path]:
    """A config's shards in order, or the one-line error naming the file a one-shard config would be."""
    shards = data.split_shards(data_dir, config)
    if shards is None:
        raise UserInputError(data.split_location(data_dir, config) / data.PARQUET_NAME,
                             f"no such parquet file: the CLEAR config {config!r} is missing")
    return shards


def config_items(data_dir: str | Path, config: str) -> list[QAItem]:
    """A person config's rows as the questions a fit reads (clear_rows.read_items), every shard in order; the
    config is checked for its columns first (one line naming the file)."""
    read_config(data_dir, config, PERSON_COLUMNS)
    return [item for shard in config_shards(data_dir, config) for item in read_items(shard)]


def forget_names(data_dir: str | Path, forget_ratio: int) -> list[str]:
    """The people of the request's forget config, in row order (the `prompt` reference method names them)."""
    rows = read_config(data_dir, forget_config(forget_ratio), ("name",))
    return list(dict.fromkeys(_text(shard, number, row, "name") for shard, number, row in rows))


def read_config(data_dir: str | Path, config: str, columns: Sequence[str]) -> list[tuple[Path, int, dict]]:
    """(shard, row number, row) of every row of a config, every shard in order, checked for `columns`."""
    shards = config_shards(data_dir, config)
    rows = []
    for shard in shards:
        table = data.read_table(shard)
        missing = [column for column in columns if column not in table.column_names]
        if missing:
            raise UserInputError(shard, f"not a CLEAR {config} config: missing column {missing[0]!r} "
                                        f"(has {', '.join(table.column_names)})")
        rows += [(shard, number, row) for number, row in enumerate(table.to_pylist())]
    if not rows:
        raise UserInputError(data.split_location(data_dir, config), f"the CLEAR config {config!r} has no rows")
    return rows


def _text(shard: Path, number: int, row: dict, column: str) -> str:
    value = row.get(column)
    if not isinstance(value, str) or not value.strip():
        raise UserInputError(shard, f"row {number}: empty {column!r}")
    return value


def _wrong(row: dict, column: str, right: str) -> tuple[str, ...]:
    """The wrong answers of a row: its list column, less the right answer where the list holds it (real_faces'
    and real_world's `options` may be a multiple-choice list that includes it)."""
    return tuple(str(option) for option in row.get(column) or () if option is not None and str(option) != right)


# ---- the questions of each report split ------------------------------------------------------------------------

@dataclass(frozen=True)
class ClearQuestion:
    """One row as CLEAR asks it: `item` (verbatim question, image, and the answer generation and probability
    are scored against), `paraphrase` (the answer whose likelihood the truth ratio sets against the wrong
    ones: CLEAR's base_answer_key) and `perturbed` (the wrong answers: perturbed_answer_key)."""

    item: QAItem
    paraphrase: str
    perturbed: tuple[str, ...]


@dataclass(frozen=True)
class ClearTask:
    """One of CLEAR's evaluation tasks: `name` as eval.yaml calls it, `prefix` of its metric names in the report,
    `normalised`: its probability is normalised over the wrong answers (every task but the caption ones),
    `forget`: its truth ratio is read as min(R, 1/R) (the forget split's tasks) rather than max(0, 1 - 1/R)."""

    name: str
    prefix: str
    normalised: bool
    forget: bool
    questions: tuple[ClearQuestion, ...]


def _question(shard: Path, number: int, row: dict, question: str, answer: str, paraphrase: str,
              perturbed: tuple[str, ...], subject: str) -> ClearQuestion:
    image = row_image(shard, number, row)
    if image is None:
        raise UserInputError(shard, f"row {number}: no image")
    item = QAItem(subject, "generation", "image", question, answer, image=image, verbatim=True)
    return ClearQuestion(item, paraphrase, perturbed)


def person_tasks(data_dir: str | Path, config: str, forget: bool, seed: int) -> list[ClearTask]:
    """Captions and face recognition on a perturbed person config (forgetNN_perturbed, retain_perturbed)."""
    rng = random.Random(f"{seed}:{config}")  # CLEAR draws a caption question per row, unseeded
    captions, faces = [], []
    for shard, number, row in read_config(data_dir, config, PERTURBED_COLUMNS):
        name = _text(shard, number, row, "name")
        caption = _text(shard, number, row, "caption")
        captions.append(_question(shard, number, row, rng.choice(CAPTION_QUESTIONS), caption,
                                  _text(shard, number, row, "paraphrased_caption"),
                                  _wrong(row, "perturbed_captions", caption), name))
        faces.append(_question(shard, number, row, NAME_QUESTION, name, name, _wrong(row, "perturbed_names", name),
                               name))
    suffix = "_forget" if forget else ""
    return [ClearTask(f"eval_log{suffix}", "", False, forget, tuple(captions)),
            ClearTask(f"eval_{'forget' if forget else 'retain'}_facerec", "facerec_", True, forget, tuple(faces))]


def real_tasks(data_dir: str | Path, config: str) -> list[ClearTask]:
    """real_faces (the person's name) or real_world (the row's question), answered against its options."""
    faces = config == REAL_FACES
    questions = []
    for shard, number, row in read_config(data_dir, config, REAL_FACES_COLUMNS if faces else REAL_WORLD_COLUMNS):
        answer = _text(shard, number, row, "answer")
        question = NAME_QUESTION if faces else _text(shard, number, row, "question")
        questions.append(_question(shard, number, row, question, answer, answer, _wrong(row, "options", answer),
                                   f"{config}-{number}"))
    return [ClearTask(f"eval_{config}_wo_options", "", True, False, tuple(questions))]


def report_tasks(data_dir: str | Path, forget_ratio: int = 10, splits: Sequence[str] = REPORT_SPLITS,
                 seed: int = 0) -> dict[str, list[ClearTask]]:
    """The tasks of each report split, every config read and checked (before any model is loaded)."""
    unknown = [split for split in splits if split not in REPORT_SPLITS]
    if unknown:
        raise UserInputError(None, f"unknown CLEAR split {unknown[0]!r}; expected some of {REPORT_SPLITS}")
    out: dict[str, list[ClearTask]] = {}
    for split in splits:
        if split == "forget":
            out[split] = person_tasks(data_dir, forget_config(forget_ratio) + PERTURBED_SUFFIX, True, seed)
        elif split == "retain":
            out[split] = person_tasks(data_dir, RETAIN_PERTURBED, False, seed)
        else:
            out[split] = real_tasks(data_dir, split)
    return out


# ---- metrics (calculate_metrics.py), on answers and NLLs ---------------------------------------------------------

def rouge_l_recall(reference: str, answer: str) -> float:
    """CLEAR's "ROUGE": the ROUGE-L recall of the answer against the reference (stemmed)."""
    return _rouge_l().score(reference, answer)["rougeL"].recall


def probability(answer_nll: Sequence[float], wrong_nll: Sequence[Sequence[float]] | None) -> float:
    """CLEAR's "Prob.": the mean over rows of p = exp(-mean token NLL) of the right answer; normalised as
    p / (p + sum of the wrong answers' p) where `wrong_nll` is given (every task but the caption ones)."""
    values = []
    for index, nll in enumerate(answer_nll):
        right = math.exp(-nll)
        if wrong_nll is None:
            values.append(right)
        else:
            values.append(right / (right + sum(math.exp(-w) for w in wrong_nll[index])))
    return sum(values) / len(values)


def truth_ratio(paraphrase_nll: Sequence[float], wrong_nll: Sequence[Sequence[float]], forget: bool) -> float | None:
    """CLEAR's "Truth Ratio": R_i = exp(mean wrong NLL - paraphrase NLL_i), where the wrong answers' mean is
    taken over every row and wrong answer of the task at once (calculate_metrics.py averages the whole array);
    reported as mean(min(R, 1/R)) on forget tasks, mean(max(0, 1 - 1/R)) elsewhere. None without wrong answers."""
    flat = [value for row in wrong_nll for value in row]
    if not flat:
        return None
    wrong_mean = sum(flat) / len(flat)
    ratios = [math.exp(wrong_mean - nll) for nll in paraphrase_nll]
    values = [min(r, 1 / r) for r in ratios] if forget else [max(0.0, 1 - 1 / r) for r in ratios]
    return sum(values) / len(values)


def harmonic_mean(values: Sequence[float]) -> float:
    """CLEAR's model utility combines its retained metrics by their harmonic mean (0 where any is 0)."""
    return 0.0 if any(v <= 0 for v in values) else len(values) / sum(1 / v for v in values)


def task_metrics(task: ClearTask, answers: Sequence[str], answer_nll: Sequence[float],
                 paraphrase_nll: Sequence[float], wrong_nll: Sequence[Sequence[float]]) -> dict[str, float]:
    """A task's three metrics, from its rows' answers and NLLs (in the task's row order)."""
    metrics = {
        f"{task.prefix}rougeL_recall": sum(rouge_l_recall(q.item.answer, a) for q, a in zip(task.questions, answers))
        / len(answers),
        f"{task.prefix}prob": probability(answer_nll, wrong_nll if task.normalised else None),
    }
    ratio = truth_ratio(paraphrase_nll, wrong_nll, task.forget)
    if ratio is not None:
        metrics[f"{task.prefix}truth_ratio"] = ratio
    return metrics


# ---- asking -----------------------------------------------------------------------------------------------------

def generate_answers(model, processor, items: Sequence[QAItem], batch_size: int, progress: bool,
                     desc: str) -> list[str]:
    """Greedy answers of up to MAX_NEW_TOKENS tokens, batched, in item order."""
    answers = [""] * len(items)
    for indices in tqdm(models.batches(items, batch_size), desc=desc, disable=not progress, unit="batch", leave=False):
        for index, answer in zip(indices, models.generate(model, processor, [items[i] for i in indices], MAX_NEW_TOKENS)):
            answers[index] = answer
    return answers


def score_task(model, processor, task: ClearTask, batch_size: int = 16, progress: bool = True) -> dict[str, float]:
    items = [q.item for q in task.questions]
    answers = generate_answers(model, processor, items, batch_size, progress, task.name)
    # Every likelihood the metrics read, in one pass: the answer, the paraphrase, then each wrong answer.
    scored = items + [replace(q.item, answer=q.paraphrase) for q in task.questions]
    scored += [replace(q.item, answer=wrong) for q in task.questions for wrong in q.perturbed]
    nll = models.answer_nlls(model, processor, scored, batch_size)
    count = len(items)
    wrong_nll, start = [], 2 * count
    for q in task.questions:
        wrong_nll.append(nll[start: start + len(q.perturbed)])
        start += len(q.perturbed)
    return task_metrics(task, answers, nll[:count], nll[count: 2 * count], wrong_nll)


def score(model, processor, tasks: dict[str, list[ClearTask]], batch_size: int = 16,
          progress: bool = True) -> dict[str, dict[str, float]]:
    """{split: metrics}, and `utility` (CLEAR's model utility, the harmonic mean of every non-forget metric)
    where retain, real_faces and real_world were all scored."""
    results = {split: {name: value for task in split_tasks
                       for name, value in score_task(model, processor, task, batch_size, progress).items()}
               for split, split_tasks in tasks.items()}
    kept = [split for split in REPORT_SPLITS if split != "forget"]
    if all(split in results for split in kept):
        results[UTILITY_SPLIT] = {"model_utility": harmonic_mean([v for s in kept for v in results[s].values()])}
    return results
