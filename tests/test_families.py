"""The harness on real model families: tiny random-weight checkpoints of their real transformers classes
(LLaVA-1.5 as llava-hf lays it out, Qwen2.5-VL, Qwen2-VL; see tiny_families.py), saved and loaded offline
through `models.load_model`, then driven through encoding, generation, capture, steering, scoring, PGD and
a whole fit."""

from __future__ import annotations

import math
import types

import pytest
import torch
from PIL import Image

import tiny_families
from mllmeraser.bench import evaluate, prompts
from mllmeraser.core import attachment, families, micro_batches, models, pgd
from mllmeraser.core.decoder_layers import find_decoder_layers
from mllmeraser.core.capture import capture, capture_last_token
from mllmeraser.core.settings import FitSettings, KnnGate, PaperGate, PGDSettings
from mllmeraser.bench.items import QAItem
from mllmeraser.core.eraser import Eraser
from mllmeraser.core.eraser_fitter import fit_eraser
from mllmeraser.errors import UserInputError

FAMILIES = list(tiny_families.BUILDERS)
IMAGE_TOKENS = 4  # llava: (28 / 14)^2 patches; qwen: a 4x4 patch grid merged 2x2
VISION_MODULES = {"llava": "model.vision_tower", "qwen2_5_vl": "model.visual", "qwen2_vl": "model.visual"}


@pytest.fixture(scope="module", params=FAMILIES)
def family(request, tmp_path_factory):
    name = request.param
    directory = tiny_families.BUILDERS[name](tmp_path_factory.mktemp(name), seed=0)
    model, processor = models.load_model(directory)
    _, layers = find_decoder_layers(model)
    return types.SimpleNamespace(name=name, model=model, processor=processor, layers=layers,
                                 text_config=model.config.get_text_config())


@pytest.fixture(scope="module")
def items() -> list[QAItem]:
    return tiny_families.make_items(0, 4)


def select(items, modality, task=None):
    return [i for i in items if i.modality == modality and (task is None or i.task == task)]


def last_logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(**models.forward_inputs(model, batch)).logits[:, -1].float()


def prompt_and_answer(model, processor, items):
    """Left-padded prompts, then left-padded " answer" tokens: a batch has padding holes BETWEEN prompt and
    answer (harder on positions than encode_with_answers, which right-pads the answer block)."""
    batch = models.encode_prompts(processor, items)
    answers = processor.tokenizer([" " + item.answer for item in items], add_special_tokens=False,
                                  padding=True, return_tensors="pt")
    input_ids = torch.cat([batch["input_ids"], answers["input_ids"]], dim=1)
    attention = torch.cat([batch["attention_mask"], answers["attention_mask"]], dim=1)
    labels = input_ids.clone()
    labels[:, : batch["input_ids"].shape[1]] = -100
    labels[attention == 0] = -100
    return models.forward_inputs(model, {**batch, "input_ids": input_ids, "attention_mask": attention}), labels


def answer_loss(model, processor, items, pixel_values=None) -> float:
    """The mean answer NLL that pgd.pgd_images descends (models.encode_with_answers)."""
    inputs = models.forward_inputs(model, models.encode_with_answers(processor, items))
    labels = inputs.pop("labels")
    if pixel_values is not None:
        inputs["pixel_values"] = pixel_values
    with torch.no_grad():
        return model(**inputs, labels=labels).loss.item()


def random_eraser(family, seed: int = 0, scale: float = 1.0) -> Eraser:
    generator = torch.Generator().manual_seed(seed)
    num_layers, d = len(family.layers), family.text_config.hidden_size
    u = torch.randn(1, num_layers, d, generator=generator) / math.sqrt(d)
    r = torch.randn(1, num_layers, d, generator=generator) * scale
    return Eraser(u=u, r=r, alpha=1.0, layer_indices=range(num_layers), layers_path="model.language_model.layers",
                  hidden_size=d)


# ---- loading and layers -------------------------------------------------------------------------------------

