"""The adaptive attack (bench/adaptive.py) on the small testbed: the greedy search only ever lowers the gate's
margin, spends no more than its budget, keeps the question verbatim, and calls a prompt evading exactly when the
gate, read again on the attacked prompt, does not fire. Its pool shares no sentence with what the gate was fitted
or calibrated on, nor with the suite's padding attacks."""

from __future__ import annotations

import math

import pytest

from mllmeraser import cli
from mllmeraser.bench import adaptive, data
from mllmeraser.core import diagnostics

POOL = adaptive.POOL[::3]  # 8 sentences (everyday English and testbed words): 16 candidates a round, a fast test


@pytest.fixture(scope="module")
def prompts(testbed_data):
    items, _ = adaptive.forget_prompts(testbed_data, 10, count=4, tasks=("classification", "cloze"))
    return items


def _token_count(processor, text):
    return len(processor.tokenizer(text, add_special_tokens=False)["input_ids"])


def test_search_lowers_the_margin_within_its_budget_and_evasion_is_the_gate_not_firing(testbed_model, default_eraser,
                                                                                      prompts):
    model, processor = testbed_model
    budget = adaptive.Budget(evaluations=30, sentences=2, tokens=40)
    runs = adaptive.search(model, processor, default_eraser, prompts, budget, pool=POOL, batch_size=64)
    assert len(runs) == len(prompts) == 4
    threshold = default_eraser.prompt_gate.threshold
    rescored = diagnostics.gate_scores(model, processor, default_eraser, [r.attacked for r in runs])
    for run, scores in zip(runs, rescored):
        assert run.margins[0] > 0  # the default gate fires on every benchmark-formatted forget prompt
        assert all(b < a for a, b in zip(run.margins, run.margins[1:]))  # strictly lower at every kept round
        assert 1 <= run.evaluations <= budget.evaluations
        assert run.sentences == len(run.margins) - 1 <= budget.sentences
        assert set(run.prefix + run.suffix) <= set(POOL) and len(set(run.prefix + run.suffix)) == run.sentences
        attacked = run.attacked
        assert run.item.prompt in attacked.question and attacked.verbatim and attacked.task == run.item.task
        added = _token_count(processor, attacked.prompt) - _token_count(processor, run.item.prompt)
        assert added == run.tokens <= budget.tokens
        # the final margin is what the gate reads on the attacked prompt, scored again in another batch
        margin = max(float(s) - t for s, t in zip(scores, threshold))
        assert math.isclose(margin, run.margin, abs_tol=1e-4)
        fires = any(float(s) > t for s, t in zip(scores, threshold))
        if abs(run.margin) > 1e-4:
            assert run.evaded == (not fires) == (margin <= 0)
        if not run.evaded:  # it stopped for a reason: budget spent, or no sentence lowered the margin further
            assert run.done
    assert any(len(r.margins) > 1 for r in runs)  # the search moved at least one prompt


def test_the_budget_stops_the_search(testbed_model, default_eraser, prompts):
    model, processor = testbed_model
    for budget in (adaptive.Budget(evaluations=1), adaptive.Budget(sentences=0), adaptive.Budget(tokens=0)):
        runs = adaptive.search(model, processor, default_eraser, prompts[:2], budget, pool=POOL)
        assert all(r.evaluations == 1 and r.margins == r.margins[:1] and not r.prefix and not r.suffix for r in runs)
    # a budget smaller than a round: exactly that many candidates are scored, a seeded choice of them
    once = adaptive.search(model, processor, default_eraser, prompts[:2], adaptive.Budget(evaluations=6), pool=POOL)
    again = adaptive.search(model, processor, default_eraser, prompts[:2], adaptive.Budget(evaluations=6), pool=POOL)
    assert [r.evaluations for r in once] == [6, 6]
    assert [(r.prefix, r.suffix, r.margins) for r in once] == [(r.prefix, r.suffix, r.margins) for r in again]


def test_the_pool_is_new_text(testbed_data):
    texts = list(adaptive.SUITE_TEXTS)
    for items in (data.load_split_items(testbed_data, "forget", 10), data.retained_inputs(testbed_data, 10),
                  data.default_erasure_items(testbed_data), data.validation_items(testbed_data, 10)):
        texts += [t for item in items for t in (item.prompt, item.answer, *(item.options or {}).values())]
    texts += [str(r.get("biography") or "") for split in ("forget_10", "retain_90", "Retain_Set")
              for r in data.read_split_records(testbed_data, split) or []]
    adaptive.check_pool(adaptive.POOL, texts)
    assert len(set(adaptive.POOL)) == len(adaptive.POOL)
    with pytest.raises(ValueError, match="Green is a colour"):
        adaptive.check_pool(adaptive.POOL, ["so: GREEN  is a colour. indeed"])


def test_adaptive_needs_a_prompt_gated_eraser(capsys):
    assert cli.main(["attack", "--model", "no-model-is-loaded", "--data", "nowhere", "--adaptive"]) == 2
    assert "--adaptive needs --eraser" in capsys.readouterr().err
    with pytest.raises(Exception, match="evaluations budget"):
        adaptive.Budget(evaluations=0)
