"""`compare` trains every baseline trial on the one loaded model and takes the adapter out again: the base weights
stay bit for bit, and a trial on the reused base gives what it would on a fresh load. Its erasure inputs and
protocol come from the command line (`--erasure`, `--protocol`), and a data set without Unknown_Train is a
one-line error before any model loads."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from mllmeraser import cli
from mllmeraser.bench import baselines, compare, data
from mllmeraser.bench.data import REPORT_SPLITS, VALIDATION_SPLIT
from mllmeraser.core import models
from mllmeraser.errors import UserInputError

LRS = (3e-4, 1e-3)


def a_few(items: list, per_kind: int = 2) -> list:
    """The first `per_kind` classification and cloze questions of each modality (short answers: a quick test)."""
    kinds: dict[tuple, list] = {}
    for item in items:
        if item.task != "generation":
            kinds.setdefault((item.task, item.modality), []).append(item)
    return [item for group in kinds.values() for item in group[:per_kind]]


@pytest.fixture(scope="module")
def harness(testbed_dir):
    """A compare harness on the small testbed with a two-point GA grid, its question sets cut to a few each."""
    settings = compare.CompareSettings(methods=("vanilla", "ga"), baseline_lrs=LRS, baseline_epochs=1, batch_size=16)
    h = compare.Harness(testbed_dir / "model", testbed_dir / "data", settings, progress=False)
    h.questions = {split: a_few(h.questions[split]) for split in ("forget", "retain", "real", VALIDATION_SPLIT)}
    h.forget, h.retain_fit = a_few(h.forget, 4), a_few(h.retain_fit, 4)
    return h


def test_baseline_trials_reuse_the_model_and_leave_it_bit_identical(harness, testbed_dir):
    h = harness
    base = {name: tensor.clone() for name, tensor in h.model.state_dict().items()}
    model = h.model
    result = compare.run_baseline(h, "ga", vanilla_val=0.0)  # every grid point keeps utility: the strongest wins
    assert h.model is model  # the same object: nothing was loaded
    after = h.model.state_dict()
    assert after.keys() == base.keys() and all(torch.equal(after[name], base[name]) for name in base)
    assert not any("lora" in name for name, _ in h.model.named_modules())
    assert [(p["lr"], p["x"]) for p in result.curve] == [(lr, 1) for lr in LRS]

    # the second learning rate trained on the base the first trial left behind: a fresh load gives the same point
    fresh, _ = models.load_model(testbed_dir / "model")
    second = baselines.BaselineSettings("ga", lr=LRS[1], epochs=1, seed=h.settings.seed)
    peft_model = baselines.train_baseline(fresh, h.processor, h.forget, h.retain_fit, second, progress=False)
    point = h.evaluate(peft_model, splits=("forget", "retain", VALIDATION_SPLIT))
    assert {"x": 1, "lr": LRS[1], "forget_nll": baselines.answer_nll(peft_model, h.processor, h.forget), **point} \
        == result.curve[1]
    # and the chosen setting, retrained a third time on the same base, measures as on a fresh load
    fresh = baselines.strip_lora(peft_model)
    chosen = baselines.BaselineSettings(**{k: result.settings[k] for k in asdict(second)})
    peft_model = baselines.train_baseline(fresh, h.processor, h.forget, h.retain_fit, chosen, progress=False)
    assert h.evaluate(peft_model, splits=REPORT_SPLITS) == result.results


def test_no_unknown_train_and_no_erasure_is_an_error_before_loading(testbed_data, tmp_path, monkeypatch):
    for split_dir in ("forget_10", "Test_Set", "retain_90", "Retain_Set"):  # what the real benchmark has
        (tmp_path / split_dir).symlink_to(testbed_data / split_dir)
    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("loaded a model"))
    for methods in (("vanilla", "eraser"), ("vanilla", "refuse")):  # refuse fits the eraser's gate when alone
        settings = compare.CompareSettings(methods=methods)
        with pytest.raises(UserInputError) as raised:
            compare.run_compare(Path("unused"), tmp_path, tmp_path / "out", settings, progress=False)
        message = str(raised.value)
        assert "\n" not in message and "Unknown_Train" in message and "--erasure SPEC" in message
        assert str(tmp_path) in message
    refusals = data.erasure_items(str(testbed_data / "Unknown_Train"), tmp_path)  # what --erasure SPEC reads
    assert refusals == data.default_erasure_items(testbed_data)


def test_cli_passes_protocol_and_erasure_to_compare_and_demo(monkeypatch, tmp_path):
    seen = []
    monkeypatch.setattr(compare, "run_compare", lambda model, data_dir, out, settings, **kw: seen.append(settings) or {})
    monkeypatch.setattr(cli.compare, "print_summary", lambda summary, out: None)
    assert cli.main(["compare", "--model", "m", "--data", "d", "--protocol", "mllmu", "--erasure", "refusals.jsonl",
                     "--out", str(tmp_path)]) == 0
    assert seen[-1].protocol == "mllmu" and seen[-1].erasure == "refusals.jsonl"
    assert cli.main(["compare", "--model", "m", "--data", "d", "--out", str(tmp_path)]) == 0
    assert seen[-1].protocol == "testbed" and seen[-1].erasure is None  # the defaults
    import mllmeraser.testbed.preset_build as testbed_build  # what `demo` builds the testbed with
    monkeypatch.setattr(testbed_build, "build", lambda **kw: tmp_path)
    assert cli.main(["demo", "--erasure", "Unknown_Set", "--out", str(tmp_path)]) == 0
    assert seen[-1].erasure == "Unknown_Set" and seen[-1].protocol == "testbed"
    args = cli.build_parser().parse_args(["eval", "--model", "m", "--data", "d", "--protocol", "mllmu"])
    assert args.protocol == "mllmu"
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["eval", "--model", "m", "--data", "d", "--protocol", "official"])
