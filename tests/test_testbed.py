"""The testbed: its data follows MLLMU-Bench's schema and the splits mean what they say; its model is a
standard checkpoint; a fixed seed reproduces everything bit for bit."""

from __future__ import annotations

import torch

from mllmeraser import data, prompts
from mllmeraser.testbed import build, model as tm, render, train, world


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
    examples = build.training_examples(w, splits, processor, real_weight=2)
    size = tm.ModelSize(vision_hidden=32, vision_layers=1, text_hidden=32, text_layers=2, text_intermediate=64)
    settings = train.TrainSettings(steps=6, batch_size=8, warmup=2)
    states = []
    for _ in range(2):
        torch.manual_seed(1)
        model = tm.build_model(len(tokenizer), size)
        train.train(model, examples, settings, seed=1, progress=False)
        states.append(model.state_dict())
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    torch.manual_seed(2)
    other = tm.build_model(len(tokenizer), size)
    train.train(other, examples, settings, seed=2, progress=False)
    assert not all(torch.equal(states[0][k], other.state_dict()[k]) for k in states[0])


def test_second_build_reuses_the_cache(testbed_dir):
    import time
    started = time.perf_counter()
    again = build.build(seed=0, preset="small", progress=False)
    assert again == testbed_dir and time.perf_counter() - started < 5
