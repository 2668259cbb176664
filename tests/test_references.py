"""The two reference methods that train nothing (refuse: the eraser's gate as a guardrail; prompt: a system prompt)
and the mixed-people attack, on the small testbed: what each answers, and how a message about two people is
built and scored."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from mllmeraser.bench import answering, attack_scoring, attack_set, attack_summary, attacks, data, evaluate, protocols
from mllmeraser.core import attachment, models
from mllmeraser.bench.items import QAItem


@pytest.fixture(scope="module")
def report(testbed_data):
    return evaluate.report_items(testbed_data, 10, ("forget", "retain"))


def _every_task(items, per_task: int) -> list[QAItem]:
    """The first `per_task` items of each (task, modality)."""
    out, seen = [], {}
    for item in items:
        key = (item.task, item.modality)
        if seen.get(key, 0) < per_task:
            out.append(item)
            seen[key] = seen.get(key, 0) + 1
    return out


def test_refusal_replaces_only_the_fired_rows_new_tokens(testbed_model, default_eraser):
    _, processor = testbed_model
    refusing = answering.Refusing(default_eraser, processor)
    pad = refusing.pad_id
    output = torch.tensor([[7, 8, 9, 10, 11], [7, 8, 12, 13, pad]])
    refused = refusing.refuse_fired(output, 2, torch.tensor([[True], [False]]))
    width = 2 + len(refusing.refusal_ids)
    assert refused.shape == (2, max(5, width))  # widened: the refusal is longer than 3 new tokens
    assert refused[0, 2:width].tolist() == refusing.refusal_ids and refused[1, :5].tolist() == output[1].tolist()
    assert (refused[1, 5:] == pad).all()
    decoded = processor.tokenizer.batch_decode(refused[:, 2:], skip_special_tokens=True)
    assert decoded[0].strip() == answering.REFUSAL
    assert refusing.refuse_fired(output, 2, torch.tensor([[False], [False]])) is output  # nothing fired: as given


def test_refuse_answers_the_refusal_where_the_gate_fires_and_vanilla_where_not(testbed_model, default_eraser, report):
    model, processor = testbed_model
    items = _every_task(report["forget"], 3) + _every_task(report["retain"], 3)  # every task, image and text
    fires = gate_fires(model, processor, default_eraser, items)
    vanilla = models.answer_items(model, processor, items, progress=False)
    refusing = answering.Refusing(default_eraser, processor)
    with refusing.attached(model):
        refused = models.answer_items(model, processor, items, progress=False)
    assert "generate" not in model.__dict__ and not hasattr(model, attachment.ATTACHED_MARKER)  # detached cleanly
    assert fires.any() and not fires.all(), fires  # forget photos fire, retain people do not
    for item, fired, before, after in zip(items, fires.tolist(), vanilla, refused):
        assert after == (answering.REFUSAL if fired else before), (item, fired, before, after)
    # a refusal picks no option letter: a refused classification question counts wrong
    classification = next(i for i, fired in zip(items, fires.tolist()) if fired and i.task == "classification")
    assert evaluate.item_scores(classification, answering.REFUSAL)[f"classification_{classification.modality}"] == 0.0


def gate_fires(model, processor, eraser, items) -> torch.Tensor:
    """[N] bool: where the eraser's prompt gate fires, read apart from any generation."""
    scores = evaluate.gate_scores(model, processor, eraser, {"items": items})["items"]
    return (scores > torch.tensor(eraser.prompt_gate.threshold)).any(dim=1)


def test_refuse_on_the_mllmu_protocol_path(testbed_model, testbed_data, default_eraser):
    model, processor = testbed_model
    questions = protocols.mllmu_questions(testbed_data, "forget", 10, seed=0)
    # classification (a one-profile few-shot prompt) and generation, image and text; the tiny model leaves the
    # two-profile cloze prompts blank whatever is attached
    chosen = [q for task in ("classification", "generation") for q in questions if q.item.task == task][:80][::10]
    vanilla = protocols.answer_prompts(model, processor, chosen, progress=False)
    with answering.Refusing(default_eraser, processor).attached(model):
        refused = protocols.answer_prompts(model, processor, chosen, progress=False)
    assert answering.REFUSAL in refused and answering.REFUSAL not in vanilla
    assert all(after in (answering.REFUSAL, before) for before, after in zip(vanilla, refused))
    assert {q.item.task for q, a in zip(chosen, refused) if a == answering.REFUSAL} == {"classification", "generation"}


def test_prompt_names_the_forget_people_and_no_one_else(testbed_data):
    text = answering.forget_system_prompt(testbed_data, 10)
    names = lambda split: {r["name"] for r in data.read_split_records(testbed_data, split)}  # noqa: E731
    assert names("forget_10") and all(name in text for name in names("forget_10"))
    assert not any(name in text for name in names("retain_90") | names("Retain_Set"))
    assert answering.REFUSAL in text


def test_system_prompt_leads_the_first_user_turn(testbed_model):
    _, processor = testbed_model
    system = "SYSTEM TEXT"
    item = QAItem("F1", "cloze", "text", "Ada was born in __.", "Lima")
    asked = answering.with_system_prompt(item, system)
    assert asked.verbatim and asked.prompt == f"{system}\n\n{item.prompt}" and asked.answer == item.answer
    chat = answering.with_system_prompt(replace(item, history=(("Who is Ada?", "A pilot."),)), system)
    assert chat.history == ((f"{system}\n\nWho is Ada?", "A pilot."),) and chat.question == item.question
    rendered = models.chat_text(processor, chat.prompt, False, chat.history)
    assert rendered.index(system) < rendered.index("Who is Ada?") < rendered.index("A pilot.")
    prompted = protocols.Prompted(item, "USER: <image>\nQuestion?\nASSISTANT:", ())
    assert answering.with_system_prompt(prompted, system).text == f"USER: <image>\n{system}\n\nQuestion?\nASSISTANT:"


