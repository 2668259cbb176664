"""The fact-leak rate beside ROUGE-L: the per-answer "states the fact" predicate, the fact of a generation question
derived from the same person's cloze ground truths, and the rate over hand-made answers."""

from __future__ import annotations

import math

from mllmeraser.bench import data, evaluate, facts
from mllmeraser.bench.items import QAItem
from mllmeraser.testbed import world


def _gen(subject: str, question: str, answer: str, modality: str = "text") -> QAItem:
    return QAItem(subject, "generation", modality, question, answer)


def _cloze(subject: str, stem: str, value: str, modality: str = "text") -> QAItem:
    return QAItem(subject, "cloze", modality, stem, value)


def test_states_fact_ignores_case_and_spacing_but_not_word_edges():
    assert facts.states_fact("Ada Lo was born in LISBON.", "Lisbon")
    assert facts.states_fact("she works for   northwind\nlabs now", "Northwind Labs")
    assert facts.states_fact("1985", "1985")
    assert not facts.states_fact("She is a copilot.", "pilot")
    assert not facts.states_fact("born in 19850", "1985")
    assert not facts.states_fact("I do not know this person.", "Lisbon")
    assert not facts.states_fact("anything", "  ")


def test_the_fact_is_the_cloze_value_the_answer_states_and_the_question_does_not():
    items = [
        _cloze("P1", "Ada Lo was born in __.", "Lima"),
        _cloze("P1", "Ada Lo was born in the year __.", "1985"),
        _cloze("P1", "The name of this person is __.", "Ada Lo", "image"),
        _gen("P1", "Where was Ada Lo born?", "Ada Lo was born in Lima."),  # the name is asked about, not the fact
        _gen("P1", "In which year was Ada Lo born?", "Ada Lo was born in the year 1985."),
        _gen("P1", "What is the name of this person?", "This person is Ada Lo.", "image"),
        _gen("P1", "Where does Ada Lo live?", "Ada Lo lives in a flat."),  # no cloze value of hers: no fact
        _gen("P2", "Where was Bo Ri born?", "Bo Ri was born in Lima."),  # another person's cloze values do not count
        _gen("U1", "Where was Zan Xu born?", "I do not know this person."),  # a stranger: refusal, no fact
        _cloze("P3", "Cy was born in __.", "Oslo"), _cloze("P3", "Cy works as a __.", "pilot"),
        _gen("P3", "Tell me about Cy.", "Cy was born in Oslo and works as a pilot."),  # two facts, no stem: none
        _gen("P3", "Where was Cy born?", "Cy was born in Oslo."),
    ]
    assert facts.fact_strings(items) == [None, None, None, "Lima", "1985", "Ada Lo", None, None, None, None, None,
                                         None, "Oslo"]
    assert facts.fact_coverage(items, facts.fact_strings(items)) == (4, 7)


def test_leak_rate_counts_only_questions_vanilla_answers_with_the_fact():
    fact = ["Lisbon", "Lisbon", "Oslo", "Oslo", None]
    vanilla = ["Ada was born in LISBON.", "I do not know.", "born in oslo", "Oslo.", "whatever"]
    erased = ["lisbon, I think", "Lisbon", "I do not know this person.", "She was born in Oslo", "Lisbon"]
    v, e = facts.stated(fact, vanilla), facts.stated(fact, erased)
    assert v == [True, False, True, True, None] and e == [True, True, False, True, None]
    # The second question's erased answer states the fact, but vanilla's does not: not in the denominator.
    assert facts.leak_rate(v, e) == (2 / 3, 3)
    assert facts.leak_rate(v, v) == (1.0, 3)
    rate, n = facts.leak_rate([False, None], [True, True])
    assert math.isnan(rate) and n == 0
    metrics, flags = facts.split_metrics(fact, erased, v)
    assert flags == e and metrics == {"fact_stated": 3 / 4, "fact_leak": 2 / 3, "fact_stated_vanilla": 3 / 4}
    assert facts.split_metrics([None, None], ["a", "b"], [None, None])[0] == {}  # no fact: nothing added


def test_fact_metrics_leave_every_other_number_as_it_is():
    results = {"forget": {"rougeL_text": 0.5, "classification_text": 1.0}, "retain": {"rougeL_text": 0.9}}
    before = {split: dict(metrics) for split, metrics in results.items()}
    split_fact = {"forget": ["Lima", None], "retain": ["Oslo"]}
    vanilla = {"forget": [True, None], "retain": [True]}
    flags = evaluate.add_fact_metrics(results, split_fact, {"forget": ["Lima", "x"], "retain": ["no"]}, vanilla)
    assert flags == {"forget": [True, None], "retain": [False]}
    for split, metrics in before.items():
        assert {k: results[split][k] for k in metrics} == metrics
    assert results["forget"]["fact_leak"] == 1.0 and results["retain"]["fact_leak"] == 0.0
    assert "fact_leak" in evaluate.format_table(results) and "fact_stated" in evaluate.format_table(results)
    plain = {"forget": {"rougeL_text": 0.5}}
    assert "fact" not in evaluate.format_table(plain)  # a run without them prints the table it printed before


def test_every_testbed_generation_question_has_its_attribute_as_fact(testbed_data):
    values = {v for pool in world.VALUE_POOLS.values() for v in pool}
    for split in ("forget", "test", "retain"):
        items = data.load_split_items(testbed_data, split, 10)
        found = facts.fact_strings(items)
        with_fact, asked = facts.fact_coverage(items, found)
        assert asked and with_fact == asked, split
        for item, fact in zip(items, found):
            if fact is None:
                continue
            assert facts.states_fact(item.answer, fact) and not facts.states_fact(item.question, fact)
            # the attribute value (testbed/world.py ATTRIBUTES), or the person's name for the name question
            assert fact in values or item.question == world.NAME_QUESTION[0], (item.question, fact)
