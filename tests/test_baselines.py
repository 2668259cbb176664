"""mllmeraser.bench.baselines on a tiny LLaVA (testbed architecture and processor) that first learns a small world of
facts: the losses' values at initialisation, what one epoch of each method does, that only LoRA trains, the
adapter files, determinism."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from mllmeraser.bench import baselines
from mllmeraser.core import models
from mllmeraser.bench.baselines import BaselineSettings
from mllmeraser.bench.items import QAItem
from mllmeraser.errors import UserInputError
from mllmeraser.testbed import model as tm

TINY = tm.ModelSize(vision_hidden=32, vision_layers=1, text_hidden=48, text_layers=2, text_heads=2, text_intermediate=96)
CITIES = ["Paris", "Oslo", "Lima", "Rome", "Cairo", "Quito"]
JOBS = ["baker", "pilot", "nurse", "judge", "miner", "tailor"]
NAMES = ["Ada", "Ben", "Cleo", "Dev", "Eva", "Finn", "Gus", "Hana", "Ivo", "Jun"]


def portrait(index: int) -> Image.Image:
    rng = np.random.default_rng(index)
    return Image.fromarray(rng.integers(0, 256, (tm.render.SIZE, tm.render.SIZE, 3), dtype=np.uint8))


def person_items(index: int) -> list[QAItem]:
    name, city, job = NAMES[index], CITIES[index % len(CITIES)], JOBS[(index * 5) % len(JOBS)]
    subject, image = f"p{index}", portrait(index)
    letters = "ABCD"
    options = {letter: CITIES[(index + k) % len(CITIES)] for k, letter in enumerate(letters)}
    return [
        QAItem(subject, "generation", "text", f"Where does {name} live?", f"{name} lives in {city}."),
        QAItem(subject, "generation", "text", f"What is the job of {name}?", f"{name} works as a {job}."),
        QAItem(subject, "cloze", "image", "This person lives in __.", city, None, image),
        QAItem(subject, "classification", "image", "Where does this person live?", "A", options, image),
    ]


FORGET = [item for i in range(3) for item in person_items(i)]
RETAIN = [item for i in range(3, 10) for item in person_items(i)]


@pytest.fixture(scope="module")
def processor():
    texts = [item.prompt + " " + item.answer for item in FORGET + RETAIN] + ["USER: ASSISTANT:"]
    processor = tm.build_processor(tm.build_tokenizer(texts))
    models.prepare_processor(processor)
    return processor


@pytest.fixture(scope="module")
def learned_state(processor) -> dict[str, torch.Tensor]:
    """Weights of a tiny LLaVA trained (all parameters) until it knows the forget and retain answers."""
    torch.manual_seed(0)
    model = tm.build_model(len(processor.tokenizer), TINY).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    groups = [[(FORGET + RETAIN)[i] for i in indices] for indices in models.batches(FORGET + RETAIN, 16)]
    encoded = [models.encode_with_answers(processor, group) for group in groups]
    for _ in range(25):
        for batch in encoded:
            loss = model(**models.forward_inputs(model, batch)).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture
def model(processor, learned_state):
    fresh = tm.build_model(len(processor.tokenizer), TINY)
    fresh.load_state_dict(learned_state)
    return fresh.eval()


def settings(method: str, **changes) -> BaselineSettings:
    return BaselineSettings(method=method, **{"lr": 1e-2, "epochs": 1, "batch_size": 2, **changes})


def mean_ce(model, processor, items: list[QAItem]) -> float:
    """Token-mean answer CE over `items` (batched like training), computed by the model's own HF loss."""
    total, tokens = 0.0, 0
    with torch.no_grad():
        for indices in models.batches(items, 8):
            batch = models.encode_with_answers(processor, [items[i] for i in indices])
            n = int((batch["labels"][:, 1:] != -100).sum())
            total += model(**models.forward_inputs(model, batch)).loss.item() * n
            tokens += n
    return total / tokens


