"""What lets a 7B fit fit in memory, checked on tiny real-class checkpoints (tiny_families.py): PGD in
micro-batches and under activation checkpointing gives the same adversarial images, leaves every flag of the
model as it was, and statistics of the steered layers only give the same eraser."""

from __future__ import annotations


import types

import pytest
import torch
import torch.utils.checkpoint
from transformers.modeling_layers import GradientCheckpointingLayer

import tiny_families
from mllmeraser.bench import prompts
from mllmeraser.core import collection, models, solve, steering
from mllmeraser.core.decoder_layers import find_decoder_layers
from mllmeraser.core.pgd import pgd_images
from mllmeraser.core.settings import FitSettings, PaperGate, PGDSettings
from mllmeraser.bench.items import QAItem
from mllmeraser.errors import UserInputError

FAMILIES = list(tiny_families.BUILDERS)


@pytest.fixture(scope="module", params=FAMILIES)
def family(request, tmp_path_factory):
    directory = tiny_families.BUILDERS[request.param](tmp_path_factory.mktemp(request.param), seed=0)
    return models.load_model(directory)


@pytest.fixture(scope="module")
def image_items() -> list[QAItem]:
    """Four image questions of different lengths (so the batch is padded), one image each."""
    return [item for item in tiny_families.make_items(0, 2) if item.modality == "image"]


def pgd(model, processor, items, **settings) -> torch.Tensor:
    """Two steps of PGD on every item (no early stop: its no-grad check forwards would join `seen` below)."""
    settings = PGDSettings(eps=8 / 255, step=2 / 255, steps=2, **{"stop_nll": None, **settings})
    return pgd_images(model, processor, items, settings)


def flags(model) -> list[tuple]:
    """Every module's training flag and checkpointing attributes (present or not, and which function)."""
    return [(name, module.training, module.__dict__.get("gradient_checkpointing", "unset"),
             module.__dict__.get("_gradient_checkpointing_func", "unset")) for name, module in model.named_modules()]


def test_pgd_in_micro_batches_equals_the_whole_batch(family, image_items):
    """Each item's step is the sign of its own gradient, and each micro-batch's loss divides by the whole batch's
    answer tokens: micro-batches of 1, 3 (4 = 3 + 1: a ragged last one) and 4 agree per item."""
    model, processor = family
    whole = pgd(model, processor, image_items, batch_size=len(image_items), checkpointing=False)
    clean = models.encode_prompts(processor, image_items)["pixel_values"].float()
    assert not torch.equal(whole, clean)
    for size in (1, 3):
        split = pgd(model, processor, image_items, batch_size=size, checkpointing=False)
        assert split.shape == whole.shape
        # a sign flip on a near-zero gradient moves a pixel by 2 steps; none is expected, a few are tolerated
        moved = (split - whole).abs() > 1e-5
        assert float(moved.float().mean()) < 1e-3, f"batch_size={size}: {int(moved.sum())} values differ"


def test_checkpointing_gives_the_same_images_and_restores_every_flag(family, image_items, monkeypatch):
    model, processor = family
    calls = []
    real_checkpoint = torch.utils.checkpoint.checkpoint

    def counting_checkpoint(function, *args, **kwargs):
        calls.append(kwargs.get("use_reentrant"))
        return real_checkpoint(function, *args, **kwargs)

    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", counting_checkpoint)
    _, layers = find_decoder_layers(model)
    seen = []  # during PGD: the block's training and checkpointing flags, and its attention module's training flag
    handle = layers[0].register_forward_hook(
        lambda module, args, output: seen.append((module.training, module.gradient_checkpointing,
                                                  module.self_attn.training, torch.is_grad_enabled())))
    before = flags(model)
    try:
        plain = pgd(model, processor, image_items, batch_size=2, checkpointing=False)
        assert not calls and all(entry == (False, False, False, True) for entry in seen)
        seen.clear()
        checkpointed = pgd(model, processor, image_items, batch_size=2, checkpointing=True)
    finally:
        handle.remove()
    # every block, the vision tower's too, checkpointed (non-reentrant) in each of 2 steps x 2 micro-batches
    blocks = sum(isinstance(m, GradientCheckpointingLayer) for m in model.modules())
    assert blocks > len(layers) and len(calls) == 2 * 2 * blocks and set(calls) == {False}
    # the block runs checkpointed (its own training flag on), its attention stays in eval mode: no dropout
    assert seen and all(entry == (True, True, False, True) for entry in seen)
    assert flags(model) == before and not model.training
    assert all(p.grad is None for p in model.parameters())
    torch.testing.assert_close(checkpointed, plain, rtol=0, atol=1e-6)


