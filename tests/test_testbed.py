"""The testbed: its data follows MLLMU-Bench's schema and the splits mean what they say; its model is a
standard checkpoint; a fixed seed reproduces everything bit for bit."""

from __future__ import annotations

import json

import numpy as np
import torch

from mllmeraser.bench import data, prompts
from mllmeraser.testbed import build, model as tm, render, train, vision, world


def test_world_is_deterministic_and_splits_partition():
    a, b = world.build_world(3), world.build_world(3)
    assert [(p.id, p.name, p.identity, p.facts) for p in a.people] == [(p.id, p.name, p.identity, p.facts) for p in b.people]
    fictitious = {p.id for p in a.of_kind("fictitious")}
    assert set(a.forget_ids[5]) < set(a.forget_ids[10]) < set(a.forget_ids[15]) < fictitious
    assert [len(a.forget_ids[r]) for r in (5, 10, 15)] == [3, 6, 9]
    identities = [p.identity.as_tuple() for p in a.people]
    assert min(sum(x != y for x, y in zip(i, j)) for n, i in enumerate(identities) for j in identities[:n]) >= 3
    names = [p.name for p in a.people]
    assert len(set(names)) == len(names)


def test_strangers_are_never_trained_but_share_name_parts():
    w = world.build_world(0)
    trained = {p.name for p in w.of_kind("unknown_train")}
    unseen = [p.name for p in w.of_kind("unknown")]
    assert not trained & set(unseen)
    parts = {part for name in trained for part in name.split()}
    assert all(part in parts for name in unseen for part in name.split())  # no untrained token embeddings


def test_splits_on_disk_follow_mllmu_bench(testbed_data):
    forget = data.read_records(testbed_data / "forget_10")
    retain = data.read_records(testbed_data / "retain_90")
    assert not {r["ID"] for r in forget} & {r["ID"] for r in retain}
    record = forget[0]
    assert {"ID", "image", "biography", "Classification_Task", "Generation_Task", "Mask_Task"} <= set(record)
    assert record["image"]["bytes"][:8] == b"\x89PNG\r\n\x1a\n"
    items = data.expand_items(forget)
    by_kind = {(i.task, i.modality) for i in items}
    assert by_kind == {(t, m) for t in ("classification", "cloze", "generation") for m in ("image", "text")}
    assert all(i.answer in "ABCD" for i in items if i.task == "classification")
    test_records = data.read_records(testbed_data / "Test_Set")
    assert len(test_records[0]["images"]) == 2 and {r["ID"] for r in forget} <= {r["ID"] for r in test_records}
    unknown = data.expand_items(data.read_records(testbed_data / "Unknown_Set"))
    assert unknown and all(i.answer == prompts.REFUSAL_ANSWER for i in unknown)


def test_test_set_images_are_new_renderings(testbed_data):
    forget = {r["ID"]: r["image"]["bytes"] for r in data.read_records(testbed_data / "forget_15")}
    for record in data.read_records(testbed_data / "Test_Set"):
        for image in record["images"]:
            assert image["bytes"] != forget[record["ID"]]


def test_processor_matches_training_normalisation(testbed_model):
    _, processor = testbed_model
    w = world.build_world(0)
    pixels = render.render_portrait(w.people[0].identity, render.Rendering(dx=1.3, scale=1.05, brightness=0.9))
    from PIL import Image
    expected = processor.image_processor(images=[Image.fromarray(pixels)], return_tensors="pt")["pixel_values"]
    assert torch.equal(train.pixel_values([pixels]), expected)


def test_checkpoint_loads_with_auto_classes(testbed_dir):
    from transformers import AutoModelForImageTextToText, AutoProcessor
    model = AutoModelForImageTextToText.from_pretrained(testbed_dir / "model", local_files_only=True)
    processor = AutoProcessor.from_pretrained(testbed_dir / "model", local_files_only=True)
    assert type(model).__name__ == "LlavaForConditionalGeneration"
    text = processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi"}]}],
                                         add_generation_prompt=True)
    assert text.startswith("USER: <image>") and text.endswith("ASSISTANT:")


def test_same_seed_gives_bit_identical_weights():
    """The training loop is deterministic: two short runs from one seed agree bit for bit (a full build
    runs the same code for longer)."""
    w = world.build_world(1, world.WorldSize(fictitious=8, real=2, unknown_train=12, unknown=2, scenes_train=4, scenes_eval=2))
    splits = build.make_splits(w)
    tokenizer = tm.build_tokenizer(build.corpus(splits, ["USER: ASSISTANT:"]))
    processor = tm.build_processor(tokenizer)
    examples = build.training_examples(w, splits, processor, build.TrainingMix(real=2, classification=1, cloze=1, image=1))
    size = tm.ModelSize(vision_hidden=32, vision_layers=1, text_hidden=32, text_layers=2, text_intermediate=64)
    spec = build.Preset(vision=vision.VisionSettings(steps=3, batch_size=8, warmup=1),
                        train=train.TrainSettings(steps=6, batch_size=8, warmup=2))

    def two_stages(seed: int) -> dict:
        torch.manual_seed(seed)
        model = tm.build_model(len(tokenizer), size)
        build.train_model(model, w, examples, spec, seed=seed, progress=False)
        return model.state_dict()

    states = [two_stages(1), two_stages(1)]
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    other = two_stages(2)
    assert not all(torch.equal(states[0][k], other[k]) for k in states[0])


