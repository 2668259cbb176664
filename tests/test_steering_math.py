"""The equations of mllmeraser.core.steering checked on random data (float64, seeded)."""

from __future__ import annotations

import math

import pytest
import torch

from mllmeraser.core.steering import (
    GROUPS,
    SteeringStats,
    paper_dense_map,
    shape_gate,
    solve_gate_paper,
    solve_gate_ridge,
    solve_gates,
    steering_term,
)

L, D = 3, 16


def random_acts(n: int, seed: int, shift: float = 0.0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, L, D, generator=generator, dtype=torch.float64) + shift


def filled_stats(seed: int = 0) -> tuple[SteeringStats, dict[str, torch.Tensor]]:
    acts = {group: random_acts(10 + i, seed + i, shift=i) for i, group in enumerate(GROUPS)}
    stats = SteeringStats(L, D)
    for group, a in acts.items():
        stats.update(group, a)
    return stats, acts


def assert_stats_close(a: SteeringStats, b: SteeringStats) -> None:
    assert a.counts == b.counts
    for group in a.sums:
        torch.testing.assert_close(a.sums[group], b.sums[group], rtol=1e-13, atol=1e-12)
    assert a.grams.keys() == b.grams.keys()
    for group in a.grams:
        torch.testing.assert_close(a.grams[group], b.grams[group], rtol=1e-13, atol=1e-12)


# ---- sufficient statistics ------------------------------------------------------------------------


def test_streaming_chunks_equal_one_batch():
    acts = random_acts(37, seed=1)
    whole = SteeringStats(L, D).update("forget", acts)
    streamed = SteeringStats(L, D)
    for chunk in acts.split(5):
        streamed.update("forget", chunk)
    assert_stats_close(whole, streamed)
    assert whole.counts["forget"] == 37
    torch.testing.assert_close(whole.gram("forget")[1], acts[:, 1].T @ acts[:, 1], rtol=1e-13, atol=1e-12)
    torch.testing.assert_close(whole.mean("forget"), acts.mean(0), rtol=1e-13, atol=1e-13)


def test_update_accepts_any_float_dtype_and_accumulates_in_float64():
    acts = random_acts(4, seed=2).to(torch.bfloat16)
    stats = SteeringStats(L, D).update("retain", acts)
    assert stats.sums["retain"].dtype == torch.float64
    torch.testing.assert_close(stats.sums["retain"], acts.double().sum(0))


def test_merged_shards_equal_one_pass():
    one_pass, acts = filled_stats()
    shards = [SteeringStats(L, D), SteeringStats(L, D), SteeringStats(L, D)]
    for group, a in acts.items():
        for i, part in enumerate(a.tensor_split(3)):
            shards[i].update(group, part)
    assert_stats_close(shards[0] + shards[1] + shards[2], one_pass)
    assert_stats_close(shards[0].merge(SteeringStats(L, D)), shards[0])  # an empty shard adds nothing


def test_state_dict_round_trip():
    stats, _ = filled_stats()
    restored = SteeringStats.from_state_dict(stats.state_dict())
    assert restored.counts == stats.counts
    for group in stats.sums:
        assert torch.equal(restored.sums[group], stats.sums[group])
    for group in stats.grams:
        assert torch.equal(restored.grams[group], stats.grams[group])
    assert "recall.gram" not in stats.state_dict()  # direction groups keep counts and sums only


def test_direction_points_from_recall_to_erasure():
    stats, acts = filled_stats()
    torch.testing.assert_close(stats.direction(), acts["erasure"].mean(0) - acts["recall"].mean(0))


