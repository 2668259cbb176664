"""The mllmu protocol against MLLMU-Bench's own evaluation script (its repository's eval.py): the prompt strings,
the few-shot examples and which questions they take out of the scoring, one Test_Set image per subject and task,
how an answer is read and scored. The expected strings below were written out by hand from eval.py."""

from __future__ import annotations

import pytest

from mllmeraser.bench import data, evaluate, prompts, protocols
from mllmeraser.bench.protocols import Prompted
from mllmeraser.bench.items import QAItem
from mllmeraser.errors import UserInputError

OPTIONS = {"A": "Lisbon", "B": "Oslo", "C": "Kyoto", "D": "Lima"}


# ---- prompt strings (evaluate_classification, evaluate_fill_in_the_blank, evaluate_generation) --------------

def test_classification_prompts_as_eval_py_writes_them():
    shot = protocols.classification_shot("Where was this person born?", OPTIONS, "D", with_image=True)
    assert shot == ("USER: <image>\nQuestion: Where was this person born?\nA: Lisbon\nB: Oslo\nC: Kyoto\nD: Lima\n"
                    "Correct Answer: D\n")
    text_shot = protocols.classification_shot("Where was Ada born?", {"A": "x", "B": "y", "C": "z"}, "B", False)
    assert text_shot == "USER:\nQuestion: Where was Ada born?\nA: x\nB: y\nC: z\nD: None\nCorrect Answer: B\n"
    assert protocols.classification_text("Where was this person born?", OPTIONS, True, shot) == (
        shot + "USER: <image>\nWhere was this person born?\nA: Lisbon\nB: Oslo\nC: Kyoto\nD: Lima\n"
               "Just give ONE letter representing the answer directly.\nASSISTANT:")
    assert protocols.classification_text("Where was Ada born?", OPTIONS, False) == (
        "USER:\nWhere was Ada born?\nA: Lisbon\nB: Oslo\nC: Kyoto\nD: Lima\n"
        "Just give ONE letter representing the answer directly.\nASSISTANT:")


def test_cloze_prompts_as_eval_py_writes_them():
    instruction = "Please **ONLY** provide the correct answer that should replace the [Blank]."
    shot = protocols.cloze_shot("This person was born in __.", "Lima", with_image=True)
    assert shot == f"USER:<image>\nThis person was born in [Blank].\n{instruction}\nCorrect Answer: Lima\n"
    assert protocols.cloze_text("This person works as a __.", True, shot) == (
        shot + f"USER: <image>\nThis person works as a [Blank].\n{instruction}\nASSISTANT:")
    assert protocols.cloze_shot("Ada was born in __.", "Lima", False) == (
        f"USER:\nAda was born in [Blank].\n{instruction}\nCorrect Answer: Lima\n")
    assert protocols.cloze_text("Ada was born in __.", False) == f"USER:\nAda was born in [Blank].\n{instruction}\nASSISTANT:"


def test_generation_prompts_as_eval_py_writes_them():
    assert protocols.generation_text("Where was this person born?", True) == (
        "USER: <image>\nWhere was this person born?\nAnswer the question based on your trained knowledge in one "
        "sentence accurately in ENGLISH.\nASSISTANT: ")  # "accurately", and a trailing space: both as in eval.py
    assert protocols.generation_text("Where was Ada born?", False) == (
        "USER: Where was Ada born?\nAnswer the question based on your trained knowledge in one sentence in ENGLISH."
        "\nASSISTANT:")
    assert protocols.MLLMU_MAX_NEW_TOKENS == 50 and protocols.MLLMU_FEW_SHOT_PEOPLE == {"classification": 1, "cloze": 2}


# ---- reading and scoring answers --------------------------------------------------------------------------

@pytest.mark.parametrize("generated, letter", [
    ("B", "B"), ("b", "B"), (" B. Oslo", "B"), ("D: Lima", "D"), ("B\nASSISTANT: C", "B"),
    ("(B)", None), ("The answer is B", None), ("", None), ("E", None), ("1", None),
])
def test_answer_letter_is_the_first_character_if_it_names_an_option(generated, letter):
    assert protocols.answer_letter(protocols.response(generated), OPTIONS) == letter


