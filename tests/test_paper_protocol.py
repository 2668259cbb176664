"""The paper protocol against the MLLMEraser authors' MLLMU_eval_steering.py (strings written out by hand from it),
and both raw-string protocols on a model whose chat template is not LLaVA-1.5's (the testbed model with the
pretrained preset's ChatML template): its own template, while a LLaVA-1.5 template still gets the raw bytes."""

from __future__ import annotations

import copy

import pytest

from mllmeraser.bench import data, evaluate, protocols
from mllmeraser.bench.items import QAItem
from mllmeraser.testbed.pretrained import CHAT_TEMPLATE as CHATML_TEMPLATE

OPTIONS = {"A": "Lisbon", "B": "Oslo", "C": "Kyoto", "D": "Lima"}
CLOZE_INSTRUCTION = "Please **ONLY** provide the correct answer that should replace the [Blank]."
GENERATION_INSTRUCTION = "Answer the question based on your trained knowledge in one sentence in ENGLISH."


def test_paper_prompts_as_the_script_writes_them():
    assert protocols.paper_cloze_text("This person was born in __.", True) == (
        f"USER: <image>\nThis person was born in [Blank].\n{CLOZE_INSTRUCTION}\nASSISTANT:")
    assert protocols.paper_cloze_text("Ada was born in __.", False) == (  # eval.py: "USER:\n" instead
        f"USER: Ada was born in [Blank].\n{CLOZE_INSTRUCTION}\nASSISTANT:")
    assert protocols.paper_generation_text("Where was this person born?", True) == (  # no "accurately", no space
        f"USER: <image>\nWhere was this person born?\n{GENERATION_INSTRUCTION}\nASSISTANT:")
    assert protocols.paper_generation_text("Where was Ada born?", False) == (
        f"USER: Where was Ada born?\n{GENERATION_INSTRUCTION}\nASSISTANT:")


@pytest.mark.parametrize("generated, with_image, letter", [
    ("B", True, "B"), ("(B)", True, "B"), (" b. Oslo", True, "B"), ("**D**", True, "D"),
    ("The answer is B", True, None), ("The answer is B", False, "T"), ("E", True, None), ("E", False, "E"),
    ("", True, None), ("...", False, None),
])
def test_paper_letter_drops_every_non_alphanumeric_character_first(generated, with_image, letter):
    assert protocols.paper_letter(generated, OPTIONS, with_image) == letter


def test_paper_scores_differ_from_the_mllmu_rules_only_in_the_letter():
    item = QAItem("s", "classification", "image", "q", "B", OPTIONS)
    assert evaluate.paper_item_scores(item, "(B)") == {"classification_image": 1.0}
    assert evaluate.mllmu_item_scores(item, "(B)") == {"classification_image": 0.0}
    cloze = QAItem("s", "cloze", "text", "q", "Lima")
    assert evaluate.paper_item_scores(cloze, "She was born in LIMA.")["cloze_text"] == 1.0
    generation = QAItem("s", "generation", "image", "q", "This person was born in Lisbon.")
    scores = evaluate.paper_item_scores(generation, "This person was born in Porto.")
    assert scores["rougeL_image"] == pytest.approx(5 / 6) and 0.0 < scores["bleu_image"] < 1.0


@pytest.fixture(scope="module")
def items(testbed_data):
    return evaluate.report_items(testbed_data, 10, ("forget", "test", "real"), protocol="paper")


@pytest.fixture(scope="module")
def questions(testbed_data, items):
    return evaluate.prepare(testbed_data, 10, items, "paper", seed=0)


def test_paper_questions_are_zero_shot_and_every_question_is_scored(testbed_data, items, questions):
    records = data.read_records(testbed_data / "forget_10")
    asked = questions["forget"]
    assert len(asked) == sum(len(data.record_questions(r)) for r in records)  # nobody's questions left out
    assert all(q.text.count("USER:") == 1 and q.text.endswith("ASSISTANT:") for q in asked)
    assert all(q.text.count("<image>") == len(q.images) == (q.item.modality == "image") for q in asked)
    assert [q.item.task for q in asked][0] == "classification" and asked[-1].item.task == "cloze"  # main()'s order
    assert {q.item.subject_id for q in questions["real"]} == {i.subject_id for i in items["real"]}
    renderings = {str(r["ID"]): r["images"] for r in data.read_records(testbed_data / "Test_Set")}
    for task in ("classification", "cloze", "generation"):
        test = [q for q in questions["test"] if q.item.task == task and q.item.modality == "image"]
        for person in {q.item.subject_id for q in test}:
            assert len({id(q.images[0]) for q in test if q.item.subject_id == person}) == 1  # one image a task
            assert len(renderings[person]) == 2
    again = evaluate.prepare(testbed_data, 10, items, "paper", seed=0)["test"]
    assert [(q.text, q.item, q.images[0].data) for q in again if q.images] == \
        [(q.text, q.item, q.images[0].data) for q in questions["test"] if q.images]  # seeded


def chatml(processor):
    other = copy.deepcopy(processor)
    other.chat_template = CHATML_TEMPLATE
    return other


def test_raw_strings_go_verbatim_only_to_a_llava15_template(testbed_model, questions):
    _, processor = testbed_model
    assert protocols.is_llava15_template(processor) and not protocols.is_llava15_template(chatml(processor))
    raw = next(q.text for q in questions["forget"] if q.item.task == "cloze" and q.item.modality == "image")
    for protocol in ("mllmu", "paper"):
        assert protocols.chat_text(processor, "llava", raw, protocol) == raw  # byte-identical for LLaVA-1.5
    rendered = protocols.chat_text(chatml(processor), "llava", raw, "mllmu")
    assert rendered.startswith("<|im_start|>system\n") and "<|im_start|>user\n<image>\n" in rendered
    assert rendered.endswith("<|im_end|>\n<|im_start|>assistant\n") and "USER:" not in rendered
    assert "ASSISTANT:" not in rendered and CLOZE_INSTRUCTION in rendered
    paper = protocols.chat_text(chatml(processor), "llava", raw, "paper")  # as the script's Qwen branch
    assert paper.endswith("<|im_start|>assistant") and f"<image>\nThis person" in paper
    assert f"{CLOZE_INSTRUCTION}<|im_end|>" in paper  # the bare question and instruction, stripped


def test_both_raw_protocols_answer_through_a_chatml_template(testbed_model, testbed_data, questions):
    model, processor = testbed_model
    person = questions["real"][0].item.subject_id
    few = {"real": [q for q in questions["real"] if q.item.subject_id == person]}
    mllmu = evaluate.prepare(testbed_data, 10, {"real": [q.item for q in few["real"]]}, "mllmu")
    for protocol, prepared in (("paper", few), ("mllmu", mllmu)):
        llava = evaluate.score(model, processor, prepared, protocol, progress=False)["real"]
        other = evaluate.score(model, chatml(processor), prepared, protocol, progress=False)["real"]
        names = {"classification_image", "classification_text", "cloze_image", "cloze_text", "rougeL_image",
                 "rougeL_text", "bleu_text", "refusal_rate"}
        assert names <= set(llava) and names <= set(other)
        assert all(0.0 <= v <= 1.0 for v in list(llava.values()) + list(other.values()))