def test_clear_errors():
    stats = SteeringStats(L, D)
    with pytest.raises(ValueError, match="'erasure' is empty"):
        stats.direction()
    with pytest.raises(ValueError, match=r"shape \[batch, 3, 16\]"):
        stats.update("forget", torch.zeros(2, L, D + 1))
    with pytest.raises(ValueError, match="'forget' is empty"):
        stats.gram("forget")
    with pytest.raises(ValueError, match="unknown group"):
        stats.update("forgetting", torch.zeros(2, L, D))
    with pytest.raises(ValueError, match="cannot merge"):
        stats.merge(SteeringStats(L + 1, D))
    state = filled_stats()[0].state_dict()
    state["retain.gram"] = state["retain.gram"][:, :-1]
    with pytest.raises(ValueError, match="retain.gram"):
        SteeringStats.from_state_dict(state)


def test_statistics_of_the_steered_layers_only_equal_those_rows_of_every_layer():
    """A fit holds only the layers it steers; row i is decoder layer layers[i], and each closed form reads its
    own layer's statistics, so directions and gates are the full statistics' rows, bit for bit (CPU)."""
    full, acts = filled_stats()
    held = [2, 0]  # any order in; held in increasing order, as the forward visits them
    subset = SteeringStats(L, D, layers=held)
    assert subset.layers == (0, 2) and subset.rows([2, 0]) == [1, 0]
    for group, a in acts.items():
        subset.update(group, a[:, list(subset.layers)])
    assert subset.sums["forget"].shape == (2, D) and subset.gram("retain").shape == (2, D, D)
    for group in acts:
        assert torch.equal(subset.sums[group], full.sums[group][[0, 2]])
    for group in subset.grams:
        assert torch.equal(subset.grams[group], full.grams[group][[0, 2]])
    assert torch.equal(subset.direction([2]), full.direction()[[2]])
    assert torch.equal(subset.mean("recall", [2, 0]), full.mean("recall")[[2, 0]])
    for solver, params in (("paper", dict(ratio=0.3, gamma=0.1)), ("ridge", dict(beta=2.0, lam=1e-3))):
        assert torch.equal(solve_gates(subset, solver, [2, 0], **params), solve_gates(full, solver, **params)[[2, 0]])
        assert torch.equal(solve_gates(full, solver, [2], **params), solve_gates(full, solver, **params)[[2]])
    with pytest.raises(ValueError, match=r"hold decoder layers \[0, 2\], not \[1\]"):
        subset.direction([1])
    with pytest.raises(ValueError, match="cannot merge"):
        subset.merge(full)
    with pytest.raises(ValueError, match="distinct decoder layers in 0..2"):
        SteeringStats(L, D, layers=[1, 1])
    with pytest.raises(ValueError, match="distinct decoder layers in 0..2"):
        SteeringStats(L, D, layers=[3])


def test_in_place_merge_allocates_no_gram_and_never_aliases_a_shard():
    one_pass, acts = filled_stats()
    shards = [SteeringStats(L, D), SteeringStats(L, D)]
    for group, a in acts.items():
        for shard, part in zip(shards, a.tensor_split(2)):
            shard.update(group, part)
    first, second = shards
    before = {group: gram.data_ptr() for group, gram in first.grams.items()}
    second_grams = {group: gram.clone() for group, gram in second.grams.items()}
    merged = first.merge(second)  # a new object; the inputs are unchanged
    first += second
    assert first is shards[0] and {group: gram.data_ptr() for group, gram in first.grams.items()} == before
    assert_stats_close(first, one_pass)
    for group in merged.grams:  # merge and merge_ add in the same order: the same bits
        assert torch.equal(merged.grams[group], first.grams[group])
    assert all(torch.equal(second.grams[group], second_grams[group]) for group in second.grams)
    # A shard without a group's Gram adopts a copy of the other's: merging more into it leaves the other alone.
    empty = SteeringStats(L, D).merge_(second)
    assert all(empty.grams[group].data_ptr() != second.grams[group].data_ptr() for group in second.grams)
    empty.merge_(second)
    assert all(torch.equal(second.grams[group], second_grams[group]) for group in second.grams)
    assert_stats_close(empty, second + second)


