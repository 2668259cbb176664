"""The model cache (core/cache.py): a request's fit with a warm cache is the fit without one, bit for bit; the
cache is found by what shapes it and by nothing else; a bad entry is rebuilt; the command line lists and clears
it. And PGD's early stop (PGDSettings.stop_nll) moves exactly the items the model does not yet recall."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest
import safetensors.torch
import torch

from mllmeraser.bench import data
from mllmeraser.core import cache, models, pgd, steering
from mllmeraser.core.eraser import Eraser
from mllmeraser.core.eraser_fitter import EraserFitter, fit_eraser
from mllmeraser.core.settings import FitSettings, KnnGate, PaperGate, PGDSettings
from mllmeraser.errors import UserInputError


@pytest.fixture(scope="module")
def sets(testbed_data):
    """A small request and parts of the shared sets (the cache's logic does not depend on their size)."""
    forget = data.resolve_spec("forget_5", testbed_data, 5)
    return {"forget": forget, "retain": data.retained_inputs(testbed_data, 5)[::6],
            "erasure": data.erasure_items(None, testbed_data)[::4],
            "calibration": data.validation_items(testbed_data, 5)[::3]}


def shared(model, processor, sets, settings, directory):
    return cache.shared_statistics(model, processor, retain=sets["retain"], erasure=sets["erasure"],
                                   calibration=sets["calibration"], settings=settings, cache_dir=directory,
                                   progress=False)


def same_eraser(a: Eraser, b: Eraser) -> None:
    assert a.header() == b.header()
    assert torch.equal(a.r, b.r)
    tensors_a = a.prompt_gate.tensors() if a.prompt_gate is not None else {"u": a.u}
    tensors_b = b.prompt_gate.tensors() if b.prompt_gate is not None else {"u": b.u}
    assert list(tensors_a) == list(tensors_b)
    assert all(torch.equal(tensors_a[name], tensors_b[name]) for name in tensors_a)


@pytest.mark.parametrize("gate", ["knn", "paper"])
def test_a_warm_cache_gives_the_eraser_fitted_without_one(testbed_model, sets, gate, tmp_path):
    model, processor = testbed_model
    settings = FitSettings(gate={"knn": KnnGate(), "paper": PaperGate()}[gate])
    direct = fit_eraser(model, processor, **sets, settings=settings, progress=False)
    built = shared(model, processor, sets, settings, tmp_path)
    assert built.status == "built" and built.path == cache.entry_path(tmp_path, built.key) and len(list(tmp_path.iterdir())) == 1
    loaded = shared(model, processor, sets, settings, tmp_path)
    assert loaded.status == "loaded" and loaded.key == built.key
    timings = {}
    warm = fit_eraser(model, processor, forget=sets["forget"], settings=settings, shared=loaded, progress=False,
                      timings=timings)
    same_eraser(direct, warm)
    assert "solve" in timings and not any("shared" in stage for stage in timings)  # only the request ran
    if gate == "paper":
        assert "retain" in loaded.stats.grams and not loaded.features
    else:
        assert set(loaded.features) == {"retain", "calibration"}
        assert loaded.features["retain"].shape[0] == len(sets["retain"])


def test_the_fitter_builds_the_shared_statistics_once_and_fits_each_request_against_them(testbed_model, sets,
                                                                                         tmp_path):
    """EraserFitter: questions added in parts make the entry one call makes (the same key, the same eraser as
    fit_eraser's); the first fit builds it, the next reuses it; adding questions drops it; a fitter made from shared
    statistics takes no questions."""
    model, processor = testbed_model
    settings = FitSettings()
    fitter = EraserFitter(model, processor, settings, cache_dir=tmp_path, progress=False)
    half = len(sets["retain"]) // 2
    fitter.add_retain(sets["retain"][:half]).add_retain(sets["retain"][half:]).add_erasure(sets["erasure"])
    fitter.add_calibration(sets["calibration"])
    timings = {}
    first = fitter.fit(sets["forget"], timings=timings)
    statistics = fitter.shared
    assert statistics.status == "built" and "model cache (built)" in timings and "solve" in timings
    assert shared(model, processor, sets, settings, tmp_path).key == statistics.key  # one entry, however added
    same_eraser(first, fit_eraser(model, processor, **sets, settings=settings, progress=False))
    again = {}
    second = fitter.fit(sets["forget"][::2], request="half", timings=again)
    assert fitter.shared is statistics and not any("model cache" in stage for stage in again)  # the forget set only
    assert second.requests()[0]["name"] == "half" and second.requests()[0]["counts"]["forget"] < len(sets["forget"])
    fitter.add_erasure(sets["erasure"][:1])  # one more question: the statistics are made anew at the next need
    assert fitter.shared is not statistics and fitter.shared.key != statistics.key
    reused = EraserFitter.from_shared(model, processor, statistics, settings, progress=False)
    same_eraser(reused.fit(sets["forget"]), first)
    with pytest.raises(ValueError, match="from_shared"):
        reused.add_retain(sets["retain"])


def test_the_occluded_retain_copies_are_part_of_the_entry(testbed_model, sets, tmp_path):
    model, processor = testbed_model
    settings = FitSettings(occlusion=0.15)
    built = shared(model, processor, sets, settings, tmp_path)
    loaded = shared(model, processor, sets, settings, tmp_path)
    assert loaded.status == "loaded" and set(loaded.features) == {"retain", "retain_occluded", "calibration"}
    photos = sum(i.modality == "image" for i in sets["retain"])
    assert photos and loaded.features["retain_occluded"].shape[0] == 4 * photos  # one copy per edge
    assert torch.equal(loaded.features["retain_occluded"], built.features["retain_occluded"])
    cold = fit_eraser(model, processor, **sets, settings=settings, progress=False)
    warm = fit_eraser(model, processor, forget=sets["forget"], settings=settings, shared=loaded, progress=False)
    same_eraser(cold, warm)
    with pytest.raises(ValueError, match="occlusion"):  # an entry with copies is not one without, nor the reverse
        fit_eraser(model, processor, forget=sets["forget"], settings=FitSettings(), shared=loaded, progress=False)


def test_the_key_follows_the_data_the_settings_and_the_weights(testbed_model, sets, tmp_path):
    model, processor = testbed_model
    settings = FitSettings()
    key = shared(model, processor, sets, settings, tmp_path).key
    assert shared(model, processor, sets, settings, tmp_path).key == key  # the same inputs: the same entry
    # Settings that act on the closed forms only (strength, threshold budget) share the entry
    closed_forms_only = dataclasses.replace(settings, alpha=2.0, gate=KnnGate(max_fpr=0.05))
    assert shared(model, processor, sets, closed_forms_only, tmp_path).key == key
    changed_item = dataclasses.replace(sets["retain"][3], question=sets["retain"][3].question + " Really?")
    other_retain = {**sets, "retain": sets["retain"][:3] + [changed_item] + sets["retain"][4:]}
    keys = {key,
            shared(model, processor, other_retain, settings, tmp_path).key,
            shared(model, processor, {**sets, "erasure": sets["erasure"][1:]}, settings, tmp_path).key,
            shared(model, processor, {**sets, "calibration": None}, settings, tmp_path).key,
            shared(model, processor, sets, dataclasses.replace(settings, pooling="last"), tmp_path).key,
            shared(model, processor, sets, dataclasses.replace(settings, decision_layer=2), tmp_path).key,
            shared(model, processor, sets, dataclasses.replace(settings, occlusion=0.15), tmp_path).key}
    weight = next(model.parameters())
    with torch.no_grad():
        saved = weight.detach().clone()
        weight.add_(1e-2)
        try:
            keys.add(shared(model, processor, sets, settings, tmp_path).key)
        finally:
            weight.copy_(saved)
    assert len(keys) == 8
    assert len(cache.entries(tmp_path)) == 8


def test_statistics_of_other_settings_are_refused(testbed_model, sets, tmp_path):
    model, processor = testbed_model
    built = shared(model, processor, sets, FitSettings(), tmp_path)
    with pytest.raises(ValueError, match="decision_layer"):
        fit_eraser(model, processor, forget=sets["forget"], settings=FitSettings(decision_layer=2), shared=built,
                   progress=False)


def test_an_unreadable_entry_is_rebuilt(testbed_model, sets, tmp_path, caplog):
    model, processor = testbed_model
    settings = FitSettings()
    good = shared(model, processor, sets, settings, tmp_path)
    entry = cache.entry_path(tmp_path, good.key)
    entry.write_bytes(b"not a safetensors file")
    rebuilt = shared(model, processor, sets, settings, tmp_path)
    assert "unreadable" in caplog.text  # a warning on the library's logger (the CLI shows it on stderr)
    assert rebuilt.status == "built"
    assert torch.equal(cache.SharedStatistics.load(entry).features["retain"], good.features["retain"])


def test_entries_are_read_by_the_one_artifact_reader(tmp_path):
    """A good entry round-trips; a bad one is a one-line UserInputError naming the file from `load`, and its
    problem in the listing (which never fails on one bad file)."""
    stats = steering.SteeringStats(3, 4, [1, 2]).update("retain", torch.randn(5, 2, 4))
    good = cache.SharedStatistics("k" * 32, {"settings": {"family": "prompt"}}, stats, {"retain": torch.randn(5, 4)})
    good.save(tmp_path / "shared-good.safetensors")
    loaded = cache.SharedStatistics.load(tmp_path / "shared-good.safetensors")
    assert (loaded.key, loaded.identity, loaded.status) == (good.key, good.identity, "loaded")
    assert torch.equal(loaded.stats.sums["retain"], stats.sums["retain"])
    assert torch.equal(loaded.features["retain"], good.features["retain"])
    (tmp_path / "shared-garbage.safetensors").write_bytes(b"not a safetensors file")
    safetensors.torch.save_file({"x": torch.zeros(1)}, tmp_path / "shared-foreign.safetensors")
    safetensors.torch.save_file({"x": torch.zeros(1)}, tmp_path / "shared-old.safetensors",
                                metadata={cache.METADATA_KEY: json.dumps({"cache_version": 0})})
    safetensors.torch.save_file({"stats.shape": torch.tensor([3, 4])}, tmp_path / "shared-partial.safetensors",
                                metadata={cache.METADATA_KEY: json.dumps({"cache_version": cache.CACHE_VERSION,
                                                                          "key": "k", "identity": {}})})
    problems = {"garbage": "not a safetensors file (",
                "foreign": "not an mllmeraser model cache entry (no 'mllmeraser_cache' metadata)",
                "old": "cache version 0, expected 1",
                "partial": "model cache entry holds no valid statistics (state dict has no 'forget.count' entry)"}
    listed = {path.stem.removeprefix("shared-"): identity for path, _, identity in cache.entries(tmp_path)}
    assert listed.pop("good") == good.identity and listed.pop("partial") == {}  # its header is fine
    assert {name: identity["error"][:len(problems[name])] for name, identity in listed.items()} == \
        {name: problem for name, problem in problems.items() if name != "partial"}
    for name, problem in problems.items():
        path = tmp_path / f"shared-{name}.safetensors"
        with pytest.raises(UserInputError) as raised:
            cache.SharedStatistics.load(path)
        assert str(raised.value).startswith(f"{path}: {problem}") and "\n" not in str(raised.value)


def test_fit_reuses_the_cache_from_the_command_line_and_cache_clears_it(testbed_dir, tmp_path):
    base = [sys.executable, "-m", "mllmeraser.cli"]
    fit = base + ["fit", "--model", str(testbed_dir / "model"), "--data", str(testbed_dir / "data"),
                  "--forget", "forget_5", "--forget-ratio", "5", "--cache-dir", str(tmp_path / "cache")]
    outputs = []
    for name in ("cold", "warm"):
        result = subprocess.run(fit + ["--out", str(tmp_path / f"{name}.safetensors")], capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
        outputs.append(result.stdout)
    assert "model cache: built at" in outputs[0] and "model cache: loaded from" in outputs[1]
    assert "time: model cache (loaded)" in outputs[1] and "PGD recall" in outputs[1]
    assert (tmp_path / "cold.safetensors").read_bytes() == (tmp_path / "warm.safetensors").read_bytes()
    listed = subprocess.run(base + ["cache", "--cache-dir", str(tmp_path / "cache")], capture_output=True, text=True)
    assert listed.returncode == 0 and ": 1 entries" in listed.stdout and "prompt gate" in listed.stdout
    cleared = subprocess.run(base + ["cache", "--cache-dir", str(tmp_path / "cache"), "--clear"], capture_output=True,
                             text=True)
    assert cleared.returncode == 0 and "removed 1 model cache entries" in cleared.stdout
    assert not list((tmp_path / "cache").glob("*.safetensors"))


def test_pgd_early_stop_moves_only_the_items_not_yet_recalled(testbed_model, sets):
    model, processor = testbed_model
    items = [item for item in sets["forget"] if item.modality == "image"][:12]
    clean = models.encode_prompts(processor, items)["pixel_values"].float()
    full = pgd.pgd_images(model, processor, items, PGDSettings(stop_nll=None))
    inputs = models.encode_with_answers(processor, items)
    labels = inputs.pop("labels")
    inputs = models.forward_inputs(model, inputs)
    nll = pgd._answer_nll(model, inputs.pop("pixel_values").float(), labels, inputs, len(items),
                              list(range(len(items) + 1)), range(len(items)), len(items), torch.float32)
    threshold = float(nll.median())  # half the items count as recalled at their clean image
    stopped = pgd.pgd_images(model, processor, items, PGDSettings(stop_nll=threshold))
    for i, value in enumerate(nll.tolist()):
        if value <= threshold:
            assert torch.equal(stopped[i], clean[i]), f"item {i} (NLL {value:.4f}) moved"
        else:
            assert not torch.equal(stopped[i], clean[i]), f"item {i} (NLL {value:.4f}) did not move"
    # the first step of a moving item is the full PGD's first step: both images lie in the same eps ball
    assert float((stopped - clean).abs().max()) <= float((full - clean).abs().max()) + 1e-6
    # micro-batches of one item give the same images (each item's stop and steps are its own)
    single = pgd.pgd_images(model, processor, items, PGDSettings(stop_nll=threshold, batch_size=1))
    assert float((single - stopped).abs().gt(1e-5).float().mean()) < 1e-3
    # stop_nll 0 never stops: the paper's PGD
    assert torch.equal(pgd.pgd_images(model, processor, items, PGDSettings(stop_nll=0.0)), full)


# ---- the processing and the libraries are part of the key (a tiny random llava: no testbed needed) ----------


@pytest.fixture(scope="module")
def tiny_llava_dir(tmp_path_factory):
    from tiny_families import build_llava

    return build_llava(tmp_path_factory.mktemp("tiny-llava"))


def test_an_entry_of_other_processing_or_libraries_is_never_read(tiny_llava_dir, tmp_path, monkeypatch):
    import transformers
    from tiny_families import LLAVA_CHAT_TEMPLATE, make_items

    items = {"retain": make_items(0, 2), "erasure": make_items(2, 1), "calibration": None}
    settings = FitSettings(batch_size=8)

    def tiny_shared(model, processor):
        return shared(model, processor, items, settings, tmp_path)

    model, processor = models.load_model(tiny_llava_dir)
    built = tiny_shared(model, processor)
    assert built.status == "built" and set(built.identity["versions"]) == {"torch", "transformers", "mllmeraser"}
    # the same checkpoint loaded again: the same key, the entry is read (the key is stable across loads)
    reloaded = tiny_shared(*models.load_model(tiny_llava_dir))
    assert reloaded.status == "loaded" and reloaded.key == built.key

    keys, mean = {built.key}, list(processor.image_processor.image_mean)
    processor.image_processor.image_mean = [0.5, 0.5, 0.5]  # another normalisation: other image activations
    other_mean = tiny_shared(model, processor)
    assert other_mean.status == "built" and other_mean.key not in keys
    assert not torch.equal(other_mean.features["retain"], built.features["retain"])  # the old entry was stale
    keys.add(other_mean.key)
    processor.image_processor.image_mean = mean
    assert tiny_shared(model, processor).status == "loaded"  # back to the first settings: the first entry

    processor.chat_template = LLAVA_CHAT_TEMPLATE.replace("{{ message['role'].upper() + ': ' }}", "")  # no "USER:"
    other_template = tiny_shared(model, processor)
    assert other_template.status == "built" and other_template.key not in keys
    assert not torch.equal(other_template.features["retain"], built.features["retain"])
    keys.add(other_template.key)
    processor.chat_template = LLAVA_CHAT_TEMPLATE

    model.set_attn_implementation("eager")
    keys.add(tiny_shared(model, processor).key)
    model.set_attn_implementation("sdpa")
    monkeypatch.setattr(transformers, "__version__", "0.0.0")
    keys.add(tiny_shared(model, processor).key)
    assert len(keys) == 5 and len(cache.entries(tmp_path)) == 5
