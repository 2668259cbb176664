"""Many deletion requests behind one gate structure (core/index.py): the index decides like the stacked Eraser,
add and remove cost one request and undo each other exactly, freed rows and slots are reused, and the index
attached to a tiny random-weight LLaVA steers like the stacked Eraser, changes taking effect at the next
prompt without re-attaching. Hook sparsity: a prompt on which nothing fires is left bit for bit alone."""

from __future__ import annotations

import math

import pytest
import torch

from mllmeraser.core import gating
from mllmeraser.core.compat import model_fingerprint
from mllmeraser.core.eraser import Eraser
from mllmeraser.core.capture import capture
from mllmeraser.core.decoder_layers import find_decoder_layers
from mllmeraser.core.index import RequestIndex
from mllmeraser.errors import UserInputError
from tiny_families import random_llava

LAYERS_PATH = "model.language_model.layers"


def request(forget: torch.Tensor, retain: torch.Tensor, seed: int, neighbours: int = 1, threshold: float = 0.3,
            layer_indices=(1, 2), decision_layer: int = 1, scale: float = 1.0, fingerprint=None) -> Eraser:
    """One deletion request: a knn gate on pooled features `forget` / `retain` (shared rows), random r."""
    gate = gating.fit_knn(forget, retain, "mean", decision_layer, neighbours)
    gate = gating.PromptGate(**{**gate.header(), "threshold": [threshold]},
                             **{k.removeprefix("gate."): v for k, v in gate.tensors().items()})
    generator = torch.Generator().manual_seed(1000 + seed)
    r = torch.randn(1, len(layer_indices), forget.shape[1], generator=generator) * scale
    metadata = {"requests": [{"name": f"person-{seed}"}]}
    if fingerprint is not None:
        metadata["fingerprint"] = fingerprint
    return Eraser(u=None, prompt_gate=gate, r=r, alpha=1.0 + 0.1 * seed, layer_indices=layer_indices,
                  layers_path=LAYERS_PATH, hidden_size=forget.shape[1], metadata=metadata)


def random_requests(count: int, d: int = 32, neighbours: int = 1, seed: int = 0) -> tuple[list[Eraser], torch.Tensor]:
    """`count` requests of 1..7 random forget rows each (drawn from `seed`) on one shared retain bank (the same
    for every seed), and queries: random ones and noisy copies of every fifth request's forget rows (so those
    fire)."""
    retain = torch.randn(40, d, generator=torch.Generator().manual_seed(12345))
    generator = torch.Generator().manual_seed(seed)
    erasers = [request(torch.randn(1 + k % 7, d, generator=generator), retain, k, neighbours) for k in range(count)]
    near = torch.cat([e.prompt_gate.forget_bank.float() for e in erasers[::5]])
    queries = torch.cat([torch.randn(16, d, generator=generator), near + 0.05 * torch.randn(near.shape, generator=generator)])
    return erasers, queries


def index_of(erasers: dict[str, Eraser]) -> RequestIndex:
    index = RequestIndex.like(next(iter(erasers.values())))
    for name, eraser in erasers.items():
        index.add(name, eraser)
    return index