def test_subset_state_dict_round_trip_and_old_state_dicts_hold_every_layer():
    stats = SteeringStats(L, D, layers=[1, 2])
    for group, a in filled_stats()[1].items():
        stats.update(group, a[:, 1:])
    restored = SteeringStats.from_state_dict(stats.state_dict())
    assert restored.layers == (1, 2) and restored.counts == stats.counts
    assert all(torch.equal(restored.grams[g], stats.grams[g]) for g in stats.grams)
    old = filled_stats()[0].state_dict()
    del old["layers"]  # written before statistics held a subset of the layers
    assert SteeringStats.from_state_dict(old).layers == tuple(range(L))


# ---- the paper's null-space gate --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("n_f", "n_r", "d", "ratio", "gamma"),
    [
        (10, 40, 16, 0.3, 0.1),  # n_f < d, n_r > d
        (50, 40, 32, 0.4, 1.0),  # n_f > d, n_r > d
        (8, 20, 32, 12 / 32, 0.1),  # n_r < d: k = d - n_r keeps exactly the retain null space
    ],
)
def test_factored_paper_gate_equals_dense_map(n_f, n_r, d, ratio, gamma):
    generator = torch.Generator().manual_seed(n_f * 1000 + d)
    H_f = torch.randn(n_f, d, generator=generator, dtype=torch.float64) + 0.5
    H_r = torch.randn(n_r, d, generator=generator, dtype=torch.float64)
    r = torch.randn(d, generator=generator, dtype=torch.float64)
    W = paper_dense_map(H_f, H_r, r, ratio, gamma)
    u = solve_gate_paper(H_f.T @ H_f, H_f.sum(0), H_r.T @ H_r, ratio, gamma)
    h = torch.randn(7, d, generator=generator, dtype=torch.float64)
    torch.testing.assert_close(h @ W, (h @ u)[:, None] * r, rtol=0, atol=1e-9)
    torch.testing.assert_close(W, torch.outer(u, r), rtol=0, atol=1e-9)


def test_paper_gate_is_zero_on_retain_when_an_exact_null_space_exists():
    d, n_r, ratio = 32, 12, 0.5  # n_r < d * (1 - ratio): the retain rows span < d - k directions
    generator = torch.Generator().manual_seed(3)
    H_r = torch.randn(n_r, d, generator=generator, dtype=torch.float64)
    H_f = torch.randn(9, d, generator=generator, dtype=torch.float64) + 1.0
    u = solve_gate_paper(H_f.T @ H_f, H_f.sum(0), H_r.T @ H_r, ratio, gamma=0.1)
    assert (H_r @ u).abs().max() < 1e-10
    assert (H_f @ u).mean() > 0.5  # and it still fires on forget


def test_paper_gate_rejects_a_ratio_keeping_no_direction():
    with pytest.raises(ValueError, match="ratio"):
        solve_gate_paper(torch.eye(4), torch.ones(4), torch.eye(4), ratio=0.1, gamma=0.1)


# ---- the ridge gate ---------------------------------------------------------------------------------


def ridge_objective(u, H_f, H_r, beta, lam):
    """J(u) as documented in solve_gate_ridge, from raw activations."""
    A = H_f.T @ H_f / len(H_f) + beta * H_r.T @ H_r / len(H_r)
    lam_abs = lam * torch.trace(A) / A.shape[0]
    return ((H_f @ u - 1) ** 2).mean() + beta * ((H_r @ u) ** 2).mean() + lam_abs * (u @ u)