def test_mllmu_scores_differ_from_the_testbed_rules_where_eval_py_does():
    item = QAItem("s", "classification", "image", "q", "B", OPTIONS)
    assert evaluate.mllmu_item_scores(item, "(B)") == {"classification_image": 0.0}
    assert evaluate.item_scores(item, "(B)")["classification_image"] == 1.0  # testbed: first letter or digit
    assert evaluate.mllmu_item_scores(item, "b, Oslo") == {"classification_image": 1.0}
    cloze = QAItem("s", "cloze", "text", "q", "Lima ")  # eval.py never strips the ground truth
    assert evaluate.mllmu_item_scores(cloze, "She was born in Lima.")["cloze_text"] == 0.0
    assert evaluate.item_scores(cloze, "She was born in Lima.")["cloze_text"] == 1.0
    assert evaluate.mllmu_item_scores(QAItem("s", "cloze", "text", "q", "Lima"), "LIMA")["cloze_text"] == 1.0
    generation = QAItem("s", "generation", "text", "q", "This person was born in Lisbon.")
    answer = "This person was born in Porto."
    assert evaluate.mllmu_item_scores(generation, answer) == evaluate.item_scores(generation, answer)
    assert evaluate.mllmu_item_scores(generation, answer)["rougeL_text"] == pytest.approx(5 / 6)


# ---- which questions, with which examples and images --------------------------------------------------------

@pytest.fixture(scope="module")
def forget_items(testbed_data):
    return evaluate.report_items(testbed_data, 10, ("forget", "test", "real"), protocol="mllmu")


@pytest.fixture(scope="module")
def questions(testbed_data, forget_items):
    return evaluate.prepare(testbed_data, 10, forget_items, "mllmu")


def by_task(prompted: list[Prompted], task: str, modality: str) -> list[Prompted]:
    return [q for q in prompted if q.item.task == task and q.item.modality == modality]


def test_few_shot_people_are_whole_profiles_left_out_of_the_scoring(testbed_data, forget_items, questions):
    forget = questions["forget"]
    people = {i.subject_id for i in forget_items["forget"]}
    records = {str(r["ID"]): r for r in data.read_records(testbed_data / "forget_10")}
    for task, shots in (("classification", 1), ("cloze", 2), ("generation", 0)):
        asked = {q.item.subject_id for q in forget if q.item.task == task}
        assert len(people - asked) == shots, task  # the few-shot people's questions of that task are not scored
        for modality in ("image", "text"):
            group = by_task(forget, task, modality)
            shown = people - asked
            examples = sum(1 for person in shown for q in data.record_questions(records[person])
                           if q.task == task and q.modality == modality)
            for q in group:
                assert q.text.count("USER:") == examples + 1 and q.text.endswith(("ASSISTANT:", "ASSISTANT: "))
                assert q.text.count("<image>") == len(q.images) == ((examples + 1) if modality == "image" else 0)
                for person in shown:  # every example of a few-shot person is in the prompt, with its answer
                    for example in data.record_questions(records[person]):
                        if example.task == task and example.modality == modality:
                            assert f"Correct Answer: {example.answer}\n" in q.text
    counts = {(t, m): len(by_task(forget, t, m)) for t in ("classification", "cloze", "generation") for m in ("image", "text")}
    per_person = {(q.task, q.modality): 0 for q in data.record_questions(next(iter(records.values())))}
    for q in data.record_questions(next(iter(records.values()))):
        per_person[(q.task, q.modality)] += 1
    n = len(people)
    assert counts == {(t, m): per_person[(t, m)] * (n - {"classification": 1, "cloze": 2}.get(t, 0))
                      for (t, m) in counts}


