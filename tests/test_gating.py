"""The prompt gate: its equations (pooling, knn ratio, ridge, calibration, AUROC, composition) on random data,
and its hooks on a tiny random-weight LLaVA (one decision per prompt, steering from the decision layer on,
any padding side, detach restores the model bit for bit)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from mllmeraser.core import gating
from mllmeraser.core.eraser import Eraser
from mllmeraser.core.capture import capture
from mllmeraser.core.decoder_layers import find_decoder_layers
from mllmeraser.core.prompt_steering import attach_prompt_steering

from test_hooks import PROMPT_A, PROMPT_B, greedy, left_padded_batch, logits, tiny_llava


def features(n: int, d: int = 16, seed: int = 0, shift: float = 0.0) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed)) + shift


# ---- equations ------------------------------------------------------------------------------------------------

def test_pool_reads_only_the_real_positions_on_either_padding_side():
    hidden = torch.randn(2, 5, 4)
    left = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    right = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    assert torch.allclose(gating.pool(hidden, left, "mean")[0], hidden[0, 2:].mean(0))
    assert torch.allclose(gating.pool(hidden, right, "mean")[0], hidden[0, :3].mean(0))
    assert torch.equal(gating.pool(hidden, left, "last")[0], hidden[0, 4])
    assert torch.equal(gating.pool(hidden, right, "last")[0], hidden[0, 2])
    assert torch.equal(gating.pool(hidden, None, "last"), hidden[:, -1])
    assert torch.allclose(gating.pool(hidden, None, "mean"), hidden.mean(1))


def test_knn_score_is_the_log_distance_ratio_to_the_nearest_forget_and_retain_prompts():
    forget, retain, queries = features(6, seed=1), features(9, seed=2), features(5, seed=3)
    gate = gating.fit_knn(forget, retain, "mean", 1, neighbours=2)
    unit = lambda x: x / x.norm(dim=1, keepdim=True)
    bank_f = unit(forget).half().float()  # the banks are stored in float16
    bank_r = unit(retain).half().float()
    top_f = (unit(queries) @ bank_f.T).topk(2, dim=1).values.mean(1)
    top_r = (unit(queries) @ bank_r.T).topk(2, dim=1).values.mean(1)
    eps = gating.DISTANCE_FLOOR
    expected = torch.log(1 - top_r + eps) - torch.log(1 - top_f + eps)
    assert torch.allclose(gate.scores(queries)[:, 0], expected, atol=1e-5)
    # a fitted forget prompt is its own nearest neighbour: it scores far above a retained one
    assert gate.scores(forget)[:, 0].min() > gate.scores(retain)[:, 0].max()


def test_window_segments_are_the_means_of_half_overlapping_windows_of_the_real_positions():
    hidden = torch.randn(2, 9, 3, generator=torch.Generator().manual_seed(5))
    left = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1, 1], [0] * 6 + [1] * 3])
    z = gating.pool(hidden, left, "windows:4")  # stride 2: row 0 (7 real) [0, 4) [2, 6) [4, 7); row 1 one window
    real = hidden[0, 2:]
    expected = torch.stack([real[0:4].mean(0), real[2:6].mean(0), real[4:7].mean(0)])
    assert z.shape == (2, 3, 3)
    torch.testing.assert_close(z[0], expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(z[1, 0], hidden[1, 6:].mean(0), rtol=0, atol=1e-6)
    assert not z[1, 1:].any()  # absent segments are all-zero rows
    # right padding: the same real positions give the same segments
    right = torch.zeros_like(hidden)
    right[0, :7] = real
    mask = torch.tensor([[1] * 7 + [0, 0]])
    torch.testing.assert_close(gating.pool(right[:1], mask, "windows:4")[0], expected, rtol=0, atol=1e-6)
    assert gating.window_counts(torch.tensor([1, 4, 5, 6, 7, 10]), 4).tolist() == [1, 1, 2, 2, 3, 4]
    for bad in ("windows", "windows:0", "windows:x", "windows:08", "max"):
        with pytest.raises(ValueError, match="pooling"):
            gating.window_width(bad)


def test_segment_scores_are_the_max_over_segments_of_the_knn_ratio():
    """A toy bank by hand: the forget bank holds the segments of one forget prompt, the retain bank of two
    retained prompts; a query's score is the largest of its segments' log distance ratios."""
    g = torch.Generator().manual_seed(6)
    forget = torch.zeros(1, 2, 8)
    forget[0] = torch.randn(2, 8, generator=g)
    retain = torch.zeros(2, 3, 8)
    retain[0] = torch.randn(3, 8, generator=g)
    retain[1, :1] = torch.randn(1, 8, generator=g)  # a shorter prompt: one segment, two absent
    gate = gating.fit_knn(forget, retain, "windows:4", 1)
    assert gate.forget_bank.shape[0] == 2 and gate.retain_bank.shape[0] == 4  # absent segments are no bank rows
    queries = torch.zeros(2, 3, 8)
    queries[0] = torch.randn(3, 8, generator=g)
    queries[1, :2] = torch.randn(2, 8, generator=g)
    unit = lambda x: x / x.norm(dim=-1, keepdim=True)
    bank_f = unit(forget[0]).half().float()
    bank_r = unit(torch.cat([retain[0], retain[1, :1]])).half().float()
    eps = gating.DISTANCE_FLOOR
    for row, present in ((0, 3), (1, 2)):
        per_segment = []
        for j in range(present):
            q = unit(queries[row, j])
            d_f, d_r = 1 - (bank_f @ q).max(), 1 - (bank_r @ q).max()
            per_segment.append(torch.log(d_r + eps) - torch.log(d_f + eps))
        assert gate.scores(queries)[row, 0].item() == pytest.approx(max(per_segment).item(), abs=1e-5)


def test_a_benign_prefix_of_any_length_cannot_lower_the_score_below_the_question_segments():
    """Tokens as fixed vectors (no context): the question is 8 tokens near one forget direction, the prefix
    benign tokens. Under mean pooling a long enough prefix switches the gate off; under windows the prompt's
    score is the max over its segments, never below the score of any of its segments that lie inside the
    question, so it fires at every prefix length."""
    g = torch.Generator().manual_seed(7)
    d, width = 32, 4
    benign = torch.randn(200, d, generator=g)
    topic = torch.randn(d, generator=g)
    question = topic + 0.3 * torch.randn(8, d, generator=g)
    forget = torch.stack([question[i: i + width].mean(0) for i in range(0, 5, 2)])[None]
    retain = torch.stack([benign[i: i + width].mean(0) for i in range(0, 196, 2)])[None]
    mean_gate = gating.fit_knn(question.mean(0, keepdim=True), torch.stack([benign[i: i + 20].mean(0) for i in range(0, 180, 10)]),
                               "mean", 1)
    windows_gate = gating.fit_knn(forget, retain, f"windows:{width}", 1)
    tau = math.log(2.0)
    mean_fires = []
    for length in range(0, 241, 12):
        g_prefix = torch.Generator().manual_seed(100 + length)
        prefix = benign[torch.randint(0, 200, (length,), generator=g_prefix)] + 0.05 * torch.randn(length, d, generator=g_prefix)
        prompt = torch.cat([prefix, question])[None]
        segments = gating.pool(prompt, None, f"windows:{width}")
        score = windows_gate.scores(segments)[0, 0]
        starts = range(0, segments.shape[1])
        inside = [j for j in starts if j * (width // 2) >= length]  # segments of question positions only
        assert inside  # an 8-token question always holds a whole window
        for j in inside:
            assert score >= windows_gate.scores(segments[:, j])[0, 0]
        assert score > tau
        mean_fires.append(bool(mean_gate.scores(gating.pool(prompt, None, "mean"))[0, 0] > tau))
    assert mean_fires[0] and not mean_fires[-1]  # what the windows fix: the mean's decision falls to the prefix


def test_embeddings_pooling_takes_every_window_start_and_banks_keep_each_distinct_row_once():
    hidden = torch.randn(2, 9, 8, generator=torch.Generator().manual_seed(30))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, :3] = 0  # left padding: row 1 has 6 real positions
    z = gating.pool(hidden, mask, "embeddings:4")
    assert gating.reads_embeddings("embeddings:4") and not gating.reads_embeddings("windows:4")
    assert z.shape == (2, 6, 8)  # 9 - 4 + 1 windows on row 0; row 1: 6 - 4 + 1 = 3, then absent rows
    for j in range(6):
        assert torch.allclose(z[0, j], hidden[0, j: j + 4].mean(0), atol=1e-6)
    for j in range(3):
        assert torch.allclose(z[1, j], hidden[1, 3 + j: 3 + j + 4].mean(0), atol=1e-6)
    assert not z[1, 3:].any()
    with pytest.raises(ValueError):
        gating.window_width("embeddings:0")
    # a bank keeps one copy of rows that are equal as stored; with one neighbour no score moves
    rows = torch.randn(5, 8, generator=torch.Generator().manual_seed(31))
    repeated = torch.cat([rows, rows[[3, 0]], rows[[3]]])
    assert torch.equal(gating.distinct_rows(gating.unit_rows(repeated)), gating.unit_rows(rows))
    forget, retain = repeated[None, :4], repeated[None]
    plain = gating.fit_knn(forget, retain, "embeddings:4", 0)
    distinct = gating.fit_knn(forget, retain, "embeddings:4", 0, distinct=True)
    assert distinct.retain_bank.shape[0] == 5 and plain.retain_bank.shape[0] == 8
    queries = torch.randn(6, 3, 8, generator=torch.Generator().manual_seed(32))
    assert torch.equal(distinct.scores(queries), plain.scores(queries))


def test_segments_concatenate_across_batches_and_leave_one_out_drops_a_whole_prompt():
    a, b = torch.zeros(2, 3, 4), torch.zeros(1, 5, 4)
    a[:, :2], b[0] = 1.0, 2.0
    joined = gating.concat_features([a, b])
    assert joined.shape == (3, 5, 4) and not joined[:2, 3:].any() and torch.equal(joined[2], b[0])
    rows, prompt = gating.segment_rows(joined)
    assert rows.shape[0] == 2 + 2 + 5 and prompt.tolist() == [0, 0, 1, 1, 2, 2, 2, 2, 2]
    # every segment of a retained prompt leaves the bank together: the score equals a refit without the prompt
    retain = torch.randn(6, 3, 16, generator=torch.Generator().manual_seed(8))
    forget = torch.randn(2, 3, 16, generator=torch.Generator().manual_seed(9))
    gate = gating.fit_knn(forget, retain, "windows:4", 1)
    loo = gating.leave_one_out_retain_scores(gate, gating.segment_rows(retain)[1])
    for i in range(6):
        others = torch.cat([retain[:i], retain[i + 1:]])
        own_rows = gate.retain_bank[3 * i: 3 * i + 3].float()[None]  # prompt i's segments, as the bank holds them
        alone = gating.fit_knn(forget, others, "windows:4", 1).scores(own_rows)[0, 0]
        assert loo[i].item() == pytest.approx(alone.item(), abs=1e-4)


def test_calibration_lets_at_most_max_fpr_of_the_calibration_prompts_through():
    scores = torch.tensor([0.5, 0.1, 0.9, 0.3, 0.7, 0.2, 0.8, 0.4, 0.6, 0.0])
    tau, fpr = gating.calibrate(scores, 0.2)  # floor(0.2 * 10) = 2 may pass: 0.9 and 0.8
    assert tau == pytest.approx(0.7) and fpr == pytest.approx(0.2)
    tau, fpr = gating.calibrate(scores, 0.0)
    assert tau == pytest.approx(0.9) and fpr == 0.0
    with pytest.raises(ValueError):
        gating.calibrate(scores, 1.0)


def test_auroc_counts_ordered_pairs_and_half_ties():
    assert gating.auroc(torch.tensor([3.0, 4.0]), torch.tensor([1.0, 2.0])) == 1.0
    assert gating.auroc(torch.tensor([1.0]), torch.tensor([2.0])) == 0.0
    assert gating.auroc(torch.tensor([1.0, 3.0]), torch.tensor([1.0, 2.0])) == pytest.approx((0.5 + 0 + 1 + 1) / 4)


def pairwise_auroc(positive: torch.Tensor, negative: torch.Tensor) -> float:
    """The definition, P x N comparisons: what gating.auroc computed before it counted ranks."""
    p, n = positive.to(torch.float64).flatten(), negative.to(torch.float64).flatten()
    if not p.numel() or not n.numel():
        return math.nan
    greater = (p[:, None] > n[None, :]).double().sum()
    ties = (p[:, None] == n[None, :]).double().sum()
    return float((greater + 0.5 * ties) / (p.numel() * n.numel()))


def test_rank_auroc_is_the_pairwise_count_to_the_bit_ties_included():
    generator = torch.Generator().manual_seed(27)
    for trial in range(200):
        sizes = torch.randint(1, 60, (2,), generator=generator).tolist()
        # few distinct values: many ties within and across the two sides
        spread = (2, 5, 1000)[trial % 3]
        p, n = (torch.randint(-spread, spread, (size,), generator=generator).float() / 4 for size in sizes)
        assert gating.auroc(p, n) == pairwise_auroc(p, n), (trial, p, n)
        continuous = torch.randn(sizes[0], generator=generator), torch.randn(sizes[1], generator=generator)
        assert gating.auroc(*continuous) == pairwise_auroc(*continuous)
    special = torch.tensor([-math.inf, -0.0, 0.0, math.inf, math.nan, 1.0, -math.inf])
    for p, n in [(special, special.flip(0)), (special[:4], special[2:]), (torch.tensor([math.nan]), special),
                 (torch.tensor([-0.0, 0.0]), torch.tensor([0.0])), (torch.tensor([math.inf]), torch.tensor([math.inf]))]:
        assert gating.auroc(p, n) == pairwise_auroc(p, n), (p, n)
    assert math.isnan(gating.auroc(torch.tensor([]), torch.tensor([1.0])))
    assert gating.auroc(torch.ones(3, 2), torch.zeros(5)) == 1.0  # any shape: the scores are flattened


def test_leave_one_out_scores_equal_refitting_without_each_retain_prompt():
    forget, retain = features(4, seed=4), features(7, seed=5)
    gate = gating.fit_knn(forget, retain, "mean", 1)
    loo = gating.leave_one_out_retain_scores(gate)
    for i in range(len(retain)):
        rest = torch.cat([retain[:i], retain[i + 1:]])
        alone = gating.fit_knn(forget, rest, "mean", 1).scores(retain[i: i + 1])[0, 0]
        assert loo[i] == pytest.approx(float(alone), abs=1e-3)  # float16 banks on both sides


def test_without_calibration_prompts_the_threshold_ignores_the_occluded_retain_copies():
    """Left out of the bank, a retain prompt's own occluded copies would stand in for it (the copies are near it),
    and its score would read low: the threshold is calibrated on the clean retain rows alone."""
    from mllmeraser.core.calibration import fit_prompt_gate
    from mllmeraser.core.settings import FitSettings, KnnGate
    forget, retain = features(6, seed=6, shift=0.5), features(40, seed=7)
    copies = retain + 0.01 * features(40, seed=8)
    settings = FitSettings(gate=KnnGate(max_fpr=0.1, min_ratio=1.0))
    with_copies, record = fit_prompt_gate({"forget": forget, "retain": retain, "retain_occluded": copies}, settings)
    _, clean_record = fit_prompt_gate({"forget": forget, "retain": retain}, settings)
    assert record["threshold"] == clean_record["threshold"]
    assert with_copies.retain_bank.shape[0] == 80  # the copies are in the bank all the same
    naive = gating.leave_one_out_retain_scores(gating.fit_knn(forget, torch.cat([retain, copies]), "mean", 1))[:40]
    assert gating.calibrate(naive, 0.1)[0] < record["threshold"] - 1.0  # what counting them would have given


def test_ridge_gate_scores_forget_at_one_on_average():
    forget, retain = features(20, seed=6, shift=2.0), features(40, seed=7)
    gate = gating.fit_ridge(forget, retain, "mean", 0, beta=1.0, lam=1e-3)
    assert float(gate.scores(forget).mean()) == pytest.approx(1.0, abs=1e-4)
    assert float(gate.scores(retain).mean()) < 0.5


def test_stacked_gates_score_each_request_as_it_would_alone_and_select_undoes_stacking():
    a = gating.fit_knn(features(5, seed=8), features(7, seed=9), "mean", 1)
    b = gating.fit_knn(features(3, seed=10), features(6, seed=11), "mean", 1)
    a, b = (g.__class__(**{**g.header(), "threshold": [t]}, **{k.removeprefix("gate."): v for k, v in g.tensors().items()})
            for g, t in ((a, 0.1), (b, 0.2)))
    both = a.stack(b)
    queries = features(4, seed=12)
    assert both.threshold == (0.1, 0.2)
    assert torch.allclose(both.scores(queries), torch.cat([a.scores(queries), b.scores(queries)], dim=1))
    assert torch.allclose(both.select([1]).scores(queries), b.scores(queries))
    with pytest.raises(ValueError, match="pooling"):
        a.stack(gating.fit_knn(features(2), features(2), "last", 1))


def reference_top_mean(similarity: torch.Tensor, owner: torch.Tensor, num_terms: int, neighbours: int) -> torch.Tensor:
    """The per-term loop top_mean replaced, kept as the reference: term k reads its own and the shared columns."""
    out = similarity.new_full((similarity.shape[0], num_terms), -math.inf)
    for k in range(num_terms):
        columns = similarity[:, (owner == k) | (owner == gating.SHARED)]
        if columns.shape[1]:
            out[:, k] = columns.topk(min(neighbours, columns.shape[1]), dim=1).values.mean(dim=1)
    return out


def same_scores(a: torch.Tensor, b: torch.Tensor, width: int = 16) -> bool:
    """Scores of one query from banks of other shapes: the same up to the matmul's summation order. A cosine of
    `width` terms summed in another order moves by at most ~width float32 ulps (which order depends on the bank's
    shape and on the CPU's kernels), and the score log(d_R + eps) - log(d_F + eps) amplifies a change of d by at
    most 1 / eps per bank: near an exact match (d ~ 0) a score of ~5 moves in its fourth digit, elsewhere far
    less. So the tolerance is that bound, not a fixed absolute 1e-6."""
    cosine_error = width * torch.finfo(torch.float32).eps
    return torch.allclose(a, b, rtol=0, atol=2 * cosine_error / gating.DISTANCE_FLOOR)


@pytest.mark.parametrize("num_terms", [1, 3, 50])
@pytest.mark.parametrize("neighbours", [1, 3])
@pytest.mark.parametrize("with_shared", [False, True])
def test_vectorised_top_mean_equals_the_per_term_loop_exactly(num_terms, neighbours, with_shared):
    for seed in range(5):
        generator = torch.Generator().manual_seed(seed)
        columns = int(torch.randint(0, 4 * num_terms + 8, (1,), generator=generator))
        owner = torch.randint(gating.SHARED if with_shared else 0, num_terms, (columns,), generator=generator)
        similarity = torch.randn(6, columns, generator=generator)
        expected = reference_top_mean(similarity, owner, num_terms, neighbours)
        assert torch.equal(gating.top_mean(similarity, owner, num_terms, neighbours), expected)


def test_fit_knn_shares_its_retain_rows_and_stacking_keeps_one_copy():
    retain = features(9, seed=20)
    a = gating.fit_knn(features(4, seed=21), retain, "mean", 1)
    b = gating.fit_knn(features(5, seed=22), retain, "mean", 1)
    assert torch.equal(a.retain_owner, torch.full((9,), gating.SHARED))
    both = a.stack(b)
    assert both.retain_bank.shape == (9, 16)  # one copy, not two
    queries = torch.cat([features(4, seed=23), features(4, seed=21)])
    assert same_scores(both.scores(queries), torch.cat([a.scores(queries), b.scores(queries)], dim=1))
    assert same_scores(both.select([1]).scores(queries), b.scores(queries))
    assert both.select([1]).retain_bank.shape == (9, 16)  # select keeps the shared rows
    many = gating.PromptGate.concat([a, b, a])
    assert many.retain_bank.shape == (9, 16) and many.num_terms == 3
    assert same_scores(many.scores(queries), torch.cat([a.scores(queries), b.scores(queries), a.scores(queries)], 1))


def test_stacking_gates_on_different_retain_banks_gives_each_term_its_own_rows():
    a = gating.fit_knn(features(4, seed=24), features(9, seed=25), "mean", 1, neighbours=2)
    b = gating.fit_knn(features(5, seed=26), features(6, seed=27), "mean", 1, neighbours=2)
    both = a.stack(b)
    assert (both.retain_owner != gating.SHARED).all() and both.retain_bank.shape[0] == 9 + 6
    queries = features(7, seed=28)
    assert same_scores(both.scores(queries), torch.cat([a.scores(queries), b.scores(queries)], dim=1))
    assert same_scores(both.select([1, 0]).scores(queries), torch.cat([b.scores(queries), a.scores(queries)], 1))


# ---- hooks ----------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def llava():
    return tiny_llava()


def calibrated_gate(llava, layers, decision: int, fire_on: torch.Tensor, threshold: float) -> gating.PromptGate:
    """A knn gate whose forget bank holds the pooled features of `fire_on`, retain bank random features."""
    _, pooled = capture(llava, layers[: decision + 1], decision, "mean", input_ids=fire_on)
    gate = gating.fit_knn(pooled, features(8, d=pooled.shape[1], seed=13), "mean", decision)
    return gating.PromptGate(**{**gate.header(), "threshold": [threshold]},
                             **{k.removeprefix("gate."): v for k, v in gate.tensors().items()})


def test_steering_adds_alpha_times_the_decision_times_r_from_the_decision_layer_on(llava):
    _, layers = find_decoder_layers(llava)
    gate = calibrated_gate(llava, layers, 1, PROMPT_A, threshold=1.0)
    r = torch.randn(1, 1, llava.config.text_config.hidden_size)
    outputs = {}
    probe = [layer.register_forward_hook(lambda m, a, o, i=i: outputs.__setitem__(i, o.clone())) for i, layer in enumerate(layers)]
    try:
        logits(llava, input_ids=PROMPT_A)
        clean = dict(outputs)
        with attach_prompt_steering(llava, layers[1], [layers[1]], gate, r, [3.0]) as handle:
            logits(llava, input_ids=PROMPT_A)
            assert handle.decisions.tolist() == [[1.0]]  # PROMPT_A is in the forget bank: it fires
            assert torch.equal(outputs[0], clean[0])  # the layer before the decision is never steered
            assert torch.allclose(outputs[1], clean[1] + 3.0 * r[0, 0], atol=1e-5)
            logits(llava, input_ids=PROMPT_B)
            assert handle.decisions.tolist() == [[0.0]]  # an unrelated prompt: off
    finally:
        for hook in probe:
            hook.remove()


def test_the_runtime_decision_equals_the_offline_gate_score(llava):
    _, layers = find_decoder_layers(llava)
    gate = calibrated_gate(llava, layers, 1, PROMPT_A, threshold=0.5)
    batch = left_padded_batch()
    _, pooled = capture(llava, layers[:2], 1, "mean", **batch)
    r = torch.randn(1, 1, llava.config.text_config.hidden_size)
    with attach_prompt_steering(llava, layers[1], [layers[1]], gate, r, [1.0]) as handle:
        logits(llava, **batch)
        assert torch.allclose(handle.scores, gate.scores(pooled))
        assert torch.equal(handle.decisions, gate.decide(pooled))


def test_left_and_right_padding_and_batching_give_each_prompt_its_own_answer(llava):
    _, layers = find_decoder_layers(llava)
    gate = calibrated_gate(llava, layers, 0, PROMPT_A, threshold=1.0)
    r = torch.randn(1, 2, llava.config.text_config.hidden_size) * 3
    eraser = Eraser(u=None, r=r, alpha=1.0, layer_indices=[0, 1], layers_path="model.language_model.layers",
                    hidden_size=r.shape[-1], prompt_gate=gate)
    with eraser.attach(llava):
        alone = [greedy(llava, p, attention_mask=torch.ones_like(p)).sequences[0, p.shape[1]:] for p in (PROMPT_A, PROMPT_B)]
        batch = left_padded_batch()
        together = greedy(llava, batch["input_ids"], attention_mask=batch["attention_mask"]).sequences[:, 7:]
    assert torch.equal(together[0], alone[0]) and torch.equal(together[1], alone[1])
    unsteered = greedy(llava, PROMPT_A, attention_mask=torch.ones_like(PROMPT_A)).sequences[0, PROMPT_A.shape[1]:]
    assert not torch.equal(alone[0], unsteered)  # the forget prompt's answer changed
    # right padding: the pooled feature reads the mask, so the decision is the same
    right = torch.cat([PROMPT_B, torch.zeros(1, 3, dtype=torch.long)], dim=1)
    mask = torch.cat([torch.ones(1, 4, dtype=torch.long), torch.zeros(1, 3, dtype=torch.long)], dim=1)
    _, by_mask = capture(llava, layers[:1], 0, "mean", input_ids=right, attention_mask=mask)
    _, plain = capture(llava, layers[:1], 0, "mean", input_ids=PROMPT_B)
    assert torch.allclose(by_mask, plain, atol=1e-5)


def test_detaching_restores_logits_bit_for_bit_and_decode_steps_are_not_re_decided(llava):
    _, layers = find_decoder_layers(llava)
    gate = calibrated_gate(llava, layers, 0, PROMPT_A, threshold=1.0)
    r = torch.randn(1, 2, llava.config.text_config.hidden_size)
    before = logits(llava, input_ids=PROMPT_A)
    calls = []
    original = gate.scores
    object.__setattr__(gate, "scores", lambda z: calls.append(z.shape[0]) or original(z))
    with attach_prompt_steering(llava, layers[0], layers[:2], gate, r, [2.0]):
        greedy(llava, PROMPT_A, attention_mask=torch.ones_like(PROMPT_A))
    assert calls == [1]  # one decision for the prompt; the 4 decode steps reuse the KV cache's steering
    assert torch.equal(logits(llava, input_ids=PROMPT_A), before)
    assert not any(hasattr(llava, name) for name in ("_mllmeraser_steering",))


def test_prompt_gated_eraser_round_trips_and_composes(tmp_path, llava):
    _, layers = find_decoder_layers(llava)
    d = llava.config.text_config.hidden_size
    gate = calibrated_gate(llava, layers, 1, PROMPT_A, threshold=0.25)
    eraser = Eraser(u=None, r=torch.randn(1, 1, d), alpha=1.5, layer_indices=[1], layers_path="model.language_model.layers",
                    hidden_size=d, prompt_gate=gate, metadata={"requests": [{"name": "a"}]})
    loaded = Eraser.load(eraser.save(tmp_path / "e.safetensors"))
    queries = features(3, d=d, seed=14)
    assert loaded.u is None and torch.equal(loaded.r, eraser.r) and loaded.alpha == (1.5,)
    assert loaded.prompt_gate.header() == gate.header()
    assert torch.equal(loaded.prompt_gate.scores(queries), gate.scores(queries))
    both = Eraser.concat([eraser, loaded])
    assert both.num_terms == 2 and both.prompt_gate.num_terms == 2
    assert torch.equal(both.drop(0).prompt_gate.scores(queries), gate.scores(queries))
    with pytest.raises(ValueError, match="decides at layer 1"):
        Eraser(u=None, r=torch.randn(1, 2, d), alpha=1.0, layer_indices=[0, 1], layers_path="x", hidden_size=d,
               prompt_gate=gate)
    with pytest.raises(ValueError, match="exactly one gate"):
        Eraser(u=torch.zeros(1, 1, d), r=torch.zeros(1, 1, d), alpha=1.0, layer_indices=[1], layers_path="x",
               hidden_size=d, prompt_gate=gate)
    assert math.isfinite(gate.threshold[0])


def test_a_windows_gate_round_trips_through_the_artifact_stacks_and_keys_the_model_cache(tmp_path):
    from mllmeraser.core import artifact, cache
    from mllmeraser.core.settings import FitSettings
    from mllmeraser.errors import UserInputError

    g = torch.Generator().manual_seed(10)
    d = 16
    gate = gating.fit_knn(torch.randn(3, 4, d, generator=g), torch.randn(5, 4, d, generator=g), "windows:6", 1)
    gate = gating.PromptGate(**{**gate.header(), "threshold": [0.3]},
                             **{k.removeprefix("gate."): v for k, v in gate.tensors().items()})
    eraser = Eraser(u=None, r=torch.randn(1, 1, d, generator=g), alpha=1.0, layer_indices=[1],
                    layers_path="model.language_model.layers", hidden_size=d, prompt_gate=gate)
    path = eraser.save(tmp_path / "windows.safetensors")
    loaded = Eraser.load(path)
    queries = torch.randn(4, 3, d, generator=g)
    queries[1, 2:] = 0  # a shorter prompt
    assert loaded.prompt_gate.header()["pooling"] == "windows:6"
    assert torch.equal(loaded.prompt_gate.scores(queries), gate.scores(queries))
    both = Eraser.concat([eraser, loaded])
    assert torch.equal(both.prompt_gate.scores(queries), gate.scores(queries).repeat(1, 2))
    mean_gate = gating.fit_knn(torch.randn(2, d, generator=g), torch.randn(3, d, generator=g), "mean", 1)
    assert "pooling" in gate.compatible(mean_gate)
    # the validator refuses a windows pooling without a width >= 1, naming the field
    with safe_open(path, "pt") as handle:
        metadata, tensors = handle.metadata(), {k: handle.get_tensor(k) for k in handle.keys()}
    header = json.loads(metadata[artifact.METADATA_KEY])
    header["gate"]["pooling"] = "windows:0"
    save_file(tensors, tmp_path / "bad.safetensors", {**metadata, artifact.METADATA_KEY: json.dumps(header)})
    with pytest.raises(UserInputError, match="gate.pooling"):
        Eraser.load(tmp_path / "bad.safetensors")
    widths = [cache.shape_settings(FitSettings(pooling=p), "x", [1]) for p in ("mean", "windows:6", "windows:8")]
    assert widths[0] != widths[1] != widths[2]  # a pooling, width included, is part of the model cache's key
    with pytest.raises(UserInputError, match="pooling"):
        FitSettings(pooling="windows")


def test_an_embeddings_gate_reads_the_decoder_input_and_no_prefix_lowers_its_score(llava):
    """embeddings:W reads the first decoder layer's input, where a token's vector does not depend on what stands
    before it, at every window start: prepending any tokens keeps every window of the question, so the score at
    run time (the hooks) never falls below the unprefixed prompt's, while a later layer's windows move."""
    _, layers = find_decoder_layers(llava)
    pooling = "embeddings:3"
    _, pooled = capture(llava, layers[:2], 1, pooling, layers[0], input_ids=PROMPT_A)
    embedded = llava.get_input_embeddings()(PROMPT_A).float()
    assert torch.allclose(pooled, gating.pool(embedded, None, pooling), atol=1e-6)  # the decoder's input
    with pytest.raises(ValueError, match="first layer"):
        capture(llava, layers[:2], 1, pooling, input_ids=PROMPT_A)
    retain = gating.concat_features([capture(llava, layers[:2], 1, pooling, layers[0], input_ids=p)[1] for p in
                                     (PROMPT_B, torch.tensor([[3, 4, 5, 6, 7, 8]]))])
    fitted = gating.fit_knn(pooled, retain, pooling, 1, distinct=True)
    gate = gating.PromptGate(**{**fitted.header(), "threshold": [math.log(2.0)]},
                             **{k.removeprefix("gate."): v for k, v in fitted.tensors().items()})
    r = torch.randn(1, 1, llava.config.text_config.hidden_size)
    alone = gate.scores(pooled)[0, 0]
    later = {}  # the decision layer's own windows, for contrast
    generator = torch.Generator().manual_seed(33)
    with attach_prompt_steering(llava, layers[1], [layers[1]], gate, r, [1.0], first_layer=layers[0]) as handle:
        for length in (0, 1, 5, 17, 40):
            prefix = torch.randint(1, 100, (1, length), generator=generator)
            prompt = torch.cat([prefix, PROMPT_A], dim=1)
            logits(llava, input_ids=prompt)
            assert handle.scores[0, 0] >= alone - 1e-6 and handle.decisions.tolist() == [[1.0]], length
            offline = capture(llava, layers[:2], 1, pooling, layers[0], input_ids=prompt)[1]
            assert torch.allclose(handle.scores, gate.scores(offline))
            later[length] = capture(llava, layers[:2], 1, "windows:3", input_ids=prompt)[1]
    assert not torch.allclose(later[0][0, -1], later[40][0, -1])  # the decision layer's last window moved
    with pytest.raises(ValueError, match="first layer"):
        attach_prompt_steering(llava, layers[1], [layers[1]], gate, r, [1.0])