def test_load_model_gives_the_real_classes(family):
    expected = {"llava": ("LlavaForConditionalGeneration", "LlavaProcessor"),
                "qwen2_5_vl": ("Qwen2_5_VLForConditionalGeneration", "Qwen2_5_VLProcessor"),
                "qwen2_vl": ("Qwen2VLForConditionalGeneration", "Qwen2VLProcessor")}[family.name]
    assert family.model.config.model_type == family.name
    assert type(family.model).__name__ == expected[0]
    assert type(family.processor).__name__ == expected[1]
    assert family.processor.tokenizer.padding_side == "left"
    assert family.processor.tokenizer.pad_token is not None
    assert not family.model.training


def test_the_registry_loads_exactly_the_families_tested_here(tmp_path):
    assert set(families.LOADABLE) == set(tiny_families.BUILDERS)
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')  # hookable, but not an image-text model
    with pytest.raises(UserInputError, match="model_type 'llama' is not supported"):
        models.load_model(tmp_path)


def test_decoder_layers_are_the_language_decoder(family):
    names, layers = find_decoder_layers(family.model)
    assert len(layers) == family.text_config.num_hidden_layers
    assert all(name.startswith("model.language_model.layers.") for name in names)
    vision = family.model.get_submodule(VISION_MODULES[family.name])
    vision_ids = {id(module) for module in vision.modules()}
    assert not vision_ids & {id(module) for layer in layers for module in layer.modules()}
    for layer in layers:
        assert "Vision" not in type(layer).__name__ and "DecoderLayer" in type(layer).__name__
        assert layer.self_attn.q_proj.in_features == family.text_config.hidden_size


# ---- encoding and generation --------------------------------------------------------------------------------

