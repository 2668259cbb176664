"""The two evaluation protocols: how each question is put to the model and how its answer is read.

- `testbed` (the default): every question through the checkpoint's own chat template with MLLMU-Bench's
  instruction (`prompts.py`), no few-shot examples, every Test_Set image, answers capped per task
  (`items.MAX_NEW_TOKENS`), the first letter or digit of a classification answer.
- `mllmu`: MLLMU-Bench's own evaluation script (its repository's `eval.py`), as docs/mllmu_protocol.md
  sets out line by line: its raw LLaVA-1.5 prompt strings, its few-shot examples for classification and cloze
  (whole profiles drawn from the evaluated split, taken from Full_Set and left out of the scoring), one
  Test_Set image per subject and task, 50 new tokens for every task, and its reading of the answer.
- `paper`: the MLLMEraser authors' evaluation script (`MLLMU_eval_steering.py` in their release), as
  docs/paper_protocol.md sets out: zero-shot, its own raw LLaVA-1.5 strings (which differ from eval.py's in
  three places), one seeded Test_Set image per subject and task, 50 new tokens, the letter read after dropping
  every character that is not a letter or digit, cloze by containment, generation by ROUGE and BLEU.

The raw LLaVA-1.5 strings go verbatim to a model whose chat template is LLaVA-1.5's; any other model (a ChatML
one such as the SmolLM2 testbed, Qwen-VL) gets the same words as one user turn of its own template.

This module builds the `mllmu` and `paper` questions and answers them; `evaluate.py` scores every protocol.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from tqdm import tqdm

from ..core import models
from ..core.inputs import EncodedImage
from ..errors import UserInputError
from . import data, prompts
from .items import QAItem

PROTOCOLS = ("testbed", "mllmu", "paper")

MLLMU_MAX_NEW_TOKENS = 50  # eval.py's LLaVA branch: every task (its Idefics2 branch gives text classification 5)
MLLMU_FEW_SHOT_PEOPLE = {"classification": 1, "cloze": 2}  # random.sample(id_list, k) in the LLaVA branch
# The evaluation modes whose prompts carry the few-shot examples, as eval.py names them per function.
MLLMU_FEW_SHOT_MODES = {"classification": ("forget", "retain_shared", "test"),
                        "cloze": ("forget", "retain_shared", "test", "retain_celebrity")}
MLLMU_TASK_ORDER = ("cloze", "classification", "generation")  # the order main() calls them in, per split
# Report split -> eval.py's mode name; the validation people are read from retain and real in their modes.
MLLMU_MODES = {"forget": "forget", "test": "test", "retain": "retain_shared", "real": "retain_celebrity",
               "general": "general", "unknown": "unknown"}
PAPER_TASK_ORDER = ("classification", "generation", "cloze")  # MLLMU_eval_steering.py's main(), per eval_list


def check_protocol(protocol: str) -> str:
    if protocol not in PROTOCOLS:
        raise UserInputError(None, f"unknown protocol {protocol!r}; expected one of {PROTOCOLS}")
    return protocol


@dataclass(frozen=True)
class Prompted:
    """One question as the mllmu protocol asks it: `text` is the raw prompt with one `<image>` per entry of
    `images` (the few-shot examples' images, then the question's own); `item` is what the answer is scored
    against (task, modality, answer, options) and whose subject it is."""

    item: QAItem
    text: str
    images: tuple = field(default=(), repr=False)  # PIL images or EncodedImages, decoded when the batch is built


# ---- prompt strings ----------------------------------------------------------------------------------------

def classification_shot(question: str, options: dict[str, str], answer: str, with_image: bool) -> str:
    """One few-shot classification example (evaluate_classification's loop over the few-shot prompts): all four
    options by letter, then the stored correct answer."""
    head = "USER: <image>\n" if with_image else "USER:\n"
    lines = [f"Question: {question}"] + [f"{letter}: {options.get(letter)}" for letter in prompts.OPTION_LETTERS]
    return head + "\n".join(lines + [f"Correct Answer: {answer}"]) + "\n"


def classification_text(question: str, options: dict[str, str], with_image: bool, shots: str = "") -> str:
    """evaluate_classification's prompt: the options as `letter: value` lines, then the instruction."""
    head = "USER: <image>\n" if with_image else "USER:\n"
    return f"{shots}{head}{prompts.classification_prompt(question, options)}\nASSISTANT:"


def cloze_question(question: str) -> str:
    """evaluate_fill_in_the_blank's question: `__` becomes `[Blank]`, then its (bold-marked) instruction."""
    return f"{question.replace('__', '[Blank]')}\n{prompts.MLLMU_CLOZE_SUFFIX}"


def cloze_shot(question: str, answer: str, with_image: bool) -> str:
    head = "USER:<image>\n" if with_image else "USER:\n"  # no space before <image> in its few-shot blocks
    return f"{head}{cloze_question(question)}\nCorrect Answer: {answer}\n"


def cloze_text(question: str, with_image: bool, shots: str = "") -> str:
    head = "USER: <image>\n" if with_image else "USER:\n"
    return f"{shots}{head}{cloze_question(question)}\nASSISTANT:"


def generation_text(question: str, with_image: bool) -> str:
    """evaluate_generation's prompts: the image one says "accurately" and ends in a space, the text one not."""
    if with_image:
        return f"USER: <image>\n{question}\n{prompts.MLLMU_GENERATION_SUFFIX_IMAGE}\nASSISTANT: "
    return f"USER: {question}\n{prompts.GENERATION_SUFFIX}\nASSISTANT:"


def paper_cloze_text(question: str, with_image: bool) -> str:
    """MLLMU_eval_steering.py's cloze prompt: zero-shot; its text prompt is `USER: q` (eval.py: `USER:\nq`)."""
    head = "USER: <image>\n" if with_image else "USER: "
    return f"{head}{cloze_question(question)}\nASSISTANT:"


def paper_generation_text(question: str, with_image: bool) -> str:
    """MLLMU_eval_steering.py's generation prompt: one instruction for both modalities (eval.py's image prompt
    adds "accurately" and a trailing space)."""
    head = "USER: <image>\n" if with_image else "USER: "
    return f"{head}{question}\n{prompts.GENERATION_SUFFIX}\nASSISTANT:"


# ---- reading the answer ------------------------------------------------------------------------------------

def response(generated: str) -> str:
    """The answer as eval.py reads it: it decodes prompt and answer together and keeps what lies between the
    prompt's "ASSISTANT:" and the next one; from the answer tokens alone, what comes before any "ASSISTANT:"."""
    return generated.split("ASSISTANT:")[0].strip()


def answer_letter(answer: str, options: dict[str, str]) -> str | None:
    """evaluate_classification's letter, from an answer `response` has read: its first character, upper-cased,
    if that names an option; otherwise None (never right). "(B)" or "The answer is B" read as no letter."""
    return answer[0].upper() if answer and answer[0].upper() in options else None


def paper_letter(answer: str, options: dict[str, str], with_image: bool) -> str | None:
    """MLLMU_eval_steering.py's letter: every character that is not a letter or digit is dropped, then the first
    one, upper-cased; an image question's letter must name an option (else None), a text question's is taken as
    it is. "(B)" reads as B, "The answer is B" as T."""
    kept = re.sub(r"[^a-zA-Z0-9]", "", answer)
    if not kept:
        return None
    letter = kept[0].upper()
    return letter if letter in options or not with_image else None


# ---- the questions of a split ------------------------------------------------------------------------------

def few_shot_records(data_dir: str | Path, forget_ratio: int, ids: Sequence[str]) -> list[tuple[Path, dict]]:
    """(where, record) of `ids` in Full_Set (eval.py's --few_shot_data), or, where the data has no Full_Set (the
    testbed), in forget + retain, which hold the same profiles."""
    if not ids:
        return []
    has_full = data.split_shards(data_dir, data.FULL_SET) is not None
    sources = [data.FULL_SET] if has_full else [data.split_dir_name(s, forget_ratio) for s in ("forget", "retain")]
    return [(data.split_location(data_dir, source), record) for source in sources
            for record in data.read_split_records(data_dir, source, ids) or []]


def split_sources(split: str, forget_ratio: int) -> list[tuple[str, str]]:
    """(split directory, eval.py mode) pairs a report split is read from."""
    if split == data.VALIDATION_SPLIT:
        return [(data.split_dir_name(s, forget_ratio), MLLMU_MODES[s]) for s in data.VALIDATION_FRACTION]
    return [(data.split_dir_name(split, forget_ratio), MLLMU_MODES[split])]


def split_records(data_dir: str | Path, split: str, forget_ratio: int, subjects: set[str] | None
                  ) -> list[tuple[str, str, Path, list[dict]]]:
    """(split directory, eval.py mode, its location, the records of `subjects`) for each source of a report
    split; a source the data lacks is an error naming it."""
    out = []
    for split_dir, mode in split_sources(split, forget_ratio):
        records = data.read_split_records(data_dir, split_dir, subjects)
        if records is None:
            raise data.missing_split(data_dir, split_dir)
        out.append((split_dir, mode, data.split_location(data_dir, split_dir), records))
    return out


def draw_image(rng: random.Random, images: list[EncodedImage]) -> EncodedImage | None:
    """The image a question is asked with: a subject's only image, or (Test_Set) one of its several, drawn."""
    return rng.choice(images) if len(images) > 1 else (images[0] if images else None)


def mllmu_questions(data_dir: str | Path, split: str, forget_ratio: int = 10, subjects: set[str] | None = None,
                    seed: int = 0) -> list[Prompted]:
    """The questions eval.py asks on one report split, for the subjects in `subjects` (default: all of the
    split's), task by task: the few-shot people (classification 1, cloze 2) are drawn from the evaluated
    subjects by a `random.Random` seeded with (seed, split, task), their every question of that task is a
    few-shot example (in the modes eval.py gives them) and is left out of the scoring; a subject with several
    images (Test_Set) is asked with one of them, drawn per task."""
    out: list[Prompted] = []
    for split_dir, mode, path, records in split_records(data_dir, split, forget_ratio, subjects):
        pool = list(dict.fromkeys(str(record["ID"]) for record in records))  # the split's IDs, in order, once
        for task in MLLMU_TASK_ORDER:
            rng = random.Random(f"{seed}:{split}:{split_dir}:{task}")
            chosen = rng.sample(pool, min(MLLMU_FEW_SHOT_PEOPLE.get(task, 0), len(pool)))
            shots = few_shot_records(data_dir, forget_ratio, chosen)
            out += _task_questions(task, mode, records, shots, rng, path)
    return out


def _task_questions(task: str, mode: str, records: list[dict], shot_records: list[tuple[Path, dict]],
                    rng: random.Random, path: Path) -> list[Prompted]:
    shots = {"image": ("", []), "text": ("", [])}  # modality -> (few-shot text, its images)
    skipped = set()
    for shot_path, record in shot_records:
        (image,) = data.record_images(shot_path, record)[:1] or (None,)
        for q in data.record_questions(record):
            if q.task != task:
                continue
            skipped.add((str(record["ID"]), q.modality, q.index))
            text, images = shots[q.modality]
            with_image = q.modality == "image"
            block = (classification_shot(q.question, q.options, q.answer, with_image) if task == "classification"
                     else cloze_shot(q.question, q.answer, with_image))
            shots[q.modality] = (text + block, images + ([image] if with_image else []))
    use_shots = mode in MLLMU_FEW_SHOT_MODES.get(task, ())
    out = []
    for record in records:
        subject_id = str(record["ID"])
        images = data.record_images(path, record)
        image = draw_image(rng, images)
        for q in data.record_questions(record):
            if q.task != task or (subject_id, q.modality, q.index) in skipped:
                continue
            with_image = q.modality == "image"
            shot_text, shot_images = shots[q.modality] if use_shots else ("", [])
            if task == "classification":
                text = classification_text(q.question, q.options, with_image, shot_text)
            elif task == "cloze":
                text = cloze_text(q.question, with_image, shot_text)
            else:
                text = generation_text(q.question, with_image)
            answer = q.answer.strip()[:1].upper() if task == "classification" else q.answer
            item = QAItem(subject_id, task, q.modality, q.question, answer, q.options, image if with_image else None)
            out.append(Prompted(item, text, tuple(shot_images + [image]) if with_image else ()))
    return out


def paper_questions(data_dir: str | Path, split: str, forget_ratio: int = 10, subjects: set[str] | None = None,
                    seed: int = 0) -> list[Prompted]:
    """The questions MLLMU_eval_steering.py asks on one report split: every question of the subjects in
    `subjects` (default: all of the split's), zero-shot, task by task; a subject with several images (Test_Set)
    is asked with one of them, drawn per task by a `random.Random` seeded with (seed, split, task)."""
    out: list[Prompted] = []
    for split_dir, _, path, records in split_records(data_dir, split, forget_ratio, subjects):
        for task in PAPER_TASK_ORDER:
            rng = random.Random(f"{seed}:paper:{split}:{split_dir}:{task}")
            for record in records:
                image = draw_image(rng, data.record_images(path, record))
                for q in data.record_questions(record):
                    if q.task == task:
                        out.append(_paper_prompted(str(record["ID"]), q, image))
    return out


def _paper_prompted(subject_id: str, q: data.RecordQuestion, image) -> Prompted:
    with_image = q.modality == "image"
    if q.task == "classification":
        text = classification_text(q.question, q.options, with_image)  # the same string as eval.py's, no shots
    elif q.task == "cloze":
        text = paper_cloze_text(q.question, with_image)
    else:
        text = paper_generation_text(q.question, with_image)
    answer = q.answer.strip()[:1].upper() if q.task == "classification" else q.answer
    item = QAItem(subject_id, q.task, q.modality, q.question, answer, q.options, image if with_image else None)
    return Prompted(item, text, (image,) if with_image else ())


# ---- asking ------------------------------------------------------------------------------------------------

_TEMPLATE_PROBE = [{"role": "user", "content": [{"type": "text", "text": "?"}]}]


def is_llava15_template(processor) -> bool:
    """Whether the processor's chat template writes LLaVA-1.5's conversation ("USER: ... ASSISTANT:"), the
    format the raw prompt strings are written in; a processor without a template is taken as one (the raw
    strings are all such a model can be sent). A ChatML template (SmolLM2, Qwen-VL) is not."""
    if getattr(processor, "chat_template", None) is None:
        return True
    try:
        rendered = processor.apply_chat_template(_TEMPLATE_PROBE, add_generation_prompt=True)
    except Exception:  # a template that cannot render content parts: send the raw strings
        return True
    return rendered.lstrip().startswith("USER:") and rendered.rstrip().endswith("ASSISTANT:")


def raw_user_content(text: str, strip_parts: bool = False) -> list[dict]:
    """A raw prompt's one user turn as chat-template content: the leading "USER:" and the final "ASSISTANT:"
    dropped (the template writes its own), each `<image>` an image entry in place; with `strip_parts`, each
    text part stripped (the paper script's ChatML branch sends the bare question and instruction)."""
    body = text.removeprefix("USER:")
    body = body[: body.rindex("ASSISTANT:")] if "ASSISTANT:" in body else body
    content = []
    for index, part in enumerate(body.split("<image>")):
        part = part.strip() if strip_parts else part
        content += ([{"type": "image"}] if index else []) + ([{"type": "text", "text": part}] if part.strip() else [])
    return content


def chat_text(processor, model_type: str, text: str, protocol: str = "mllmu") -> str:
    """The raw prompt for this checkpoint. A LLaVA whose template is LLaVA-1.5's (what eval.py and the paper
    script drive) gets it verbatim; any other model gets the same words, images in place, as one user turn of
    its own chat template (neither script has a branch for it, bar the paper script's Qwen one, which this
    follows under `paper`: bare parts, and the rendered prompt stripped, so a ChatML prompt ends in
    "<|im_start|>assistant" without its newline)."""
    if model_type == "llava" and is_llava15_template(processor):
        return text
    paper = protocol == "paper"
    rendered = processor.apply_chat_template([{"role": "user", "content": raw_user_content(text, paper)}],
                                             add_generation_prompt=True)
    return rendered.strip() if paper else rendered


def prompt_batches(questions: Sequence[Prompted], batch_size: int) -> list[list[int]]:
    """Indices grouped by modality and task (models.batches), each batch holding at most `batch_size` images
    (the few-shot prompts carry several) and at least one question."""
    out = []
    for group in models.batches([q.item for q in questions], batch_size):
        current, images = [], 0
        for index in group:
            count = len(questions[index].images)
            if current and images + count > batch_size:
                out.append(current)
                current, images = [], 0
            current.append(index)
            images += count
        out.append(current)
    return out


@torch.no_grad()
def answer_prompts(model, processor, questions: Sequence[Prompted], batch_size: int = 64, progress: bool = True,
                   desc: str = "answer", protocol: str = "mllmu") -> list[str]:
    """Greedy answers (MLLMU_MAX_NEW_TOKENS; the paper script's too) to the raw prompts, left-padded batches,
    decoded without the prompt; under `mllmu` read by `response`, under `paper` kept as decoded (the paper
    script decodes the new tokens alone and reads them as they are)."""
    answers = [""] * len(questions)
    model_type = model.config.model_type
    for indices in tqdm(prompt_batches(questions, batch_size), desc=desc, disable=not progress, unit="batch",
                        leave=False):
        chunk = [questions[i] for i in indices]
        texts = [chat_text(processor, model_type, q.text, protocol) for q in chunk]
        images = [image.decode() if isinstance(image, EncodedImage) else image for q in chunk for image in q.images]
        inputs = dict(processor(text=texts, images=images or None, padding=True, return_tensors="pt"))
        inputs = models.to_device(inputs, model)
        output = model.generate(**inputs, max_new_tokens=MLLMU_MAX_NEW_TOKENS, do_sample=False,
                                pad_token_id=processor.tokenizer.pad_token_id)
        decoded = processor.tokenizer.batch_decode(output[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        for index, text in zip(indices, decoded):
            answers[index] = text if protocol == "paper" else response(text)
    return answers
