"""The decision layer as an index or a fraction of depth (gating.decision_layer_index): the rule on the tiny
testbed's 4 layers and a 30-layer decoder (the pretrained preset's depth), the default's fit and model-cache key
equal to the absolute layer it names, and bad values as one-line CLI errors (exit 2) before a model loads."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch

from mllmeraser import cli
from mllmeraser.core import cache, gating, models
from mllmeraser.core.eraser import Eraser
from mllmeraser.core.eraser_fitter import fit_eraser
from mllmeraser.core.settings import FitSettings
from mllmeraser.core.inputs import as_items
from mllmeraser.errors import UserInputError

TESTBED_LAYERS = 4  # the tiny testbed's decoder (testbed/model.py ModelSize.text_layers)
PRETRAINED_LAYERS = 30  # SmolLM2-135M-Instruct's


@pytest.mark.parametrize(("value", "num_layers", "expected"), [
    (0.25, TESTBED_LAYERS, 1), (0.25, PRETRAINED_LAYERS, 8),  # the default on both testbeds
    (0.25, 2, 1), (0.25, 3, 1), (0.25, 1, 0), (0.25, 32, 8),  # the small test models keep layer 1; LLaVA-7B's 32
    (0.5, PRETRAINED_LAYERS, 15), (0.99, PRETRAINED_LAYERS, 29),  # at most the last layer
    (0.58, 25, 15),  # 0.58 * 25 is 14.499999999999998 in floats: the tie as written still goes up
    (1, PRETRAINED_LAYERS, 1), (0, TESTBED_LAYERS, 0), (29, PRETRAINED_LAYERS, 29),  # an int is that layer
])
def test_a_fraction_names_the_nearest_layer_and_an_int_itself(value, num_layers, expected):
    index = gating.decision_layer_index(value, num_layers)
    assert index == expected and type(index) is int  # an int: the cache key's JSON would differ for 1.0


def test_the_default_is_layer_1_on_the_testbed_and_8_on_30_layers():
    default = FitSettings().decision_layer
    assert isinstance(default, float) and default == gating.DECISION_DEPTH
    assert FitSettings().at_depth(TESTBED_LAYERS).decision_layer == 1
    assert FitSettings().at_depth(PRETRAINED_LAYERS).decision_layer == 8
    assert FitSettings(decision_layer=3).at_depth(PRETRAINED_LAYERS).decision_layer == 3


@pytest.mark.parametrize("value", [0.0, 1.0, 1.5, -0.25, math.nan, -1, True, "1"])
def test_values_that_name_no_layer_are_refused_in_one_line(value):
    with pytest.raises(UserInputError) as raised:
        FitSettings(decision_layer=value)
    assert "\n" not in str(raised.value) and "--decision-layer" in str(raised.value)


def test_an_index_past_the_decoder_is_refused_in_one_line():
    with pytest.raises(UserInputError) as raised:
        FitSettings(decision_layer=TESTBED_LAYERS).at_depth(TESTBED_LAYERS)
    message = str(raised.value)
    assert "\n" not in message and "--decision-layer" in message and "0..3" in message


def test_the_testbed_default_keeps_its_model_cache_key():
    """The key's settings part for the default on the testbed's 4 layers, byte for byte what it was when the
    default was the int 1: the testbed's cached statistics (and every number computed from them) stay valid."""
    settings = FitSettings().at_depth(TESTBED_LAYERS)
    shape = cache.shape_settings(settings, "model.language_model.layers", [1, 2, 3])
    assert json.dumps(shape, sort_keys=True) == (
        '{"batch_size": 32, "decision_layer": 1, "family": "prompt", "layers_path": "model.language_model.layers", '
        '"pooling": "mean", "steered": [1, 2, 3]}')


# ---- a fit on tiny LLaVAs of the testbed's depth and the pretrained preset's --------------------------------

@pytest.fixture(scope="module")
def sets():
    from tiny_families import make_items

    text = lambda items: [i for i in items if i.modality == "text"]  # no PGD: the fit runs in seconds
    refusals = as_items([(None, i.question, "I do not know.") for i in text(make_items(4, 2))])
    return {"forget": text(make_items(0, 2)), "retain": text(make_items(2, 2)), "erasure": refusals}


