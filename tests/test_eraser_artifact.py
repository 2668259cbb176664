"""The Eraser: validation against a model, composition, and its safetensors artifact."""

from __future__ import annotations

import dataclasses
import json
import math
import os

import pytest
import safetensors.torch
import torch
from transformers import LlavaForConditionalGeneration

from mllmeraser.core import gating
from mllmeraser.core.compat import model_fingerprint
from mllmeraser.core.eraser import FORMAT_VERSION, METADATA_KEY, Eraser
from mllmeraser.errors import UserInputError
from mllmeraser.core.decoder_layers import find_decoder_layers
from mllmeraser.core.layer_steering import attach_steering
from tiny_families import random_llava as tiny_llava

PROMPT = torch.tensor([[5, 17, 33, 9, 41, 77, 12]])


@pytest.fixture(scope="module")
def llava() -> LlavaForConditionalGeneration:
    return tiny_llava()


def make_eraser(model=None, k: int = 1, num_layers: int = 2, d: int = 64, seed: int = 0, name: str = "req") -> Eraser:
    generator = torch.Generator().manual_seed(seed)
    metadata = {"requests": [{"name": f"{name}.{i}", "counts": {"forget": 10, "retain": 90}} for i in range(k)],
                "fit": {"solver": "ridge", "beta": 1.0, "lam": 1e-3}}
    if model is not None:
        metadata["fingerprint"] = model_fingerprint(model)
    return Eraser(
        u=torch.randn(k, num_layers, d, generator=generator) * 5.0,
        r=torch.randn(k, num_layers, d, generator=generator),
        alpha=[0.3 + i for i in range(k)],
        layer_indices=list(range(num_layers)),
        layers_path="model.language_model.layers",
        hidden_size=d,
        floor=[0.25] + [-math.inf] * (k - 1),
        cap=[math.inf] * (k - 1) + [1.5],
        metadata=metadata,
    )


