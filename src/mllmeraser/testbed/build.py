"""`mllmeraser testbed build`: write the benchmark as MLLMU-Bench parquet, train the model, save both.

Layout of a build directory (written to a temporary sibling, then renamed, so a build is whole or absent):
    data/<split>/train-00000-of-00001.parquet   forget_5/10/15, retain_95/90/85, Test_Set, Retain_Set,
                                                General_Set, Unknown_Set, and the training-only
                                                Unknown_Train and General_Train
    model/                                      save_pretrained checkpoint + processor
    testbed.json                                manifest: seed, preset, sizes, timings, final loss
"""

from __future__ import annotations

import io
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image

from ..bench.data import PARQUET_NAME, expand_items
from ..core import models
from ..core.cache import cache_root
from . import model as tm
from . import render, train, vision, world

BUILD_VERSION = 7


@dataclass(frozen=True)
class TrainingMix:
    """How many times each question is repeated in an epoch of the LLaVA stage; the factors multiply."""

    real: int = 2  # real people: pre-existing, well-learned knowledge
    classification: int = 2  # a letter is one token seen once an epoch: give it the exposures a fact gets
    # A known person's one-fact questions (classification, cloze) are what the bars measure; their answers are 2-3
    # tokens, where a generation answer restates the question around the same fact in ~8, so under a per-token
    # loss they get a small share of the gradient. Measured (full builds): with cloze and image at 1, retain
    # image classification 0.91-0.93 and text cloze 0.985; image x2 on every image question lifted image
    # classification to 1.00 but cost text cloze (0.92: fewer epochs for the text questions); the two factors
    # below: 0.996 and 1.00.
    cloze: int = 2  # a known person's cloze questions, both modalities
    image: int = 2  # a known person's image classification and cloze questions: the image path underfits


@dataclass(frozen=True)
class Preset:
    world: world.WorldSize = field(default_factory=world.WorldSize)
    model: tm.ModelSize = field(default_factory=tm.ModelSize)
    vision: vision.VisionSettings = field(default_factory=vision.VisionSettings)
    train: train.TrainSettings = field(default_factory=train.TrainSettings)
    mix: TrainingMix = field(default_factory=TrainingMix)


PRESETS = {
    "full": Preset(),
    # The shared fixture of the test suite: fewer people, a shorter schedule. Its vision stage stays at 1,000
    # steps and its cloze and image factors at 1: measured on this preset, 2,000 steps gave forget image
    # classification 0.85 and general 0.81, against 1.00 and 0.92; the full preset's mix gave 1.00 on every
    # person split but general 0.81 and stranger refusal 0.92 (a bigger epoch over a 3,500-step schedule).
    "small": Preset(world=world.WorldSize(fictitious=40, real=6, unknown_train=24, unknown=6,
                                          scenes_train=40, scenes_eval=16),
                    vision=vision.VisionSettings(steps=1000), mix=TrainingMix(cloze=1, image=1),
                    train=train.TrainSettings(steps=3500)),
}


PRETRAINED_PRESET = "pretrained"  # built by pretrained_build.py, not a Preset of this module


def default_build_dir(seed: int, preset: str) -> Path:
    return cache_root() / f"testbed-v{BUILD_VERSION}-{preset}-seed{seed}"


def is_built(directory: Path) -> bool:
    return (directory / "testbed.json").is_file() and (directory / "model" / "config.json").is_file()


def is_current(directory: Path, seed: int, preset: str, version: int) -> bool:
    """Whether `directory` holds a finished build of this seed, preset and build version (reused as it is)."""
    if not is_built(directory):
        return False
    manifest = json.loads((directory / "testbed.json").read_text())
    return manifest.get("seed") == seed and manifest.get("preset") == preset and manifest.get("version") == version


def publish(tmp: Path, directory: Path, manifest: dict) -> None:
    """Write the manifest into the finished build at `tmp` and rename it to `directory` (replacing an old one)."""
    (tmp / "testbed.json").write_text(json.dumps(manifest, indent=2))
    if directory.exists():
        shutil.rmtree(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, directory)