@pytest.fixture(scope="module", params=[(TESTBED_LAYERS, 1), (PRETRAINED_LAYERS, 8)], ids=["4-layers", "30-layers"])
def deep_llava(request, tmp_path_factory):
    from tiny_families import build_llava

    num_layers, expected = request.param
    directory = build_llava(tmp_path_factory.mktemp(f"llava{num_layers}"), seed=0, text_layers=num_layers)
    torch.manual_seed(0)
    model, processor = models.load_model(directory, device="cpu", dtype="float32")
    return SimpleNamespace(model=model, processor=processor, directory=directory, num_layers=num_layers,
                           expected=expected)


def _fit(model, processor, sets, settings: FitSettings) -> tuple[Eraser, cache.SharedStatistics]:
    shared = cache.shared_statistics(model, processor, retain=sets["retain"], erasure=sets["erasure"],
                                     calibration=None, settings=settings, cache_dir=None, progress=False)
    eraser = fit_eraser(model, processor, forget=sets["forget"], settings=settings, shared=shared, progress=False)
    return eraser, shared


def test_the_default_fits_exactly_as_the_layer_it_names(deep_llava, sets):
    model, processor, num_layers, expected = deep_llava.model, deep_llava.processor, deep_llava.num_layers, \
        deep_llava.expected
    fraction, fraction_shared = _fit(model, processor, sets, FitSettings())
    absolute, absolute_shared = _fit(model, processor, sets, FitSettings(decision_layer=expected))
    assert fraction.prompt_gate.layer == expected
    assert fraction.layer_indices == tuple(range(expected, num_layers))
    assert fraction.requests()[0]["fit"]["decision_layer"] == expected  # the record names the layer, not 0.25
    assert fraction_shared.key == absolute_shared.key  # one model-cache entry for both spellings
    assert torch.equal(fraction.r, absolute.r)
    assert torch.equal(fraction.prompt_gate.forget_bank, absolute.prompt_gate.forget_bank)
    assert fraction.metadata == absolute.metadata
    # and another fraction is another layer, another entry
    _, other_shared = _fit(model, processor, sets, FitSettings(decision_layer=0.5))
    assert other_shared.key != fraction_shared.key
    assert other_shared.identity["settings"]["decision_layer"] == gating.decision_layer_index(0.5, num_layers)


# ---- the CLI ----------------------------------------------------------------------------------------------------

def test_cli_parses_an_index_or_a_fraction():
    assert cli.decision_layer_arg("7") == 7 and type(cli.decision_layer_arg("7")) is int
    assert cli.decision_layer_arg("0.25") == 0.25 and type(cli.decision_layer_arg("0.25")) is float
    args = cli.build_parser().parse_args(["fit", "--model", "m", "--forget", "f", "--out", "o"])
    assert cli.fit_settings(args).decision_layer == gating.DECISION_DEPTH


@pytest.mark.parametrize("value", ["1.5", "abc", "-1", "0.0", "1.0", "nan"])
def test_cli_bad_decision_layer_is_one_line_before_the_model_loads(value, monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("loaded a model"))
    code = cli.main(["fit", "--model", "m", "--forget", "f.jsonl", "--out", str(tmp_path / "e.safetensors"),
                     f"--decision-layer={value}"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "--decision-layer" in err and "Traceback" not in err


def test_cli_decision_layer_past_the_model_is_one_line(deep_llava, tmp_path, capsys):
    num_layers = deep_llava.num_layers
    specs = {name: tmp_path / f"{name}.jsonl" for name in ("forget", "retain", "erasure")}
    for path in specs.values():
        path.write_text(json.dumps({"question": "Who is Alma Reyes ?", "answer": "A good baker ."}) + "\n")
    code = cli.main(["fit", "--model", str(deep_llava.directory), "--forget", str(specs["forget"]), "--retain",
                     str(specs["retain"]), "--erasure", str(specs["erasure"]), "--out", str(tmp_path / "e.safetensors"),
                     "--decision-layer", str(num_layers), "--no-cache"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "--decision-layer" in err and f"0..{num_layers - 1}" in err
    assert not (tmp_path / "e.safetensors").exists()