def test_checkpointing_keeps_a_users_own_setting(family, image_items):
    """A model already in train mode, with checkpointing enabled by its user (their function), keeps both."""
    model, processor = family
    _, layers = find_decoder_layers(model)
    used = []

    def users_function(function, *args, **kwargs):
        used.append(1)
        return torch.utils.checkpoint.checkpoint(function, *args, use_reentrant=False, **kwargs)

    model.train()
    layers[0].gradient_checkpointing = True
    layers[0]._gradient_checkpointing_func = users_function
    before = flags(model)
    try:
        pgd(model, processor, image_items[:2], batch_size=2, checkpointing=True)
        assert flags(model) == before and model.training and used
    finally:
        model.eval()
        del layers[0].gradient_checkpointing, layers[0]._gradient_checkpointing_func


def test_pgd_settings_are_validated():
    with pytest.raises(UserInputError, match="batch_size must be >= 1"):
        PGDSettings(batch_size=0)
    with pytest.raises(UserInputError, match="steps must be >= 0"):
        PGDSettings(steps=-1)
    assert PGDSettings() == PGDSettings(8 / 255, 2 / 255, 10, None, None)  # positional order kept


def test_pgd_defaults_split_and_checkpoint_only_at_scale():
    def model_of_width(width):
        config = types.SimpleNamespace(get_text_config=lambda: types.SimpleNamespace(hidden_size=width))
        return types.SimpleNamespace(config=config)

    small = PGDSettings().resolved(model_of_width(64), 32)
    assert (small.batch_size, small.checkpointing) == (32, False)  # the testbed: one batch, nothing recomputed
    large = PGDSettings().resolved(model_of_width(4096), 32)
    assert (large.batch_size, large.checkpointing) == (8, True)  # LLaVA-1.5-7B: a quarter of PGD's memory
    chosen = PGDSettings(batch_size=3, checkpointing=False).resolved(model_of_width(4096), 32)
    assert (chosen.batch_size, chosen.checkpointing) == (3, False)  # what the user sets is kept


def test_statistics_of_the_steered_layers_give_the_eraser_of_every_layer(family):
    """fit_statistics holds only the steered layers (1..L-1 for the paper gate; settings.layers when given);
    the eraser solved from them equals, bit for bit, the one solved from every layer's statistics."""
    model, processor = family
    forget, retain = tiny_families.make_items(0, 2), tiny_families.make_items(2, 2)
    erasure = [QAItem(i.subject_id, i.task, i.modality, i.question, prompts.REFUSAL_ANSWER, i.options, i.image)
               for i in tiny_families.make_items(4, 2) if i.task != "classification"]
    names, layers = find_decoder_layers(model)
    d = model.config.get_text_config().hidden_size
    steered = tuple(range(len(layers) - 1, 0, -1))  # the default 1..L-1, given in decreasing order
    settings = FitSettings(gate=PaperGate(), pgd=PGDSettings(steps=1), batch_size=8, layers=steered)
    stats, path, _ = collection.fit_statistics(model, processor, forget=forget, retain=retain, erasure=erasure,
                                            settings=settings, progress=False)
    assert stats.layers == tuple(range(1, len(layers)))  # held in increasing order; layer 0 is not held
    assert stats.gram("forget").shape == (len(layers) - 1, d, d) and stats.device == torch.device("cpu")
    every = steering.SteeringStats(len(layers), d)
    # the forget pass as the fit runs it: the recall (PGD) and clean activations from PGD's own forwards
    collection.collect(model, processor, layers, forget, every, ("recall", "forget"), 8, "", settings.pgd, False,
                    clean_groups=("forget",))
    for items, groups in ((retain, ("retain",)), (erasure, ("erasure",))):
        collection.collect(model, processor, layers, items, every, groups, 8, "", None, False)
    fitted = solve.solve_eraser(stats, settings, path, {})
    reference = solve.solve_eraser(every, settings, path, {})
    assert fitted.layer_indices == reference.layer_indices == steered
    assert torch.equal(fitted.u, reference.u) and torch.equal(fitted.r, reference.r)
    with pytest.raises(UserInputError, match="distinct decoder layers"):
        collection.fit_statistics(model, processor, forget=forget, retain=retain, erasure=erasure, progress=False,
                               settings=FitSettings(gate=PaperGate(), layers=(1, 1)))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_statistics_on_a_gpu_equal_the_cpu_ones():
    generator = torch.Generator().manual_seed(0)
    acts = torch.randn(50, 3, 64, generator=generator, dtype=torch.float64)
    cpu = steering.SteeringStats(4, 64, layers=[1, 2, 3]).update("forget", acts).update("retain", acts[:20] - 1)
    gpu = steering.SteeringStats(4, 64, layers=[1, 2, 3], device="cuda").update("forget", acts.float())
    gpu.update("retain", acts[:20] - 1)
    assert gpu.grams["forget"].device.type == "cuda"
    torch.testing.assert_close(gpu.grams["forget"].cpu(), cpu.grams["forget"], rtol=1e-6, atol=1e-6)
    u_gpu = steering.solve_gates(gpu, "ridge", beta=1.0, lam=1e-3).cpu()
    torch.testing.assert_close(u_gpu, steering.solve_gates(cpu, "ridge", beta=1.0, lam=1e-3), rtol=1e-5, atol=1e-8)