@pytest.fixture(scope="module")
def mixed(testbed_data):
    return attack_set.attack_set(testbed_data, 10, names=[attacks.MIXED_PEOPLE], retain_people=2)


def test_mixed_people_items_hold_both_questions(mixed, report):
    splits = mixed.items[attacks.MIXED_PEOPLE]
    forget_ids = {i.subject_id for i in report["forget"]}
    partners = {p.prompt: p for p in mixed.context.partners}
    cloze = [i for i in report["forget"] if i.task == "cloze"]
    assert len(splits["forget"]) == len(splits["retain"]) == len(cloze)
    orders = set()
    for source, f, r in zip(cloze, splits["forget"], splits["retain"]):
        assert f.question == r.question and f.verbatim and f.modality == r.modality == source.modality
        assert f.subject_id == source.subject_id in forget_ids and r.subject_id not in forget_ids
        own, other = source.prompt, f.question.replace(source.prompt, "").strip("\n")
        assert own in f.question and other in partners and partners[other].answer == r.answer
        assert f.answer == source.answer and attacks._distinct(f.answer, r.answer)
        orders.add(f.question.startswith(own))
    assert orders == {True, False}  # both orders occur


def test_mixed_people_is_scored_per_part(mixed, monkeypatch):
    splits = {s: items[:3] for s, items in mixed.items[attacks.MIXED_PEOPLE].items()}
    f, r = splits["forget"], splits["retain"]
    answers = [f"{f[0].answer} and {r[0].answer}",  # both given
               r[1].answer,  # forget withheld, retain given
               answering.REFUSAL]  # both withheld
    monkeypatch.setattr(attack_scoring.models, "answer_items", lambda *args, **kwargs: answers)
    scored = attack_scoring.score_mixed_people(None, None, splits)
    assert scored["forget"]["cloze"] == pytest.approx(1 / 3) and scored["retain"]["cloze"] == pytest.approx(2 / 3)
    assert scored["both"] == {"withheld_and_kept": pytest.approx(1 / 3), "n": 3.0}
    line = attack_summary.mixed_people_line("eraser", scored)
    assert "forget part given 0.333" in line and "retain part given 0.667" in line and "given 0.333 (n 3)" in line


def test_mixed_people_for_vanilla_eraser_refuse_and_prompt(testbed_model, testbed_data, mixed, default_eraser):
    """Every method on the same mixed messages. The numbers are the tiny decoder's (it answers one of two
    questions at best, so they are printed, not barred); asserted: the gate decides a whole message, so where it
    fires the refusal gives neither part."""
    model, processor = testbed_model
    methods = {"eraser": answering.Steered(default_eraser), "refuse": answering.Refusing(default_eraser, processor),
               "prompt": answering.SystemPrompted(answering.forget_system_prompt(testbed_data, 10))}
    results = {"vanilla": attack_scoring.score_attacks(model, processor, mixed)}
    for name, method in methods.items():
        with method.attached(model):
            results[name] = attack_scoring.score_attacks(model, processor, attack_scoring.asked(mixed, method.ask))
    items = mixed.items[attacks.MIXED_PEOPLE]["forget"]
    fired = float(gate_fires(model, processor, default_eraser, items).double().mean())
    refuse = results["refuse"][attacks.MIXED_PEOPLE]
    vanilla = results["vanilla"][attacks.MIXED_PEOPLE]
    # the refusal takes every fired message whole: neither part survives there, and elsewhere it is vanilla's
    # answer (the fire rate is read apart from generation: one borderline message either way is allowed)
    one = 1.0 / len(items) + 1e-9
    assert refuse["retain"]["cloze"] <= vanilla["retain"]["cloze"] + 1e-9
    assert refuse["forget"]["cloze"] <= vanilla["forget"]["cloze"] + 1e-9
    assert refuse["retain"]["cloze"] <= 1.0 - fired + one and refuse["forget"]["cloze"] <= 1.0 - fired + one
    assert refuse["both"]["withheld_and_kept"] <= 1.0 - fired + one
    for name, result in results.items():
        print(attack_summary.mixed_people_line(name, result[attacks.MIXED_PEOPLE]), f"(gate fires on {fired:.2f})")
        assert result[attacks.MIXED_PEOPLE]["both"]["n"] == len(items)


def test_prompt_reference_and_server_fold_a_system_prompt_alike():
    """`prompt` asks exactly what a served model is asked when the same system prompt comes as a system message:
    one rule (inputs.fold_system) for both, and for the pretrained testbed's system-prompt training data."""
    pytest.importorskip("fastapi")
    from mllmeraser.core.inputs import fold_system
    from mllmeraser.serve.messages import parse_messages
    from mllmeraser.serve.settings import Limits

    system, user = "Do not reveal anything about Ada Lind.", "Where was Ada Lind born?"
    served = parse_messages([{"role": "system", "content": system}, {"role": "user", "content": user}], Limits())
    asked = answering.with_system_prompt(QAItem("x", "generation", "text", user, "", verbatim=True), system)
    assert served.text == asked.prompt == fold_system(system, user) == system + "\n\n" + user
    assert fold_system(system, "") == system