def png_bytes(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _image_field(pixels: np.ndarray, name: str) -> dict:
    return {"bytes": png_bytes(pixels), "path": f"{name}.png"}


def _person_record(person: world.Person, tasks: dict, images: list[np.ndarray] | None = None) -> dict:
    record = {"ID": person.id, "name": person.name, "biography": person.biography, **tasks}
    if images is None:
        record["image"] = _image_field(render.render_portrait(person.identity), person.id)
    else:
        record["images"] = [_image_field(px, f"{person.id}_{i}") for i, px in enumerate(images)]
    return record


def _image_only(tasks: dict) -> dict:
    """Test_Set keeps the image questions: its point is new renderings of the forget subjects."""
    return {"Classification_Task": {"Image_Textual_Questions": tasks["Classification_Task"]["Image_Textual_Questions"],
                                    "Pure_Text_Questions": []},
            "Generation_Task": [q for q in tasks["Generation_Task"] if q["Type"] == "Image_Textual"],
            "Mask_Task": [q for q in tasks["Mask_Task"] if q["Type"] == "Image_Textual"]}


def write_parquet(records: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(records), path)


def make_splits(w: world.World) -> dict[str, list[dict]]:
    """Every split's records; a person's questions are identical in every split that holds them."""
    names = [p.name for p in w.people if not p.kind.startswith("unknown")]
    tasks = {p.id: world.person_tasks(p, names) for p in w.people}
    test_views = np.random.default_rng([w.seed, 2])
    records = {p.id: _person_record(p, tasks[p.id]) for p in w.people}
    fictitious = [p.id for p in w.of_kind("fictitious")]
    splits: dict[str, list[dict]] = {}
    for ratio, forget in w.forget_ids.items():
        forget_set = set(forget)
        splits[f"forget_{ratio}"] = [records[i] for i in fictitious if i in forget_set]
        splits[f"retain_{100 - ratio}"] = [records[i] for i in fictitious if i not in forget_set]
    people = {p.id: p for p in w.people}
    splits["Test_Set"] = [
        _person_record(people[i], _image_only(tasks[i]),
                       [render.render_portrait(people[i].identity, render.random_rendering(test_views)) for _ in range(2)])
        for i in w.forget_ids[15]]
    splits["Retain_Set"] = [records[p.id] for p in w.of_kind("real")]
    splits["Unknown_Set"] = [records[p.id] for p in w.of_kind("unknown")]
    splits["Unknown_Train"] = [records[p.id] for p in w.of_kind("unknown_train")]
    eval_views = np.random.default_rng([w.seed, 4])
    splits["General_Train"] = [_scene_record(s, render.Rendering()) for s in w.scenes_train]
    splits["General_Set"] = [_scene_record(s, render.random_rendering(eval_views)) for s in w.scenes_eval]
    return splits


def _scene_record(scene: world.Scene, view: render.Rendering) -> dict:
    return {"ID": scene.id, "name": "", "biography": "", **world.scene_tasks(scene),
            "image": _image_field(render.render_scene(scene.shape, scene.colour, scene.cells, view), scene.id)}


TRAINING_SPLITS = ("forget_15", "retain_85", "Retain_Set", "Unknown_Train", "General_Train")


KNOWN_PEOPLE_SPLITS = ("forget_15", "retain_85", "Retain_Set")


def training_examples(w: world.World, splits: dict[str, list[dict]], processor,
                      mix: TrainingMix = TrainingMix()) -> list[train.Example]:
    """What the model learns: every question of every trained split, image questions re-rendered each step, each
    repeated as `mix` says: real (real people) x classification (classification questions) x cloze (a known
    person's cloze questions) x image (a known person's image classification and cloze questions) times."""
    people = {p.id: p for p in w.people}
    scenes = {s.id: s for s in w.scenes_train}

    def renderer_for(subject_id: str):
        if subject_id in people:
            identity = people[subject_id].identity
            return lambda view: render.render_portrait(identity, view)
        scene = scenes[subject_id]
        return lambda view: render.render_scene(scene.shape, scene.colour, scene.cells, view)

    examples: list[train.Example] = []
    prefix = models.answer_prefix(processor)
    for split in TRAINING_SPLITS:
        known_person = split in KNOWN_PEOPLE_SPLITS
        for item in expand_items(splits[split]):
            renderer = renderer_for(item.subject_id) if item.modality == "image" else None
            repeats = ((mix.real if split == "Retain_Set" else 1)
                       * (mix.classification if item.task == "classification" else 1)
                       * (mix.cloze if known_person and item.task == "cloze" else 1)
                       * (mix.image if known_person and item.task != "generation" and renderer is not None else 1))
            examples += [train.encode_example(processor, item, renderer, prefix)] * repeats
    return examples


def corpus(splits: dict[str, list[dict]], processor_free_texts: list[str]) -> list[str]:
    texts = list(processor_free_texts)
    for records in splits.values():
        for item in expand_items(records):
            texts += [item.prompt, item.answer, *(item.options or {}).values()]
    return texts


def known_identities(w: world.World) -> list[render.Identity]:
    """The people the vision stage learns by identity (strangers share its one "stranger" class)."""
    return [p.identity for p in w.people if p.kind in ("fictitious", "real")]


def train_model(model, w: world.World, examples: list[train.Example], spec: Preset, seed: int,
                progress: bool = True) -> tuple[list[float], list[float]]:
    """Both training stages, in place: the vision tower alone, then frozen for the LLaVA stage. Returns the two
    loss curves."""
    tower = model.model.vision_tower
    vision_losses = vision.pretrain_vision(tower, known_identities(w), spec.vision, seed, progress)
    tower.requires_grad_(False)
    return vision_losses, train.train(model, examples, spec.train, seed, progress)


def build(out: Path | None = None, seed: int = 0, preset: str = "full", progress: bool = True,
          force: bool = False) -> Path:
    """Build (or reuse) the testbed of a tiny preset (a key of PRESETS) at `out`; returns its directory. The
    pretrained preset has its own builder, which builds on this module: preset_build.build chooses between them."""
    if preset not in PRESETS:
        raise ValueError(f"build.py builds the presets {sorted(PRESETS)}, not {preset!r} (preset_build.build "
                         f"builds {PRETRAINED_PRESET!r})")
    directory = Path(out) if out is not None else default_build_dir(seed, preset)
    if not force and is_current(directory, seed, preset, BUILD_VERSION):
        return directory
    spec = PRESETS[preset]
    started = time.perf_counter()
    tmp = directory.with_name(f".{directory.name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        w = world.build_world(seed, spec.world)
        splits = make_splits(w)
        for name, records in splits.items():
            write_parquet(records, tmp / "data" / name / PARQUET_NAME)
        data_seconds = time.perf_counter() - started
        tokenizer = tm.build_tokenizer(corpus(splits, ["USER: ASSISTANT:"]))
        processor = tm.build_processor(tokenizer)
        torch.manual_seed(seed)
        model = tm.build_model(len(tokenizer), spec.model)
        examples = training_examples(w, splits, processor, spec.mix)
        vision_losses, losses = train_model(model, w, examples, spec, seed, progress)
        model.save_pretrained(tmp / "model")
        processor.save_pretrained(tmp / "model")
        manifest = {"version": BUILD_VERSION, "seed": seed, "preset": preset, "world": asdict(spec.world),
                    "model": asdict(spec.model), "vision": asdict(spec.vision), "train": asdict(spec.train),
                    "mix": asdict(spec.mix),
                    "examples": len(examples), "vision_final_loss": float(np.mean(vision_losses[-50:])),
                    "parameters": sum(p.numel() for p in model.parameters()),
                    "final_loss": float(np.mean(losses[-50:])), "data_seconds": round(data_seconds, 1),
                    "total_seconds": round(time.perf_counter() - started, 1),
                    "forget_ids": {str(k): v for k, v in w.forget_ids.items()}}
        publish(tmp, directory, manifest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return directory