def logits(model, **inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


def assert_same_eraser(a: Eraser, b: Eraser) -> None:
    assert torch.equal(a.u, b.u) and torch.equal(a.r, b.r)
    assert (a.alpha, a.floor, a.cap, a.layer_indices) == (b.alpha, b.floor, b.cap, b.layer_indices)
    assert (a.layers_path, a.hidden_size, a.mode, a.metadata) == (b.layers_path, b.hidden_size, b.mode, b.metadata)


# ---- the artifact -------------------------------------------------------------------------------------


def test_save_load_round_trip_is_bit_identical(tmp_path, llava):
    eraser = make_eraser(llava, k=2)
    path = eraser.save(tmp_path / "eraser.safetensors")
    loaded = Eraser.load(path)
    assert_same_eraser(loaded, eraser)
    assert loaded.header() == eraser.header()
    with safetensors.safe_open(str(path), framework="pt") as reader:
        assert sorted(reader.keys()) == ["r", "u"]
        header = json.loads(reader.metadata()[METADATA_KEY])
    assert header["format_version"] == FORMAT_VERSION and header["metadata"]["fingerprint"] == model_fingerprint(llava)
    assert header["gate_floor"] == [0.25, None] and header["gate_cap"] == [None, 1.5]  # infinite bounds as null


def test_artifact_is_factored(tmp_path):
    eraser = Eraser(u=torch.zeros(1, 32, 4096), r=torch.zeros(1, 32, 4096), alpha=0.3,
                    layer_indices=range(32), layers_path="model.language_model.layers", hidden_size=4096)
    size = os.path.getsize(eraser.save(tmp_path / "big.safetensors"))
    assert 2 * 32 * 4096 * 4 < size < 1.1 * 2**20


def test_bad_artifacts_name_the_file(tmp_path, llava):
    good = make_eraser(llava).save(tmp_path / "good.safetensors")
    missing = tmp_path / "missing.safetensors"
    with pytest.raises(UserInputError, match="no such eraser file") as info:
        Eraser.load(missing)
    assert info.value.path == str(missing)

    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(good.read_bytes()[:100])
    with pytest.raises(UserInputError, match="not a safetensors file") as info:
        Eraser.load(corrupt)
    assert info.value.path == str(corrupt)

    def rewritten(name: str, tensors=None, **header_changes) -> str:
        with safetensors.safe_open(str(good), framework="pt") as reader:
            header = json.loads(reader.metadata()[METADATA_KEY])
            stored = {key: reader.get_tensor(key) for key in reader.keys()}
        header.update(header_changes)
        header = {key: value for key, value in header.items() if value is not None}
        path = tmp_path / name
        path.write_bytes(safetensors.torch.save(tensors if tensors is not None else stored,
                                                metadata={METADATA_KEY: json.dumps(header)}))
        return str(path)

    cases = {
        rewritten("newer.safetensors", format_version=FORMAT_VERSION + 1): "newer than this mllmeraser",
        rewritten("unversioned.safetensors", format_version=None): "no format_version",
        rewritten("no_r.safetensors", tensors={"u": torch.zeros(1, 2, 64)}): "missing tensor 'r'",
        rewritten("shape.safetensors", tensors={"u": torch.zeros(1, 2, 32), "r": torch.zeros(1, 2, 32)}): "shape",
        rewritten("fields.safetensors", mode=None): "no field 'mode'",
    }
    for path, problem in cases.items():
        with pytest.raises(UserInputError, match=problem) as info:
            Eraser.load(path)
        assert info.value.path == path
    foreign = tmp_path / "foreign.safetensors"
    foreign.write_bytes(safetensors.torch.save({"u": torch.zeros(1)}))
    with pytest.raises(UserInputError, match="not an mllmeraser eraser"):
        Eraser.load(foreign)


def test_failed_save_leaves_the_existing_file_intact(tmp_path, monkeypatch):
    path = make_eraser(seed=1).save(tmp_path / "eraser.safetensors")
    before = path.read_bytes()

    def failing_fsync(fd):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="disk full"):
        make_eraser(seed=2).save(path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["eraser.safetensors"]  # no temporary left behind


# ---- validation against a model -----------------------------------------------------------------------


def test_attach_steers_like_the_hooks_and_detaches(llava):
    eraser = make_eraser(llava, k=2)
    vanilla = logits(llava, input_ids=PROMPT)
    with eraser.attach(llava):
        steered = logits(llava, input_ids=PROMPT)
    _, layers = find_decoder_layers(llava)
    with attach_steering(llava, layers, eraser.u, eraser.r, eraser.alpha, eraser.floor, eraser.cap):
        direct = logits(llava, input_ids=PROMPT)
    assert torch.equal(steered, direct) and not torch.equal(steered, vanilla)
    assert torch.equal(logits(llava, input_ids=PROMPT), vanilla)


def test_attach_names_what_differs(llava):
    eraser = make_eraser(llava)
    with pytest.raises(UserInputError, match="eraser was fitted for hidden size 64, model has 32"):
        eraser.attach(tiny_llava(hidden_size=32))
    other_weights = tiny_llava(seed=1)
    with pytest.raises(UserInputError, match="embedding_sha256"):
        eraser.attach(other_weights)
    eraser.attach(other_weights, check_fingerprint=False).remove()
    deep = Eraser(u=torch.zeros(1, 64), r=torch.zeros(1, 64), alpha=1.0, layer_indices=[5],
                  layers_path="model.language_model.layers", hidden_size=64)
    with pytest.raises(UserInputError, match="steers layer 5, model has 2 decoder layers"):
        deep.attach(llava)
    wrong_path = Eraser(u=torch.zeros(1, 64), r=torch.zeros(1, 64), alpha=1.0, layer_indices=[0],
                        layers_path="model.layers", hidden_size=64)
    with pytest.raises(UserInputError, match="--layers-path"):
        wrong_path.attach(llava)


def test_fingerprint_ignores_the_load_dtype_but_not_the_weights(llava):
    fingerprint = model_fingerprint(llava)
    assert fingerprint == {"model_type": "llava", "hidden_size": 64, "num_layers": 2, "vocab_size": 128,
                           "embedding_sha256": fingerprint["embedding_sha256"],
                           "weights_sha256": fingerprint["weights_sha256"]}
    assert model_fingerprint(tiny_llava().to(torch.bfloat16)) == fingerprint
    # A float16 checkpoint (llava-hf's are) hashes alike in float32, float16 and bfloat16: every load is exact or
    # one rounding to bfloat16. (Float32 weights loaded in float16 are rounded twice: another hash.)
    stored_fp16 = model_fingerprint(tiny_llava().half())
    assert model_fingerprint(tiny_llava().half().float()) == stored_fp16
    assert model_fingerprint(tiny_llava().half().bfloat16()) == stored_fp16
    other = model_fingerprint(tiny_llava(seed=1))
    assert other["embedding_sha256"] != fingerprint["embedding_sha256"]
    assert other["weights_sha256"] != fingerprint["weights_sha256"]


def _edited(name: str, index: tuple[int, ...], delta: float = 0.5):
    """tiny_llava() with one element of parameter `name` moved by `delta`."""
    model = tiny_llava()
    with torch.no_grad():
        model.get_parameter(name)[index] += delta
    return model


Q_PROJ = "model.language_model.layers.1.self_attn.q_proj.weight"


def test_fingerprint_sees_a_change_outside_the_embedding(llava):
    """A fine-tune with frozen embeddings (e.g. a LoRA merged into q/v): the embedding hash alone passed it as
    the same model. Element (0, 0) is in every parameter's sample (flat index 0)."""
    fingerprint = model_fingerprint(llava)
    tuned = model_fingerprint(_edited(Q_PROJ, (0, 0)))
    assert tuned["embedding_sha256"] == fingerprint["embedding_sha256"]
    assert tuned["weights_sha256"] != fingerprint["weights_sha256"]
    assert {k: v for k, v in tuned.items() if k != "weights_sha256"} == \
        {k: v for k, v in fingerprint.items() if k != "weights_sha256"}
    # (64, 64) q_proj: 4096 elements, every 16th sampled; (0, 16) is flat index 16, the second sample
    assert model_fingerprint(_edited(Q_PROJ, (0, 16)))["weights_sha256"] != fingerprint["weights_sha256"]
    new_embedding = model_fingerprint(_edited("model.language_model.embed_tokens.weight", (0, 0)))
    assert new_embedding["embedding_sha256"] != fingerprint["embedding_sha256"]
    assert new_embedding["weights_sha256"] != fingerprint["weights_sha256"]


def test_attach_refuses_an_eraser_of_the_same_architecture_with_other_weights(llava):
    eraser = make_eraser(llava)
    with pytest.raises(UserInputError, match="fitted for weights_sha256 '[0-9a-f]{16}', model has '[0-9a-f]{16}'"):
        eraser.attach(_edited(Q_PROJ, (0, 0)))
    with pytest.raises(UserInputError, match="fitted for embedding_sha256"):
        eraser.attach(_edited("model.language_model.embed_tokens.weight", (0, 0)))
    eraser.attach(tiny_llava().to(torch.bfloat16)).remove()  # the same checkpoint in another dtype attaches


def test_old_fingerprints_and_offloaded_weights_compare_on_shared_keys_only(llava):
    fingerprint = model_fingerprint(llava)
    old = dataclasses.replace(make_eraser(llava), metadata={  # an artifact from before weights_sha256
        "fingerprint": {k: v for k, v in fingerprint.items() if k != "weights_sha256"}})
    old.attach(_edited(Q_PROJ, (0, 0))).remove()  # what it recorded cannot tell these apart
    with pytest.raises(UserInputError, match="embedding_sha256"):
        old.attach(tiny_llava(seed=1))
    combined = Eraser.concat([old, make_eraser(llava)])  # old and new artifacts of one model compose: union kept
    assert combined.fingerprint == fingerprint
    with pytest.raises(ValueError, match="weights_sha256 differs"):
        Eraser.concat([make_eraser(llava), make_eraser(_edited(Q_PROJ, (0, 0)))])

    offloaded = tiny_llava()
    offloaded.get_submodule("model.language_model.layers.1.mlp").to("meta")  # weights not in memory
    partial = model_fingerprint(offloaded)
    assert partial["weights_on_meta"] == 3 and "weights_sha256" not in partial  # gate, up and down projections
    assert partial["embedding_sha256"] == fingerprint["embedding_sha256"]
    make_eraser(llava).attach(offloaded).remove()  # its weights cannot be checked; the rest matches


# ---- composition --------------------------------------------------------------------------------------


def test_concat_and_drop_round_trip(llava):
    a, b = make_eraser(llava, k=1, seed=1, name="a"), make_eraser(llava, k=2, seed=2, name="b")
    both = Eraser.concat([a, b])
    assert both.num_terms == 3 and both.alpha == a.alpha + b.alpha and both.cap == a.cap + b.cap
    assert [request["name"] for request in both.requests()] == ["a.0", "b.0", "b.1"]
    assert both.requests()[0]["fit"] == a.metadata["fit"]  # shared settings are kept per request
    only_a = both.drop(2).drop(1)
    assert torch.equal(only_a.u, a.u) and torch.equal(only_a.r, a.r)
    assert (only_a.alpha, only_a.floor, only_a.cap) == (a.alpha, a.floor, a.cap)
    assert only_a.requests() == a.requests() and only_a.fingerprint == a.fingerprint
    with pytest.raises(ValueError, match="only term"):
        only_a.drop(0)


def test_a_silenced_request_leaves_the_other_unchanged(llava):
    unbounded = dict(alpha=10.0, floor=-math.inf, cap=math.inf)
    a, b = (dataclasses.replace(make_eraser(llava, seed=seed), **unbounded) for seed in (1, 2))
    vanilla = logits(llava, input_ids=PROMPT)
    with a.attach(llava):
        a_alone = logits(llava, input_ids=PROMPT)
    with Eraser.concat([a, b.with_alpha(0.0)]).attach(llava):
        a_with_silent_b = logits(llava, input_ids=PROMPT)
    with Eraser.concat([a, b]).attach(llava):
        a_with_b = logits(llava, input_ids=PROMPT)
    torch.testing.assert_close(a_with_silent_b, a_alone, rtol=0, atol=1e-6)
    assert not torch.allclose(a_alone, vanilla) and not torch.allclose(a_with_b, a_alone)


def test_concat_refuses_incompatible_erasers(llava):
    a = make_eraser(llava)
    with pytest.raises(ValueError, match="layer_indices"):
        Eraser.concat([a, make_eraser(llava, num_layers=1)])
    with pytest.raises(ValueError, match="different models"):
        Eraser.concat([a, make_eraser(tiny_llava(seed=1))])


def test_concat_in_one_step_is_concat_in_pairs(llava):
    erasers = [make_eraser(llava, k=1 + i % 2, seed=i, name=f"e{i}") for i in range(4)]
    pairwise = Eraser.concat([Eraser.concat([Eraser.concat(erasers[:2]), erasers[2]]), erasers[3]])
    assert_same_eraser(Eraser.concat(erasers), pairwise)
    assert not hasattr(Eraser, "combine") and not hasattr(Eraser, "__add__")  # one way to compose erasers
    assert Eraser.concat(erasers[:1]) is erasers[0]
    with pytest.raises(ValueError, match="different models"):
        Eraser.concat([erasers[0], make_eraser(tiny_llava(seed=1))])


def knn_eraser(num_terms: int, d: int = 64, seed: int = 0, shared: bool = True) -> Eraser:
    """A prompt-gated eraser of `num_terms` requests on one retain bank: shared (the current layout) or, as
    format 2 wrote it, one copy per term."""
    generator = torch.Generator().manual_seed(seed)
    retain = gating.unit_rows(torch.randn(12, d, generator=generator))
    if shared:
        retain_bank, retain_owner = retain, torch.full((12,), gating.SHARED)
    else:
        retain_bank, retain_owner = retain.repeat(num_terms, 1), torch.arange(num_terms).repeat_interleave(12)
    gate = gating.PromptGate(kind="knn", pooling="mean", layer=0, threshold=[0.2 * (k + 1) for k in range(num_terms)],
                             neighbours=2, forget_bank=gating.unit_rows(torch.randn(3 * num_terms, d, generator=generator)),
                             forget_owner=torch.arange(num_terms).repeat_interleave(3), retain_bank=retain_bank,
                             retain_owner=retain_owner)
    return Eraser(u=None, prompt_gate=gate, r=torch.randn(num_terms, 2, d, generator=generator), alpha=1.0,
                  layer_indices=[0, 1], layers_path="model.language_model.layers", hidden_size=d)


def test_format_2_artifacts_with_per_term_retain_copies_load_and_score_exactly_as_before(tmp_path):
    from test_gating import reference_top_mean

    old = knn_eraser(3, shared=False)
    tensors = {"r": old.r, **old.prompt_gate.tensors()}
    header = {**old.header(), "format_version": 2}
    path = tmp_path / "v2.safetensors"
    path.write_bytes(safetensors.torch.save(tensors, metadata={METADATA_KEY: json.dumps(header)}))
    loaded = Eraser.load(path)
    gate = loaded.prompt_gate
    assert torch.equal(gate.retain_owner, old.prompt_gate.retain_owner)  # no shared rows appear
    queries = torch.randn(5, 64, generator=torch.Generator().manual_seed(9))
    z = gating.unit_rows(queries)
    before = gating.ratio_score(  # the scores as format 2's reader computed them: the per-term loop
        reference_top_mean(z @ gate.forget_bank.float().T, gate.forget_owner, 3, 2),
        reference_top_mean(z @ gate.retain_bank.float().T, gate.retain_owner, 3, 2))
    assert torch.equal(gate.scores(queries), before)


def test_shared_retain_rows_round_trip_as_format_3_and_after(tmp_path):
    eraser = Eraser.concat([knn_eraser(2), knn_eraser(2)])  # one retain bank: one copy
    assert eraser.prompt_gate.retain_bank.shape[0] == 12
    path = eraser.save(tmp_path / "shared.safetensors")
    with safetensors.safe_open(str(path), framework="pt") as reader:
        assert json.loads(reader.metadata()[METADATA_KEY])["format_version"] == 4 == FORMAT_VERSION
    loaded = Eraser.load(path)
    queries = torch.randn(5, 64, generator=torch.Generator().manual_seed(10))
    assert torch.equal(loaded.prompt_gate.retain_owner, eraser.prompt_gate.retain_owner)
    assert torch.equal(loaded.prompt_gate.scores(queries), eraser.prompt_gate.scores(queries))
    assert torch.equal(loaded.drop(0).prompt_gate.retain_bank, eraser.prompt_gate.retain_bank)


# What format 3 recorded for each request's fit under FitSettings() on the testbed: every gate's fields in one bag.
FORMAT_3_DEFAULT_FIT = {"gate": "knn", "pooling": "mean", "decision_layer": 1, "neighbours": 1, "max_fpr": 0.01,
                        "min_ratio": 2.0, "ratio": 0.3, "gamma": 0.1, "beta": 16.0, "lam": 1e-05, "layers": None,
                        "normalise_gate": False, "occlusion": 0.0, "mode": "prefill",
                        "pgd": {"eps": 8 / 255, "step": 2 / 255, "steps": 10, "batch_size": None, "checkpointing": None,
                                "stop_nll": 0.1},
                        "batch_size": 32}


def test_a_format_3_fit_record_reads_into_the_nested_settings():
    from mllmeraser.core.settings import FitSettings, PaperGate, RidgeGate, nested_record
    from mllmeraser.core.solve import fit_record

    settings = FitSettings(decision_layer=1)
    assert nested_record(FORMAT_3_DEFAULT_FIT) == fit_record(settings)  # what this version writes for the same fit
    assert list(nested_record(FORMAT_3_DEFAULT_FIT)) == list(fit_record(settings))  # in the same order
    assert nested_record(FORMAT_3_DEFAULT_FIT)["gate"] == {"name": "knn", "neighbours": 1, "max_fpr": 0.01,
                                                           "min_ratio": 2.0}  # the other gates' fields did not apply
    assert FitSettings.from_record(FORMAT_3_DEFAULT_FIT) == settings
    paper = {**FORMAT_3_DEFAULT_FIT, "gate": "paper", "ratio": 0.5, "normalise_gate": True, "layers": [1, 2]}
    assert FitSettings.from_record(paper) == FitSettings(gate=PaperGate(ratio=0.5, normalise_gate=True),
                                                         decision_layer=1, layers=(1, 2))
    ridge = {**FORMAT_3_DEFAULT_FIT, "gate": "ridge", "beta": 4.0, "max_fpr": 0.05}
    assert FitSettings.from_record(ridge).gate == RidgeGate(beta=4.0, max_fpr=0.05)
    for settings in (FitSettings(), FitSettings(gate=PaperGate(floor=0.0), alpha=2.0), FitSettings(gate=RidgeGate())):
        assert FitSettings.from_record(settings.record()) == settings
        assert nested_record(settings.record()) == settings.record()  # this version's records as they are
    assert nested_record({"solver": "ridge", "beta": 1.0}) == {"solver": "ridge", "beta": 1.0}  # not a fit record


def test_a_format_3_eraser_loads_with_nested_fit_records_and_scores_as_before(tmp_path):
    from mllmeraser.core.settings import FitSettings
    from mllmeraser.core.solve import fit_record

    old = dataclasses.replace(knn_eraser(2), metadata={"requests": [
        {"name": "a", "counts": {"forget": 3}, "fit": FORMAT_3_DEFAULT_FIT},
        {"name": "b", "counts": {"forget": 3}, "fit": {**FORMAT_3_DEFAULT_FIT, "neighbours": 2}}]})
    tensors = {"r": old.r, **old.prompt_gate.tensors()}
    path = tmp_path / "v3.safetensors"
    path.write_bytes(safetensors.torch.save(tensors, metadata={METADATA_KEY: json.dumps({**old.header(),
                                                                                           "format_version": 3})}))
    loaded = Eraser.load(path)
    queries = torch.randn(5, 64, generator=torch.Generator().manual_seed(11))
    assert torch.equal(loaded.prompt_gate.scores(queries), old.prompt_gate.scores(queries))
    assert torch.equal(loaded.r, old.r) and loaded.alpha == old.alpha and loaded.layer_indices == old.layer_indices
    fits = [request["fit"] for request in loaded.requests()]
    assert fits[0] == fit_record(FitSettings(decision_layer=1))
    assert fits[1]["gate"] == {"name": "knn", "neighbours": 2, "max_fpr": 0.01, "min_ratio": 2.0}
    resaved = Eraser.load(loaded.save(tmp_path / "v4.safetensors"))  # written as format 4, read back unchanged
    assert resaved.metadata == loaded.metadata


def test_constructor_validates():
    with pytest.raises(ValueError, match=r"\[K, L, d\]"):
        Eraser(u=torch.zeros(1, 2, 8), r=torch.zeros(1, 2, 8), alpha=1.0, layer_indices=[0], layers_path="x",
               hidden_size=8)
    with pytest.raises(ValueError, match="distinct non-negative"):
        Eraser(u=torch.zeros(2, 8), r=torch.zeros(2, 8), alpha=1.0, layer_indices=[1, 1], layers_path="x",
               hidden_size=8)
    with pytest.raises(ValueError, match="alpha has 2 values"):
        Eraser(u=torch.zeros(1, 8), r=torch.zeros(1, 8), alpha=[1.0, 2.0], layer_indices=[0], layers_path="x",
               hidden_size=8)
    with pytest.raises(TypeError):
        Eraser(u=torch.zeros(1, 8), r=torch.zeros(1, 8), alpha=1.0, layer_indices=[0], layers_path="x", hidden_size=8,
               metadata={"counts": torch.ones(1)})