@pytest.mark.parametrize(("beta", "lam"), [(1.0, 1e-3), (4.0, 0.1), (0.5, 0.0)])
def test_ridge_gate_minimises_its_objective(beta, lam):
    generator = torch.Generator().manual_seed(4)
    H_f = torch.randn(30, D, generator=generator, dtype=torch.float64) + 1.0
    H_r = torch.randn(90, D, generator=generator, dtype=torch.float64)
    u = solve_gate_ridge(H_f.T @ H_f, H_f.sum(0), H_r.T @ H_r, len(H_f), len(H_r), beta, lam)
    u = u.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(ridge_objective(u, H_f, H_r, beta, lam), u)
    assert grad.abs().max() < 1e-10
    # the normal equations, written out
    A = H_f.T @ H_f / 30 + beta * H_r.T @ H_r / 90
    lhs = (A + lam * torch.trace(A) / D * torch.eye(D, dtype=torch.float64)) @ u.detach()
    torch.testing.assert_close(lhs, H_f.mean(0), rtol=0, atol=1e-12)


def test_ridge_gate_is_scale_invariant():
    generator = torch.Generator().manual_seed(5)
    H_f = torch.randn(20, D, generator=generator, dtype=torch.float64) + 1.0
    H_r = torch.randn(60, D, generator=generator, dtype=torch.float64)
    u = solve_gate_ridge(H_f.T @ H_f, H_f.sum(0), H_r.T @ H_r, 20, 60)
    c = 37.0  # activations 37x larger: the gate values h.u must not change
    u_scaled = solve_gate_ridge(c * c * H_f.T @ H_f, c * H_f.sum(0), c * c * H_r.T @ H_r, 20, 60)
    torch.testing.assert_close(c * H_f @ u_scaled, H_f @ u, rtol=1e-9, atol=1e-10)


def test_ridge_gate_separates_two_clusters():
    generator = torch.Generator().manual_seed(6)
    centre_f, centre_r = torch.randn(2, D, generator=generator, dtype=torch.float64)  # no bias term: distinct centres
    H_f = torch.randn(40, D, generator=generator, dtype=torch.float64) * 0.3 + centre_f
    H_r = torch.randn(200, D, generator=generator, dtype=torch.float64) * 0.3 + centre_r
    stats = SteeringStats(1, D).update("forget", H_f[:, None]).update("retain", H_r[:, None])
    u = solve_gates(stats, "ridge", beta=1.0, lam=1e-3)[0]
    assert (H_f @ u).mean() > 0.9 and abs((H_r @ u).mean()) < 0.1
    assert (H_f @ u).min() > (H_r @ u).max()  # the gate separates every sample


def test_solve_gates_rejects_an_unknown_solver():
    stats, _ = filled_stats()
    with pytest.raises(ValueError, match="unknown gate solver"):
        solve_gates(stats, "lasso")


# ---- gate shaping, the steering term ----------------------------------------------------------------


def test_shape_gate():
    g = torch.tensor([-2.0, 0.1, 0.5, 3.0])
    assert torch.equal(shape_gate(g), g)  # floor -inf, cap +inf: the paper's linear gate, bit for bit
    assert torch.equal(shape_gate(g, floor=0.3, cap=1.0), torch.tensor([0.0, 0.0, 0.5, 1.0]))
    per_term = shape_gate(g[:, None].expand(4, 2), torch.tensor([0.3, -math.inf]), torch.tensor([1.0, math.inf]))
    assert torch.equal(per_term[:, 1], g) and torch.equal(per_term[:, 0], torch.tensor([0.0, 0.0, 0.5, 1.0]))


def test_steering_term_sums_gated_terms():
    generator = torch.Generator().manual_seed(8)
    h = torch.randn(3, D, generator=generator)
    u, r = torch.randn(2, D, generator=generator), torch.randn(2, D, generator=generator)
    alpha, floor, cap = torch.tensor([0.5, -2.0]), torch.tensor([-math.inf, 0.0]), torch.tensor([math.inf, 1.0])
    expected = 0.5 * (h @ u[0])[:, None] * r[0] - 2.0 * shape_gate(h @ u[1], 0.0, 1.0)[:, None] * r[1]
    torch.testing.assert_close(steering_term(h, u, r, alpha, floor, cap), expected)