def same_scores(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Scores from banks of other shapes: the same up to the matmul's summation order."""
    return torch.allclose(a, b, rtol=0, atol=1e-6)


# ---- the index's decisions ------------------------------------------------------------------------------------


@pytest.mark.parametrize("neighbours", [1, 3])
def test_index_decides_like_the_concatenated_eraser(neighbours):
    erasers, queries = random_requests(30, neighbours=neighbours)
    index = index_of({f"r{k}": e for k, e in enumerate(erasers)})
    for k in (4, 11, 12):  # withdrawn requests leave holes that later requests fill
        index.remove(f"r{k}")
    extra, _ = random_requests(3, neighbours=neighbours, seed=1)
    for k, e in enumerate(extra):
        index.add(f"x{k}", e)
    stacked = Eraser.concat([e for k, e in enumerate(erasers) if k not in (4, 11, 12)] + extra)
    slots = index.term_slots()
    expected = stacked.prompt_gate.decide(queries)
    assert expected.sum() > 0 and torch.equal(index.decide(queries)[:, slots], expected)
    assert same_scores(index.scores(queries)[:, slots], stacked.prompt_gate.scores(queries))
    free = sorted(set(range(index.capacity["slots"])) - set(slots))
    assert (index.decide(queries)[:, free] == 0).all() and (index.scores(queries)[:, free] == -math.inf).all()


@pytest.mark.parametrize("neighbours", [1, 3])
def test_adding_then_removing_a_request_restores_the_decisions_exactly(neighbours):
    erasers, queries = random_requests(12, neighbours=neighbours)
    index = index_of({f"r{k}": e for k, e in enumerate(erasers) if k != 0})
    before_scores, before_decisions = index.scores(queries), index.decide(queries)
    index.add("late", erasers[0])  # one forget row: it fires on its copy under either n
    assert index.decide(queries)[:, index.slots("late")].sum() > 0  # it fires on the copies of its rows
    index.remove("late")
    after_scores, after_decisions = index.scores(queries), index.decide(queries)
    assert torch.equal(after_decisions, before_decisions)
    assert same_scores(after_scores, before_scores)


def test_removed_rows_and_slots_are_reused_and_zeroed():
    erasers, queries = random_requests(10)
    index = index_of({f"r{k}": e for k, e in enumerate(erasers)})
    capacity, memory = index.capacity, index.memory_bytes()
    slots = index.slots("r3")
    index.remove("r3")
    assert index.capacity["free_slots"] == capacity["free_slots"] + 1
    assert index.capacity["free_rows"] == capacity["free_rows"] + erasers[3].prompt_gate.forget_bank.shape[0]
    assert index.to_eraser().num_terms == 9 and "r3" not in index.names()
    index.add("again", erasers[3])  # the same size: it fits exactly in what r3 left
    assert index.slots("again") == slots
    assert index.capacity == capacity and index.memory_bytes() == memory
    # a withdrawn request's activations are zeroed, not left in the free rows
    index.remove("again")
    withdrawn = erasers[3].prompt_gate.forget_bank.float()
    held = index._bank[: index.capacity["rows_used"]]
    assert not (held[:, None, :] == withdrawn[None]).all(dim=2).any()
    assert int((held == 0).all(dim=1).sum()) == withdrawn.shape[0]


def test_growing_past_the_capacity_keeps_every_request():
    erasers, queries = random_requests(70)  # slots double 8 -> 16 -> ... -> 128, rows 64 -> 128 -> 256
    index = index_of({f"r{k}": e for k, e in enumerate(erasers)})
    assert index.capacity["slots"] == 128 and index.num_terms == 70
    stacked = Eraser.concat(erasers)
    assert torch.equal(index.decide(queries)[:, index.term_slots()], stacked.prompt_gate.decide(queries))


def test_to_eraser_round_trips_through_an_artifact(tmp_path):
    erasers, queries = random_requests(6, neighbours=3)
    index = index_of({"alice": Eraser.concat(erasers[:2]), "bob": erasers[2], "carol": Eraser.concat(erasers[3:])})
    path = index.to_eraser().save(tmp_path / "index.safetensors")
    loaded = Eraser.load(path)
    assert loaded.prompt_gate.retain_bank.shape[0] == 40  # one retain bank, not one per term
    again = RequestIndex.from_eraser(loaded)
    assert again.names() == ["alice", "bob", "carol"] and len(again.slots("carol")) == 3
    assert torch.equal(again.decide(queries)[:, again.term_slots()], index.decide(queries)[:, index.term_slots()])
    assert [r["name"] for r in loaded.requests()] == [r["name"] for e in erasers for r in e.requests()]


def test_format_2_erasers_with_one_retain_copy_per_term_join_the_index():
    erasers, queries = random_requests(3)
    stacked = Eraser.concat(erasers)
    gate = stacked.prompt_gate
    per_term = gating.PromptGate(**gate.header(), forget_bank=gate.forget_bank, forget_owner=gate.forget_owner,
                                 retain_bank=gate.retain_bank.repeat(3, 1),
                                 retain_owner=torch.arange(3).repeat_interleave(gate.retain_bank.shape[0]))
    old = Eraser(u=None, prompt_gate=per_term, r=stacked.r, alpha=stacked.alpha, layer_indices=stacked.layer_indices,
                 layers_path=LAYERS_PATH, hidden_size=stacked.hidden_size)
    index = RequestIndex.from_eraser(old, name="old")
    assert torch.equal(index.decide(queries)[:, index.term_slots()], gate.decide(queries))


def test_the_index_refuses_what_it_cannot_hold():
    erasers, _ = random_requests(2)
    index = index_of({"a": erasers[0]})
    generator = torch.Generator().manual_seed(5)
    forget = erasers[1].prompt_gate.forget_bank.float()
    cases = {
        "retain bank": request(forget, torch.randn(40, 32, generator=generator), 1),
        "layer_indices": request(forget, erasers[0].prompt_gate.retain_bank.float(), 1, layer_indices=(1,)),
        "neighbours": request(forget, erasers[0].prompt_gate.retain_bank.float(), 1, neighbours=2),
    }
    for problem, eraser in cases.items():
        with pytest.raises(ValueError, match=problem):
            index.add("b", eraser)
    with pytest.raises(ValueError, match="exists"):
        index.add("a", erasers[1])
    with pytest.raises(KeyError):
        index.remove("nobody")
    paper = Eraser(u=torch.zeros(1, 2, 32), r=torch.zeros(1, 2, 32), alpha=1.0, layer_indices=[1, 2],
                   layers_path=LAYERS_PATH, hidden_size=32)
    with pytest.raises(ValueError, match="per-layer gate"):
        index.add("p", paper)
    assert index.names() == ["a"]


# ---- attached to a model --------------------------------------------------------------------------------------


PROMPTS = torch.randint(3, 120, (8, 9), generator=torch.Generator().manual_seed(0))  # 8 prompts of 9 tokens


@pytest.fixture(scope="module")
def setup():
    """A tiny LLaVA and three requests deciding at layer 0, each forgetting one of PROMPTS[0..2] (their pooled
    features), retain bank PROMPTS[4..7]'s, directions large enough to change greedy tokens."""
    model = random_llava()
    _, layers = find_decoder_layers(model)
    _, pooled = capture(model, layers[:1], 0, "mean", input_ids=PROMPTS)
    fingerprint = model_fingerprint(model)
    erasers = {f"p{k}": request(pooled[k: k + 1], pooled[4:], k, threshold=math.log(2.0), layer_indices=(0, 1),
                                decision_layer=0, scale=4.0, fingerprint=fingerprint) for k in range(3)}
    return model, erasers


def generate(model, prompts: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model.generate(input_ids=prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=5,
                             do_sample=False, pad_token_id=0)
    return out[:, prompts.shape[1]:]


def test_the_attached_index_generates_like_the_attached_concatenated_eraser(setup):
    model, erasers = setup
    vanilla = generate(model, PROMPTS)
    with Eraser.concat(list(erasers.values())).attach(model) as handle:
        stacked = generate(model, PROMPTS)
        expected = handle.decisions
    index = index_of(erasers)
    with index.attach(model) as handle:
        indexed = generate(model, PROMPTS)
        assert torch.equal(handle.decisions[:, index.term_slots()], expected)
        assert handle.prompt.fired.count == 3  # each forget prompt fires its own request, in one batch
    assert torch.equal(expected[:3], torch.eye(3)) and not expected[3:].any()
    assert torch.equal(indexed, stacked)
    assert not torch.equal(indexed[:3], vanilla[:3]) and torch.equal(indexed[3:], vanilla[3:])


def test_a_prompt_nothing_fires_on_is_left_alone_bit_for_bit(setup):
    model, erasers = setup
    with torch.no_grad():
        vanilla = model(input_ids=PROMPTS[5:6]).logits
    index = index_of(erasers)
    with index.attach(model) as handle:
        with torch.no_grad():
            steered = model(input_ids=PROMPTS[5:6]).logits
        assert handle.prompt.fired.count == 0
    assert torch.equal(steered, vanilla)


def test_add_and_remove_while_attached_take_effect_at_the_next_prompt(setup):
    model, erasers = setup
    vanilla = generate(model, PROMPTS[1:2])
    with erasers["p1"].attach(model):
        erased = generate(model, PROMPTS[1:2])
    assert not torch.equal(erased, vanilla)
    index = index_of({"p0": erasers["p0"]})
    with index.attach(model):
        assert torch.equal(generate(model, PROMPTS[1:2]), vanilla)  # p1 is not in the index yet
        index.add("p1", erasers["p1"])
        assert torch.equal(generate(model, PROMPTS[1:2]), erased)
        index.remove("p1")
        assert torch.equal(generate(model, PROMPTS[1:2]), vanilla)
        for k in range(20):  # growing the buffers while attached (new tensors) is seen too
            index.add(f"copy{k}", erasers["p2"])
        assert index.capacity["slots"] > 8
        index.add("p1 again", erasers["p1"])
        assert torch.equal(generate(model, PROMPTS[1:2]), erased)


def test_the_eraser_the_index_and_the_server_refuse_another_model_alike(setup):
    """One compatibility check (compat.check_compatible) behind Eraser.attach, RequestIndex.attach and the
    server's registry: the same models refused, naming what differs; the same model (any dtype) accepted."""
    from mllmeraser.serve.policy import PolicyError, Registry

    model, erasers = setup
    eraser, index = erasers["p0"], RequestIndex.from_eraser(erasers["p0"])
    registry = Registry({}, model)
    others = {"embedding_sha256": random_llava(seed=1), "hidden size 64, model has 32": random_llava(hidden_size=32)}
    for differs, other in others.items():
        for what, attach in (("eraser", eraser.attach), ("index", index.attach)):
            with pytest.raises(UserInputError, match=f"^{what} was fitted for {differs}"):
                attach(other)
        with pytest.raises(PolicyError, match=f"^eraser 'x': eraser was fitted for {differs}") as refused:
            Registry({}, other).check("x", eraser)
        assert refused.value.code == "model_mismatch"
    for attach in (eraser.attach, index.attach):
        attach(random_llava().to(torch.bfloat16)).remove()
        attach(random_llava(seed=1), check_fingerprint=False).remove()
    registry.check("x", eraser)  # the served model's fingerprint, computed once, matches
    moved = dict(eraser.metadata, fingerprint={**eraser.fingerprint, "weights_sha256": "0" * 16})
    with pytest.raises(PolicyError, match="weights_sha256 '0000000000000000', model has"):
        registry.check("x", Eraser(u=None, prompt_gate=eraser.prompt_gate, r=eraser.r, alpha=eraser.alpha,
                                   layer_indices=eraser.layer_indices, layers_path=eraser.layers_path,
                                   hidden_size=eraser.hidden_size, metadata=moved))