def image_and_text_batches(processor) -> tuple[dict, dict, dict]:
    forget_batch = models.encode_with_answers(processor, [FORGET[0], FORGET[1], FORGET[4], FORGET[5]])
    forget_image = models.encode_with_answers(processor, [FORGET[2], FORGET[6]])
    retain_batch = models.encode_with_answers(processor, [RETAIN[0], RETAIN[1], RETAIN[4]])
    return forget_batch, forget_image, retain_batch


# ---- inputs and LoRA placement -----------------------------------------------------------------------------

def test_encode_with_answers_labels_exactly_the_answer_and_eos(processor):
    batch = models.encode_with_answers(processor, [FORGET[2], RETAIN[3]])  # image cloze + image classification
    assert set(batch) >= {"input_ids", "attention_mask", "labels", "pixel_values"}
    tokenizer = processor.tokenizer
    for row, item in enumerate([FORGET[2], RETAIN[3]]):
        labelled = batch["labels"][row][batch["labels"][row] != -100].tolist()
        assert labelled == tokenizer(" " + item.answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        prompt = models.encode_prompts(processor, [item])["input_ids"][0].tolist()
        real = batch["input_ids"][row][batch["attention_mask"][row] == 1].tolist()
        assert real == prompt + labelled  # prompt then answer, no padding between them
    text = models.encode_with_answers(processor, FORGET[:2])
    assert "pixel_values" not in text
    with pytest.raises(ValueError):
        models.encode_with_answers(processor, [FORGET[0], FORGET[2]])


def test_lora_on_all_linears_but_lm_head_and_only_lora_trains(model):
    peft_model = baselines.wrap_lora(model, settings("ga"))
    targets = {name for name, module in model.named_modules() if hasattr(module, "lora_A")}  # LoRA injected in place
    assert not any("lm_head" in name or "embed" in name for name in targets)
    assert any(".vision_tower." in name for name in targets)
    assert any(".multi_modal_projector." in name for name in targets)
    assert any(".language_model.layers.1.mlp.down_proj" in name for name in targets)
    linears = {name for name, module in model.named_modules()
               if isinstance(module, torch.nn.Linear) and ".lora_" not in name}
    assert linears - {name + ".base_layer" for name in targets} == {"lm_head"}  # every linear but lm_head
    layer = model.get_submodule(next(iter(targets)))
    assert layer.r["default"] == 16 and layer.scaling["default"] == 1.0
    assert layer.lora_dropout["default"].p == 0.05
    trainable = {name for name, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in name for name in trainable)
    assert len(trainable) == 2 * len(targets)


# ---- the losses ----------------------------------------------------------------------------------------------

def hand_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean over answer tokens of -log softmax(logits at t)[token t+1], by explicit loops."""
    terms = []
    for row in range(labels.shape[0]):
        for t in range(labels.shape[1] - 1):
            target = int(labels[row, t + 1])
            if target != -100:
                terms.append(-torch.log_softmax(logits[row, t].double(), dim=-1)[target])
    return torch.stack(terms).mean()


def test_losses_at_initialisation(model, processor):
    forget_batch, forget_image, retain_batch = image_and_text_batches(processor)
    base_logits = {}
    with torch.no_grad():
        for name, batch in (("forget", forget_batch), ("image", forget_image), ("retain", retain_batch)):
            inputs = models.forward_inputs(model, {k: v for k, v in batch.items() if k != "labels"})
            base_logits[name] = model(**inputs).logits
    forget_ce = hand_ce(base_logits["forget"], forget_batch["labels"])
    image_ce = hand_ce(base_logits["image"], forget_image["labels"])
    retain_ce = hand_ce(base_logits["retain"], retain_batch["labels"])
    # the model's own HF loss agrees with the hand computation
    with torch.no_grad():
        hf = model(**models.forward_inputs(model, forget_batch)).loss
    assert hf.item() == pytest.approx(forget_ce.item(), abs=1e-5)

    peft_model = baselines.wrap_lora(model, settings("ga")).train()  # dropout on: B = 0 makes it irrelevant
    with torch.no_grad():
        ga = baselines.method_loss(peft_model, settings("ga"), forget_batch)
        ga_image = baselines.method_loss(peft_model, settings("ga"), forget_image)
        gd = baselines.method_loss(peft_model, settings("graddiff", retain_weight=0.7), forget_batch, retain_batch)
        kl = baselines.method_loss(peft_model, settings("kl", retain_weight=0.7), forget_batch, retain_batch)
        npo = baselines.method_loss(peft_model, settings("npo", npo_beta=0.4), forget_batch)
        npo_image = baselines.method_loss(peft_model, settings("npo", npo_beta=0.9), forget_image)
    assert ga.item() == pytest.approx(-forget_ce.item(), abs=1e-5)
    assert ga_image.item() == pytest.approx(-image_ce.item(), abs=1e-5)
    assert gd.item() == pytest.approx(-forget_ce.item() + 0.7 * retain_ce.item(), abs=1e-5)
    assert kl.item() == pytest.approx(-forget_ce.item(), abs=1e-5)  # KL(p_theta || p_vanilla) = 0 at B = 0
    assert npo.item() == pytest.approx(2 / 0.4 * math.log(2), abs=1e-5)
    assert npo_image.item() == pytest.approx(2 / 0.9 * math.log(2), abs=1e-5)
    assert forget_ce.item() < 1.0 < math.log(len(processor.tokenizer))  # the model did learn the answers


def test_loss_functions_against_definitions():
    torch.manual_seed(1)
    current, reference = torch.randn(2, 5, 7), torch.randn(2, 5, 7)
    labels = torch.tensor([[-100, -100, 3, 4, 1], [-100, -100, -100, 2, 6]])
    p, q = torch.softmax(current[:, :-1], -1), torch.softmax(reference[:, :-1], -1)
    kl_by_position = (p * (p.log() - q.log())).sum(-1)
    mask = labels[:, 1:] != -100
    assert baselines.answer_kl(current, reference, labels).item() == pytest.approx(kl_by_position[mask].mean().item(), rel=1e-5)
    assert baselines.answer_kl(current, current, labels).item() == 0.0
    nll = baselines.sequence_nll(current, labels)
    assert nll[1].item() == pytest.approx(-(torch.log_softmax(current[1, 3], -1)[6] + torch.log_softmax(current[1, 2], -1)[2]).item(), rel=1e-5)
    assert baselines.mean_answer_ce(current, labels).item() == pytest.approx(nll.sum().item() / 5, rel=1e-5)
    # NPO: the paper's -(2/beta) log sigmoid(-beta log(pi_theta / pi_ref)), log pi = -S
    s_theta, s_ref, beta = torch.tensor([3.0, 1.0], requires_grad=True), torch.tensor([2.0, 1.5]), 0.5
    log_ratio = -s_theta + s_ref
    paper = -(2 / beta) * torch.log(torch.sigmoid(-beta * log_ratio)).mean()
    ours = baselines.npo_loss(s_theta, s_ref, beta)
    assert ours.item() == pytest.approx(paper.item(), rel=1e-6)
    ours.backward()
    assert (s_theta.grad < 0).all()  # descending the loss raises the forget answers' NLL
    assert baselines.ga_loss(torch.tensor(2.0)).item() == -2.0
    assert baselines.graddiff_loss(torch.tensor(2.0), torch.tensor(0.5), 2.0).item() == -1.0
    assert baselines.kl_loss(torch.tensor(2.0), torch.tensor(0.25), 4.0).item() == -1.0


# ---- training --------------------------------------------------------------------------------------------

def test_ga_epoch_raises_forget_ce_and_leaves_base_weights(model, processor):
    base = {k: v.clone() for k, v in model.state_dict().items()}
    before = mean_ce(model, processor, FORGET)
    epochs_seen = []
    peft_model = baselines.train_baseline(model, processor, FORGET, RETAIN, settings("ga"), progress=False,
                                          on_epoch=lambda epoch, m: epochs_seen.append((epoch, m.training)))
    assert epochs_seen == [(1, False)]
    assert not peft_model.training
    after = mean_ce(peft_model, processor, FORGET)
    assert after > before + 1.0
    assert any(p.abs().sum() > 0 for n, p in peft_model.named_parameters() if "lora_B" in n)
    with peft_model.disable_adapter():
        assert mean_ce(peft_model, processor, FORGET) == pytest.approx(before, abs=1e-6)
    with pytest.raises(ValueError, match="strip_lora"):  # no LoRA stacked on LoRA by accident
        baselines.wrap_lora(model, settings("ga"))
    base_model = baselines.strip_lora(peft_model)
    assert base_model.state_dict().keys() == base.keys()
    assert all(torch.equal(v, base[k]) for k, v in base_model.state_dict().items())
    assert mean_ce(base_model, processor, FORGET) == pytest.approx(before, abs=1e-6)


def test_retain_terms_keep_retain_ce_closer_to_start_than_ga(model, processor, bar):
    start = mean_ce(model, processor, RETAIN)
    drift, forget_rise = {}, {}
    forget_start = mean_ce(model, processor, FORGET)
    for method in ("ga", "graddiff", "kl", "npo"):
        peft_model = baselines.train_baseline(model, processor, FORGET, RETAIN, settings(method), progress=False)
        drift[method] = abs(mean_ce(peft_model, processor, RETAIN) - start)
        forget_rise[method] = mean_ce(peft_model, processor, FORGET) - forget_start
        model = baselines.strip_lora(peft_model)
    # same lr and steps: the retain term holds retain CE far closer to its start (measured: GA +2.60,
    # GradDiff +0.34, KL +0.51), while every method still raises the forget CE
    bar("retain CE drift, GradDiff / GA", drift["graddiff"] / drift["ga"], at_most=0.5)
    bar("retain CE drift, KL / GA", drift["kl"] / drift["ga"], at_most=0.75)  # 0.20 (Intel) to 0.60 (AMD, 1 thread)
    for method, rise in forget_rise.items():
        bar(f"forget CE rise, {method}", rise, at_least=0.05)


def test_same_seed_gives_bit_identical_lora_weights(model, processor):
    def lora_weights(peft_model):
        return {n: p.detach().clone() for n, p in peft_model.named_parameters() if "lora_" in n}

    first = baselines.train_baseline(model, processor, FORGET, RETAIN, settings("graddiff"), progress=False)
    weights = lora_weights(first)
    model = baselines.strip_lora(first)
    second = baselines.train_baseline(model, processor, FORGET, RETAIN, settings("graddiff"), progress=False)
    again = lora_weights(second)
    assert weights.keys() == again.keys()
    assert all(torch.equal(weights[n], again[n]) for n in weights)
    model = baselines.strip_lora(second)
    other = lora_weights(baselines.train_baseline(model, processor, FORGET, RETAIN, settings("graddiff", seed=1), progress=False))
    assert not all(torch.equal(weights[n], other[n]) for n in weights)


def test_bad_settings_and_inputs_are_user_errors(model, processor):
    with pytest.raises(UserInputError, match="unknown baseline"):
        BaselineSettings(method="dpo")
    with pytest.raises(UserInputError, match="beta"):
        BaselineSettings(method="npo", npo_beta=0.0)
    with pytest.raises(UserInputError, match="forget"):
        baselines.train_baseline(model, processor, [], RETAIN, settings("ga"), progress=False)
    text_only_retain = [item for item in RETAIN if item.modality == "text"]
    with pytest.raises(UserInputError, match="no image questions"):
        baselines.train_baseline(model, processor, FORGET, text_only_retain, settings("kl"), progress=False)


# ---- adapter files ---------------------------------------------------------------------------------------

def test_adapter_round_trip_gives_identical_logits(model, processor, learned_state, tmp_path):
    peft_model = baselines.train_baseline(model, processor, FORGET, RETAIN, settings("npo"), progress=False)
    batch = models.forward_inputs(peft_model, {k: v for k, v in models.encode_with_answers(processor, FORGET[2:4]).items()
                                                 if k != "labels"})
    with torch.no_grad():
        trained_logits = peft_model(**batch).logits
    directory = baselines.save_adapter(peft_model, tmp_path / "npo")
    baselines.save_adapter(peft_model, tmp_path / "npo")  # overwriting an adapter is fine
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left behind
    from safetensors import safe_open
    with safe_open(str(directory / "adapter_model.safetensors"), "pt") as fh:
        keys = list(fh.keys())
    assert keys and all("lora_" in key for key in keys)  # the base weights never reach the disk

    fresh = tm.build_model(len(processor.tokenizer), TINY)
    fresh.load_state_dict(learned_state)
    loaded = baselines.load_adapter(fresh.eval(), directory)
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, trained_logits)


def test_load_adapter_rejects_what_is_not_an_adapter(model, tmp_path):
    with pytest.raises(UserInputError, match="no such adapter directory"):
        baselines.load_adapter(model, tmp_path / "missing")
    with pytest.raises(UserInputError, match="not a LoRA adapter directory"):
        baselines.load_adapter(model, tmp_path)
    (tmp_path / "adapter_config.json").write_text("{ not json")
    (tmp_path / "adapter_model.safetensors").write_bytes(b"junk")
    with pytest.raises(UserInputError, match="cannot load the adapter"):
        baselines.load_adapter(model, tmp_path)


def test_pgd_images_runs_on_shared_teacher_forcing(model, processor):
    from mllmeraser.core.pgd import pgd_images
    from mllmeraser.core.settings import PGDSettings
    items = [FORGET[2], FORGET[6]]
    clean = models.encode_prompts(processor, items)["pixel_values"]
    adversarial = pgd_images(model, processor, items, PGDSettings(steps=2))
    assert adversarial.shape == clean.shape
    assert (adversarial - clean).abs().max().item() <= 8 / 255 / 0.5 + 1e-6


# ---- the real families (LLaVA-1.5 layout, Qwen2-VL, Qwen2.5-VL), tiny and saved like checkpoints ----------

@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "qwen2_5_vl"])
def test_every_family_trains_on_answer_tokens_only(family, tmp_path):
    import tiny_families

    directory = tiny_families.BUILDERS[family](tmp_path / family, seed=0)
    model, processor = models.load_model(directory)
    forget, retain = tiny_families.make_items(0, 2), tiny_families.make_items(2, 2)
    image_batch = models.encode_with_answers(processor, [i for i in forget if i.modality == "image"])
    for key in ("mm_token_type_ids", "token_type_ids"):
        if key in image_batch:
            assert image_batch[key].shape == image_batch["input_ids"].shape
    with torch.no_grad():
        full = model(**models.forward_inputs(model, image_batch)).loss  # HF's own answer-token mean CE
    peft_model = baselines.wrap_lora(model, settings("npo"))
    targets = {name for name, module in model.named_modules() if hasattr(module, "lora_A")}
    assert "lm_head" not in targets and not any("embed" in name for name in targets)
    assert any("visual" in name or "vision_tower" in name for name in targets)
    with torch.no_grad():
        ga = baselines.method_loss(peft_model, settings("ga"), image_batch)  # through logits_to_keep
        npo = baselines.method_loss(peft_model, settings("npo"), image_batch)
    assert ga.item() == pytest.approx(-full.item(), abs=1e-4)
    assert npo.item() == pytest.approx(2 / 0.5 * math.log(2), abs=1e-5)
    model = baselines.strip_lora(peft_model)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    trained = baselines.train_baseline(model, processor, forget, retain, settings("kl", batch_size=4), progress=False)
    assert any(p.abs().sum() > 0 for n, p in trained.named_parameters() if "lora_B" in n)
    assert all(torch.equal(v, base[k]) for k, v in baselines.strip_lora(trained).state_dict().items())