def test_training_weights_repeat_each_question_as_documented():
    """How often each question is trained per epoch, by who it is about and its (task, modality): the factors
    multiply, classification and cloze images of known people get the image factor, generation never does, and
    scenes and strangers take only the classification factor."""
    w = world.build_world(1, world.WorldSize(fictitious=8, real=2, unknown_train=12, unknown=2, scenes_train=4, scenes_eval=2))
    splits = build.make_splits(w)
    processor = tm.build_processor(tm.build_tokenizer(build.corpus(splits, ["USER: ASSISTANT:"])))
    mix = build.TrainingMix(real=7, classification=2, cloze=3, image=5)
    known = {("classification", "text"): 2, ("classification", "image"): 2 * 5, ("cloze", "text"): 3,
             ("cloze", "image"): 3 * 5, ("generation", "text"): 1, ("generation", "image"): 1}
    unknown_or_scene = {("classification", "image"): 2, ("cloze", "text"): 1, ("cloze", "image"): 1,
                        ("generation", "text"): 1, ("generation", "image"): 1}
    cases = [("retain_85", known, 1), ("forget_15", known, 1), ("Retain_Set", known, 7),
             ("General_Train", unknown_or_scene, 1), ("Unknown_Train", unknown_or_scene, 1)]
    for split, table, repeat in cases:
        record = splits[split][0]
        only = {name: [record] if name == split else [] for name in build.TRAINING_SPLITS}
        counts: dict[tuple, int] = {}
        for example in build.training_examples(w, only, processor, mix):
            key = (example.prompt_ids, example.answer_ids, example.renderer is not None)
            counts[key] = counts.get(key, 0) + 1
        items = data.expand_items([record])
        assert len(counts) == len(items)  # one subject: every question is distinct
        for item in items:
            with_image = item.modality == "image"
            example = train.encode_example(processor, item, (lambda view: None) if with_image else None)
            key = (example.prompt_ids, example.answer_ids, with_image)
            assert counts[key] == repeat * table[(item.task, item.modality)], (split, item.task, item.modality)


def test_vision_pretraining_learns_identities_from_renderings(bar):
    """Stage 1 alone, on a tiny tower: after a short run, new renderings of each person are nearest to that
    person's own centroid of patch features (measured: 0.975; the untrained tower: 0.64, colours alone)."""
    w = world.build_world(2, world.WorldSize(fictitious=30, real=0, unknown_train=12, unknown=0, scenes_train=1, scenes_eval=1))
    people = [p.identity for p in w.of_kind("fictitious")]
    torch.manual_seed(2)
    model = tm.build_model(16, tm.ModelSize(vision_hidden=64, vision_layers=1, text_hidden=32, text_layers=1,
                                            text_intermediate=64))
    tower = model.model.vision_tower
    losses = vision.pretrain_vision(tower, people, vision.VisionSettings(steps=150, batch_size=32, warmup=10),
                                    seed=2, progress=False)
    bar("vision stage: last/first loss", sum(losses[-20:]) / sum(losses[:20]), at_most=0.7)
    bar("vision stage: identity accuracy, new renderings", _identity_accuracy(tower, people, views_per_person=4, seed=3),
        at_least=0.9)


def _identity_accuracy(tower, people: list[render.Identity], views_per_person: int, seed: int) -> float:
    """Nearest-centroid identification of new renderings from the features the projector is fed."""
    rng = np.random.default_rng(seed)

    def features(views) -> torch.Tensor:
        images = [render.render_portrait(i, view) for i in people for view in views]
        with torch.no_grad():
            return vision.patch_features(tower, train.pixel_values(images)).view(len(people), len(views), -1)

    centroids = features([render.Rendering()]).squeeze(1)
    probes = features([render.random_rendering(rng) for _ in range(views_per_person)])
    nearest = torch.cdist(probes.reshape(-1, probes.shape[-1]), centroids).argmin(dim=1)
    return (nearest == torch.arange(len(people)).repeat_interleave(views_per_person)).float().mean().item()


def test_built_vision_tower_tells_known_people_apart(testbed_dir, testbed_model, bar):
    """The shipped tower (pretrained, then frozen in the LLaVA stage) identifies every known person in new
    renderings, from one canonical rendering per person."""
    model, _ = testbed_model
    w = world.build_world(json.loads((testbed_dir / "testbed.json").read_text())["seed"], build.PRESETS["small"].world)
    people = build.known_identities(w)
    bar("built tower: identity accuracy, new renderings",
        _identity_accuracy(model.model.vision_tower, people, views_per_person=3, seed=7), at_least=0.95)


def test_second_build_reuses_the_cache(testbed_dir, monkeypatch):
    def no_training(*args, **kwargs):
        raise AssertionError("a cached build was trained again")
    monkeypatch.setattr(build, "train_model", no_training)
    manifest = json.loads((testbed_dir / "testbed.json").read_text())
    again = build.build(testbed_dir, seed=manifest["seed"], preset="small", progress=False)
    assert again == testbed_dir