@pytest.mark.parametrize("modality", ["image", "text"])
def test_encode_prompts_left_pads(family, items, modality):
    chosen = select(items, modality, "classification")
    batch = models.encode_prompts(family.processor, chosen)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    lengths = mask.sum(1)
    assert len(set(lengths.tolist())) > 1, "the test items should have different lengths"
    assert bool(mask[:, -1].all()), "left padding: every row ends with a real token"
    assert bool((mask[lengths < ids.shape[1], 0] == 0).all())
    image_token = family.model.config.image_token_id
    per_row = (ids == image_token).sum(1)
    if modality == "image":
        assert "pixel_values" in batch
        assert per_row.tolist() == [IMAGE_TOKENS] * len(chosen)
        if family.name != "llava":
            assert batch["image_grid_thw"].tolist() == [[1, 4, 4]] * len(chosen)
            assert batch["pixel_values"].shape == (16 * len(chosen), 3 * 2 * 14 * 14)
    else:
        assert "pixel_values" not in batch and int(per_row.sum()) == 0
    text = models.chat_text(family.processor, chosen[0].prompt, modality == "image")
    if family.name == "llava":  # LLaVA-1.5: "USER: <image>\n<prompt> ASSISTANT:"
        assert text == f"USER: {'<image>' + chr(10) if modality == 'image' else ''}{chosen[0].prompt} ASSISTANT:"
    else:  # ChatML with Qwen's vision markers
        image = "<|vision_start|><|image_pad|><|vision_end|>" if modality == "image" else ""
        assert text.endswith(f"<|im_start|>user\n{image}{chosen[0].prompt}<|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.parametrize("modality", ["image", "text"])
def test_batched_generation_equals_one_by_one(family, items, modality):
    chosen = select(items, modality, "generation" if modality == "image" else "cloze")
    config = family.model.generation_config
    default, config.min_new_tokens = config.min_new_tokens, 6  # a random model may say EOS at once: go on
    try:
        batched = models.generate(family.model, family.processor, chosen, max_new_tokens=6)
        single = [models.generate(family.model, family.processor, [item], max_new_tokens=6)[0] for item in chosen]
    finally:
        config.min_new_tokens = default
    assert all(isinstance(answer, str) for answer in batched)
    assert batched == single
    assert any(batched), "a random model still says something"


@pytest.mark.parametrize("modality", ["image", "text"])
def test_capture_under_left_padding_equals_per_item(family, items, modality):
    chosen = select(items, modality, "classification")
    batch = models.encode_prompts(family.processor, chosen)
    assert len(set(batch["attention_mask"].sum(1).tolist())) > 1
    batched = capture_last_token(family.model, family.layers, **models.forward_inputs(family.model, batch))
    assert batched.shape == (len(chosen), len(family.layers), family.text_config.hidden_size)
    for index, item in enumerate(chosen):
        one = models.encode_prompts(family.processor, [item])
        single = capture_last_token(family.model, family.layers, **models.forward_inputs(family.model, one))
        torch.testing.assert_close(batched[index], single[0], atol=1e-5, rtol=1e-4)


def test_qwen_mrope_positions_follow_the_attention_mask(family, items):
    """Qwen-VL numbers its 3-D rope positions itself, from mm_token_type_ids, image_grid_thw and the attention
    mask (forward_inputs adds no position_ids for it): a left-padded row gets the positions it gets alone."""
    if family.name == "llava":
        pytest.skip("LLaVA has 1-D positions; forward_inputs numbers them from the attention mask")
    chosen = select(items, "image", "classification")
    batch = models.forward_inputs(family.model, models.encode_prompts(family.processor, chosen))
    assert "position_ids" not in batch
    rope_inputs = ("input_ids", "mm_token_type_ids", "image_grid_thw", "attention_mask")
    positions, _ = family.model.model.get_rope_index(**{k: batch[k] for k in rope_inputs})
    for index, item in enumerate(chosen):
        one = models.encode_prompts(family.processor, [item])
        alone, _ = family.model.model.get_rope_index(**{k: one[k] for k in rope_inputs})
        mask = batch["attention_mask"][index].bool()
        assert torch.equal(positions[:, index, mask], alone[:, 0])
        assert int(alone[:, 0, -1].max()) < alone.shape[-1] - 1  # the image's 2x2 grid shares positions


def test_forward_inputs_positions_with_padding_holes(family, items):
    """With pads between prompt and answer, the answer's logits must not depend on them (positions counted
    from the attention mask; a plain arange would put a gap between prompt and answer)."""
    chosen = select(items, "image", "generation")
    with torch.no_grad():
        inputs, _ = prompt_and_answer(family.model, family.processor, chosen)
        batched = family.model(**inputs).logits[:, -1]
        for index, item in enumerate(chosen):
            one, _ = prompt_and_answer(family.model, family.processor, [item])
            torch.testing.assert_close(batched[index], family.model(**one).logits[0, -1], atol=1e-4, rtol=1e-4)


def test_forward_inputs_pads_modality_ids_to_appended_tokens(family, items):
    """pgd_images appends answer tokens to an encoded prompt; Qwen-VL's per-token modality ids must follow."""
    batch = models.encode_prompts(family.processor, select(items, "image", "generation")[:2])
    extra = torch.full((2, 3), 7, dtype=batch["input_ids"].dtype)
    grown = {**batch, "input_ids": torch.cat([batch["input_ids"], extra], 1),
             "attention_mask": torch.cat([batch["attention_mask"], torch.ones_like(extra)], 1)}
    inputs = models.forward_inputs(family.model, grown)
    if "mm_token_type_ids" in batch:
        assert inputs["mm_token_type_ids"].shape == inputs["input_ids"].shape
        assert torch.equal(inputs["mm_token_type_ids"][:, : batch["input_ids"].shape[1]], batch["mm_token_type_ids"])
        assert int(inputs["mm_token_type_ids"][:, -3:].abs().sum()) == 0
    with torch.no_grad():
        family.model(**inputs)


# ---- steering and scoring -----------------------------------------------------------------------------------

@pytest.mark.parametrize("modality", ["image", "text"])
def test_eraser_changes_logits_and_removal_restores_them(family, items, modality):
    batch = models.encode_prompts(family.processor, select(items, modality, "classification"))
    clean = last_logits(family.model, batch)
    handle = random_eraser(family).attach(family.model)
    try:
        steered = last_logits(family.model, batch)
    finally:
        handle.remove()
    assert not torch.allclose(steered, clean, atol=1e-4)
    assert torch.equal(last_logits(family.model, batch), clean)
    assert not hasattr(family.model, attachment.ATTACHED_MARKER)


def test_score_items_gives_fractions(family, items):
    chosen = items[:8]  # two subjects: every task and modality
    metrics = evaluate.score_items(family.model, family.processor, chosen, batch_size=4, progress=False)
    for key in ("classification_image", "classification_text", "cloze_text", "rougeL_image", "bleu_image",
                "refusal_rate"):
        assert key in metrics
    assert all(0.0 <= value <= 1.0 for value in metrics.values()), metrics


# ---- PGD ----------------------------------------------------------------------------------------------------

def test_pixel_value_bounds_bracket_the_processor(family):
    """Constant-colour images: white must sit exactly on `high`, black on `low`, elementwise (CLIP's per-channel
    means and stds differ, so a wrong channel layout within Qwen's flattened patches would not match)."""
    processor = family.processor
    text = models.chat_text(processor, "What is this ?", with_image=True)
    values = {}
    for name, colour in (("white", (255, 255, 255)), ("black", (0, 0, 0)), ("grey", (128, 128, 128)),
                         ("red", (255, 0, 0))):
        image = Image.new("RGB", (tiny_families.IMAGE_SIZE, tiny_families.IMAGE_SIZE), colour)
        values[name] = processor(text=[text], images=[image], return_tensors="pt")["pixel_values"].float()
    low, high, scale = models.pixel_value_bounds(processor, values["white"])
    assert low.shape == high.shape == scale.shape == values["white"].shape
    torch.testing.assert_close(values["white"], high, atol=1e-4, rtol=0)
    torch.testing.assert_close(values["black"], low, atol=1e-4, rtol=0)
    torch.testing.assert_close((values["grey"] - low) / scale, torch.full_like(low, 128 / 255), atol=1e-4, rtol=0)
    torch.testing.assert_close(scale * (high - low), scale * scale, atol=1e-4, rtol=1e-4)  # high - low = 1/std
    red = values["red"]
    assert bool(((red - high).abs() < 1e-4).logical_or((red - low).abs() < 1e-4).all())
    assert math.isclose(float(((red - high).abs() < 1e-4).float().mean()), 1 / 3, abs_tol=1e-6)


def test_pgd_images_stays_in_budget_lowers_loss_and_touches_no_parameter(family, items):
    model, processor = family.model, family.processor
    chosen = select(items, "image", "generation")
    vision = model.get_submodule(VISION_MODULES[family.name])
    frozen = {id(p) for p in vision.parameters()}
    for p in model.parameters():  # a mix of flags, to check each is restored
        p.requires_grad_(id(p) not in frozen)
    flags = [p.requires_grad for p in model.parameters()]
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    settings = PGDSettings(eps=8 / 255, step=2 / 255, steps=5)
    try:
        adversarial = pgd.pgd_images(model, processor, chosen, settings)
        assert [p.requires_grad for p in model.parameters()] == flags
    finally:
        for p in model.parameters():
            p.requires_grad_(True)
    assert all(torch.equal(p, before[name]) for name, p in model.named_parameters())
    assert all(p.grad is None for p in model.parameters())
    clean = models.encode_prompts(processor, chosen)["pixel_values"].float()
    assert adversarial.shape == clean.shape
    low, high, scale = models.pixel_value_bounds(processor, clean)
    assert bool(((adversarial - clean).abs() <= settings.eps * scale + 1e-5).all())
    assert bool((adversarial >= low - 1e-5).all()) and bool((adversarial <= high + 1e-5).all())
    assert not torch.equal(adversarial, clean)
    assert answer_loss(model, processor, chosen, adversarial) < answer_loss(model, processor, chosen)


def test_pgd_reads_what_prompt_only_forwards_would(family, items):
    """The fit reads its activations from PGD's own teacher-forced forwards (pgd.pgd_recall): the clean
    activations and pooled features are a clean prompt-only forward's, the recall activations a prompt-only
    forward's at the final images; items the early stop keeps at their clean image keep the clean reading."""
    model, processor, layers = family.model, family.processor, family.layers
    chosen = select(items, "image")
    batch = models.encode_prompts(processor, chosen)
    assert len(set(batch["attention_mask"].sum(1).tolist())) > 1  # padding: the prompt ends at different columns
    inputs = models.forward_inputs(model, models.encode_with_answers(processor, chosen))
    labels = inputs.pop("labels")
    pixels = inputs.pop("pixel_values").float()
    offsets = micro_batches.pixel_offsets(inputs, len(chosen), pixels.shape[0])
    nll = pgd._answer_nll(model, pixels, labels, inputs, len(chosen), offsets, range(len(chosen)), len(chosen),
                              torch.float32)
    with torch.no_grad():  # the NLL the early stop reads is the model's own loss, item by item
        whole = model(**models.forward_inputs(model, models.encode_with_answers(processor, chosen))).loss
    counts = (labels[:, 1:] != -100).sum(1)
    torch.testing.assert_close((nll * counts).sum() / counts.sum(), whole, atol=1e-5, rtol=1e-5)
    settings = PGDSettings(steps=3, stop_nll=float(nll.median()))
    result = pgd.pgd_recall(model, processor, chosen, settings, pgd.RecallRead(layers, 1, "mean"))

    def prompt_only(pixel_values):
        encoded = dict(batch, pixel_values=pixel_values)
        return capture(model, layers, 1, "mean", **models.forward_inputs(model, encoded))

    clean_last, clean_pooled = prompt_only(batch["pixel_values"])
    torch.testing.assert_close(result.clean, clean_last, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(result.clean_pooled, clean_pooled, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(result.recall, prompt_only(result.images)[0], atol=1e-5, rtol=1e-4)
    clean_pixels = batch["pixel_values"].float()
    moved = [not torch.equal(result.images[a:b], clean_pixels[a:b]) for a, b in zip(offsets, offsets[1:])]
    assert moved == [value > settings.stop_nll for value in nll.tolist()] and 0 < sum(moved) < len(chosen)
    for index, item_moved in enumerate(moved):
        assert torch.equal(result.recall[index], result.clean[index]) != item_moved


# ---- a whole fit --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("gate", ["knn", "paper"])
def test_fit_eraser_end_to_end(family, gate):
    forget = tiny_families.make_items(0, 2)
    retain = tiny_families.make_items(2, 2)
    erasure = [QAItem(i.subject_id, i.task, i.modality, i.question, prompts.REFUSAL_ANSWER, i.options, i.image)
               for i in tiny_families.make_items(4, 2) if i.task != "classification"]
    # knn: with the occluded copies, so each family's image processor takes the covered photos
    settings = FitSettings(gate=KnnGate() if gate == "knn" else PaperGate(), pgd=PGDSettings(steps=2), batch_size=8,
                           occlusion=0.15 if gate == "knn" else 0.0)
    eraser = fit_eraser(family.model, family.processor, forget=forget, retain=retain, erasure=erasure, settings=settings,
                        progress=False)
    num_layers, d = len(family.layers), family.text_config.hidden_size
    assert eraser.r.shape == (1, num_layers - 1, d)
    assert eraser.layer_indices == tuple(range(1, num_layers))  # the paper's 1..L-1; the prompt gate decides at 1
    assert eraser.layers_path == "model.language_model.layers"
    assert bool(torch.isfinite(eraser.r).all())
    assert eraser.fingerprint["model_type"] == family.name
    counts = eraser.metadata["requests"][0]["counts"]
    assert counts["recall"] == len(forget) and counts["erasure"] == len(erasure)
    if gate == "paper":
        assert eraser.u.shape == eraser.r.shape and bool(torch.isfinite(eraser.u).all())
        assert counts["forget"] == 2 * len(forget) and counts["retain"] == len(retain)
    else:
        assert eraser.u is None and eraser.prompt_gate.layer == 1
        assert counts["forget"] == len(forget) and counts["retain"] == len(retain)
        photos = sum(i.modality == "image" for i in forget)  # each also in the bank with each edge covered
        assert photos and counts["forget_occluded"] == 4 * photos
        assert eraser.prompt_gate.forget_bank.shape == (len(forget) + 4 * photos, d)
        record = eraser.requests()[0]["gate"]
        assert record["calibration_prompts"] == len(retain) and record["calibration_fpr"] <= settings.gate.max_fpr
        assert record["forget_fire_rate"] == 1.0  # every fitted forget prompt is its own nearest neighbour
    batch = models.encode_prompts(family.processor, select(forget, "image"))
    clean = last_logits(family.model, batch)
    with eraser.with_alpha(50.0).attach(family.model):
        steered = last_logits(family.model, batch)
    assert not torch.equal(steered, clean)
    assert torch.equal(last_logits(family.model, batch), clean)