def test_real_people_get_no_examples_and_test_subjects_one_image_per_task(forget_items, questions, testbed_data):
    assert all(q.text.count("USER:") == 1 and len(q.images) <= 1 for q in questions["real"])  # not in Full_Set
    assert {q.item.subject_id for q in questions["real"]} == {i.subject_id for i in forget_items["real"]}
    renderings = {str(r["ID"]): len(r["images"]) for r in data.read_records(testbed_data / "Test_Set")}
    for task in ("classification", "cloze", "generation"):
        asked = by_task(questions["test"], task, "image")
        for person in {q.item.subject_id for q in asked}:
            own = {id(q.images[-1]) for q in asked if q.item.subject_id == person}
            assert len(own) == 1 and renderings[person] == 2  # one of the person's two renderings for the task
    again = evaluate.prepare(testbed_data, 10, forget_items, "mllmu")
    assert [(q.text, q.item) for q in again["test"]] == [(q.text, q.item) for q in questions["test"]]  # seeded


def test_full_set_supplies_the_examples_where_present(testbed_data, forget_items, tmp_path):
    for split_dir in ("forget_10", "retain_90", "Test_Set", "Retain_Set"):
        (tmp_path / split_dir).symlink_to(testbed_data / split_dir)
    (tmp_path / data.FULL_SET).symlink_to(testbed_data / "retain_90")  # a Full_Set without the forget people
    prepared = evaluate.prepare(tmp_path, 10, {"forget": forget_items["forget"]}, "mllmu")["forget"]
    assert all(q.text.count("USER:") == 1 for q in prepared)  # examples drawn, none found in Full_Set: none shown
    # ... and, as in eval.py, only questions shown as examples are left out: here none
    assert {q.item.subject_id for q in by_task(prepared, "cloze", "text")} == {i.subject_id for i in forget_items["forget"]}


def test_raw_prompts_for_other_families_go_through_their_chat_template(testbed_model, questions):
    _, processor = testbed_model
    raw = by_task(questions["forget"], "cloze", "image")[0].text
    assert protocols.chat_text(processor, "llava", raw) == raw  # what eval.py sends a LLaVA
    other = protocols.chat_text(processor, "qwen2_vl", raw)  # the testbed's (LLaVA-1.5) template stands in
    assert other.count("<image>") == raw.count("<image>") and other.count("ASSISTANT:") == 1
    assert prompts.MLLMU_CLOZE_SUFFIX in other and other.endswith("ASSISTANT:")


def test_batches_bound_images_and_batched_answers_equal_single_ones(testbed_model, questions):
    model, processor = testbed_model
    chosen = by_task(questions["forget"], "cloze", "image")[:2] + by_task(questions["real"], "cloze", "image")[:2]
    assert sorted(len(q.images) for q in chosen) == [1, 1, 11, 11]
    assert protocols.prompt_batches(chosen, 12) == [[0], [1, 2], [3]]  # at most 12 images, at least one question
    batched = protocols.answer_prompts(model, processor, chosen, batch_size=64, progress=False)
    single = [protocols.answer_prompts(model, processor, [q], batch_size=1, progress=False)[0] for q in chosen]
    assert batched == single and all(isinstance(a, str) for a in batched)


def test_evaluate_under_mllmu_reports_the_testbed_metric_names(testbed_model, testbed_data, forget_items, questions):
    model, processor = testbed_model
    few = {"real": [q for q in questions["real"] if q.item.subject_id == questions["real"][0].item.subject_id]}
    results = evaluate.score(model, processor, few, "mllmu", progress=False)["real"]
    assert {"classification_image", "classification_text", "cloze_image", "cloze_text", "rougeL_image",
            "rougeL_text", "bleu_image", "refusal_rate"} <= set(results)
    assert all(0.0 <= v <= 1.0 for v in results.values())
    with pytest.raises(UserInputError, match="unknown protocol"):
        evaluate.report_items(testbed_data, 10, ("forget",), protocol="official")


def test_mllmu_reports_retain_and_real_whole(testbed_data):
    whole = evaluate.report_items(testbed_data, 10, ("retain", "real"), protocol="mllmu")
    held = evaluate.report_items(testbed_data, 10, ("retain", "real"))
    for split in ("retain", "real"):
        assert whole[split] == data.load_split_items(testbed_data, split, 10)
        assert held[split] == data.validation_split(whole[split], split)[0] != whole[split]
