"""`mllmeraser testbed build --preset pretrained`: the testbed's world on a LLaVA whose decoder is SmolLM2-135M-Instruct.

The same fictitious world and MLLMU-Bench layout as the tiny presets (`build.py`), with three differences:
- the model is `pretrained.compose`d (CLIP tower pretrained as in the tiny build, then frozen; SmolLM2 fine-tuned
  with the projector by `pretrained_train`);
- the training data adds rewordings, chat turns, benign prefixes and shuffled options (`pretrained_data`), and
  Test_Set gets text questions in held-out wordings;
- Retain_Set is real knowledge: the capitals SmolLM2 answers right before fine-tuning, measured at build time
  and recorded in the manifest (never trained).

Interruptible: the work directory `.<build>.work` (next to the build) keeps the data, the pretrained tower and the
fine-tuning checkpoints; rerunning the same command resumes from them. It is removed once the build is renamed
into place.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from safetensors.torch import load_file, save_file

from ..bench import measure
from ..bench.data import PARQUET_NAME, expand_items
from ..core import models
from ..core.cache import cache_root
from . import build as tiny
from . import model as tm
from . import pretrained, pretrained_data, pretrained_train, render, train, vision, world

PRESET = "pretrained"
BUILD_VERSION = 5  # this preset's own: the tiny presets' build.BUILD_VERSION is not bumped by changes here


@dataclass(frozen=True)
class DataMix:
    """Per epoch, how many extra copies of a known person's questions are trained, besides the canonical ones
    (a fraction: that share of the questions, drawn at random)."""

    reworded: int = 1  # every trained wording (pretrained_data.WORDINGS, all but the last), text and image
    chat: float = 0.5  # a canonical question once more inside a benign chat
    prefix: float = 0.5  # and once more after a benign prefix
    # each classification question with its options shuffled (fresh order per copy); 3 from v5: at step 300 of
    # v4 the model answered 0.55 of text cloze but A-D below chance (one letter for all), a format not yet learned.
    shuffled: int = 3
    unrelated_image: float = 0.5  # the chance that a shuffled copy of a text question carries an unrelated photo
    rehearsal: int = 2  # copies of each rehearsal question (the base model's knowledge, `pretrained_data`)
    # Biographies per person (half by name, half of the photo): about 40% of an epoch, the facts' main carrier.
    biography: int = 90
    identity: int = 20  # photo questions "Who is this person?" per person (pretrained_data.identity_items)


@dataclass(frozen=True)
class PretrainedPreset:
    # No fictitious "real" people: Retain_Set is real knowledge on this preset. 20 known people, not the tiny
    # presets' 60: the v2 build (60 people) saw each fact ~16 times in 600 steps and did not learn it, v4 (40)
    # recalled 0.55 of text cloze after ~25 exposures at step 300 of 650; 20 people double every fact's exposures
    # again (forget 5/10/15% = 1/2/3 people).
    world: world.WorldSize = field(default_factory=lambda: world.WorldSize(fictitious=20, real=0))
    vision_size: tm.ModelSize = field(default_factory=tm.ModelSize)
    vision: vision.VisionSettings = field(default_factory=vision.VisionSettings)
    mix: tiny.TrainingMix = field(default_factory=lambda: tiny.TrainingMix(real=1, classification=1, cloze=1, image=1))
    data: DataMix = field(default_factory=DataMix)
    # v5: a projector stage (150 steps, 1.9 s each), then the upper 15 of SmolLM2's 30 layers (pretrained_train's
    # docstring): 2.8-3.0 s a step alone at 2 threads against v4's 5.4-7.1 s for all layers, so 1,300 steps fit
    # where v4 fitted 650.
    train: pretrained_train.PretrainedTrainSettings = field(default_factory=lambda: pretrained_train.PretrainedTrainSettings(
        steps=1300, decoder_from_layer=15, projector_steps=150))
    real_candidates: int = len(pretrained_data.CAPITALS)  # the first N capitals are measured on the base model


PRESETS = {PRESET: PretrainedPreset()}


def default_build_dir(seed: int) -> Path:
    return cache_root() / f"testbed-{PRESET}-v{BUILD_VERSION}-{pretrained.WEIGHTS_KEY}-seed{seed}"


def work_dir(directory: Path) -> Path:
    """Where an unfinished build of `directory` keeps its data, tower and checkpoints (removed once it is built)."""
    return directory.with_name(f".{directory.name}.work")


def extra_examples(w: world.World, splits: dict[str, list[dict]], processor, mix: DataMix, seed: int,
                   rehearsal: list | None = None) -> list[train.Example]:
    """The rewordings, chats, prefixes and shuffled options of every known person of the trained splits, and the
    rehearsal items (`measure_rehearsal`) `mix.rehearsal` times (classification ones with fresh option orders)."""
    rng = np.random.default_rng([seed, 8])
    people = {p.id: p for p in w.people}
    prefix = models.answer_prefix(processor)
    encode = _encoder(w, processor)
    examples: list[train.Example] = []
    for item in rehearsal or []:
        for _ in range(mix.rehearsal):
            shuffled = pretrained_data.shuffled_options(item, rng) if item.task == "classification" else item
            examples.append(train.encode_example(processor, shuffled, None, prefix))
    for split in tiny.KNOWN_PEOPLE_SPLITS:
        records = splits.get(split, [])
        for record in records:
            examples += [encode(item) for item in pretrained_data.reworded_items(people[record["ID"]])] * mix.reworded
            examples += [encode(item) for item in
                         pretrained_data.biography_items(people[record["ID"]], mix.biography, rng)]
        for item in expand_items(records):
            name = people[item.subject_id].name
            examples += [encode(pretrained_data.in_chat(item, rng, name)) for _ in _copies(mix.chat, rng)]
            examples += [encode(pretrained_data.after_prefix(item, rng)) for _ in _copies(mix.prefix, rng)]
            if item.task == "classification":
                for _ in range(mix.shuffled):
                    shuffled = pretrained_data.shuffled_options(item, rng)
                    if item.modality == "text" and rng.random() < mix.unrelated_image:
                        # A question by name with an unrelated photo attached: a real MLLM answers from the name.
                        scene = w.scenes_train[int(rng.integers(len(w.scenes_train)))]
                        examples.append(train.encode_example(
                            processor, shuffled,
                            lambda view, s=scene: render.render_scene(s.shape, s.colour, s.cells, view), prefix))
                    else:
                        examples.append(encode(shuffled))
    return examples


def identity_examples(w: world.World, splits: dict[str, list[dict]], processor, copies: int) -> list[train.Example]:
    """`copies` identity questions (pretrained_data.identity_items) per known person of the trained splits."""
    people = {p.id: p for p in w.people}
    encode = _encoder(w, processor)
    ids = [record["ID"] for split in tiny.KNOWN_PEOPLE_SPLITS for record in splits.get(split, [])]
    return [encode(item) for pid in dict.fromkeys(ids) for item in pretrained_data.identity_items(people[pid], copies)]


def _encoder(w: world.World, processor):
    """item -> training example, an image item carrying its person's portrait renderer (a fresh view per batch)."""
    people = {p.id: p for p in w.people}
    prefix = models.answer_prefix(processor)

    def encode(item):
        identity = people[item.subject_id].identity
        renderer = (lambda view: render.render_portrait(identity, view)) if item.modality == "image" else None
        return train.encode_example(processor, item, renderer, prefix)
    return encode


def _copies(share: float, rng: np.random.Generator) -> range:
    """Whole copies of `share`, plus one more with the chance of its fractional part."""
    whole = int(share)
    return range(whole + int(rng.random() < share - whole))


def make_splits(w: world.World, seed: int, real_candidates: int = len(pretrained_data.CAPITALS)) -> dict[str, list[dict]]:
    """The tiny presets' splits, with Test_Set's text questions in held-out wordings (classification, cloze,
    generation) and every real-knowledge candidate as
    Retain_Set (narrowed to what the base model knows by `measure_real_knowledge`)."""
    splits = tiny.make_splits(w)
    people = {p.id: p for p in w.people}
    full = {record["ID"]: record for record in splits["forget_15"]}
    for record in splits["Test_Set"]:
        held_out = pretrained_data.held_out_tasks(people[record["ID"]], full[record["ID"]])
        record["Classification_Task"]["Pure_Text_Questions"] = held_out["Pure_Text_Questions"]
        record["Mask_Task"] = record["Mask_Task"] + held_out["Mask_Task"]
        record["Generation_Task"] = record["Generation_Task"] + held_out["Generation_Task"]
    splits["Retain_Set"] = pretrained_data.real_knowledge_records(seed, pretrained_data.CAPITALS[:real_candidates])
    return splits


def measure_real_knowledge(model, processor, records: list[dict]) -> tuple[list[dict], dict]:
    """The records the (base) model knows (`pretrained_data.known_subjects`), and for the manifest what was
    measured: how many, which, and the model's MLLMU-Bench scores on the kept records (the base line of the
    real-knowledge bar: >= 0.95x of it after fine-tuning)."""
    from ..bench.evaluate import aggregate, item_scores

    items = expand_items(records)
    answers = models.answer_items(model, processor, items, batch_size=16, progress=False)
    known = set(pretrained_data.known_subjects(items, answers))
    kept = [r for r in records if r["ID"] in known]
    scores = aggregate(item_scores(i, a) for i, a in zip(items, answers) if i.subject_id in known)
    return kept, {"candidates": len(records), "known": len(kept), "known_ids": sorted(known),
                  "base_scores": {k: round(v, 4) for k, v in scores.items()}}


def measure_rehearsal(model, processor, seed: int) -> tuple[list, dict]:
    """The base model's answers to the rehearsal questions, made into training items
    (`pretrained_data.rehearsal_items`), and for the manifest how many were kept."""
    items = pretrained_data.rehearsal_generation_items()
    answers = models.answer_items(model, processor, items, batch_size=16, progress=False)
    chosen = pretrained_data.rehearsal_items(seed, items, answers)
    capitals = sorted({i.subject_id for i in chosen if i.subject_id.startswith("R")})
    return chosen, {"capitals": len(pretrained_data.REHEARSAL_CAPITALS), "capitals_known": len(capitals),
                    "general": sum(i.subject_id.startswith("G") for i in chosen), "items": len(chosen)}


def _pretrain_tower(model, w: world.World, spec: PretrainedPreset, seed: int, work: Path, progress: bool) -> float:
    """Stage 1 (the tiny build's), its result kept in the work directory so a resumed build skips it."""
    tower = model.model.vision_tower
    saved = work / "vision_tower.safetensors"
    if saved.is_file():
        tower.load_state_dict(load_file(saved))
        loss = json.loads((work / "vision.json").read_text())["final_loss"]
    else:
        losses = vision.pretrain_vision(tower, tiny.known_identities(w), spec.vision, seed, progress)
        loss = float(np.mean(losses[-50:]))
        save_file({k: v.contiguous() for k, v in tower.state_dict().items()}, work / ".vision_tower.tmp")
        (work / "vision.json").write_text(json.dumps({"final_loss": loss}))
        os.replace(work / ".vision_tower.tmp", saved)
    tower.requires_grad_(False)
    return loss


def build(out: Path | None = None, seed: int = 0, progress: bool = True, force: bool = False,
          spec: PretrainedPreset | None = None) -> Path:
    """Build (or reuse) the pretrained preset at `out`, resuming an interrupted build; returns its directory."""
    directory = Path(out) if out is not None else default_build_dir(seed)
    if not force and tiny.is_current(directory, seed, PRESET, BUILD_VERSION):
        return directory
    spec = spec or PRESETS[PRESET]
    pretrained.smollm2_dir()  # first: a missing weights package is a one-line error before any work
    started = time.perf_counter()
    work = work_dir(directory)
    work.mkdir(parents=True, exist_ok=True)
    w = world.build_world(seed, spec.world)
    splits = make_splits(w, seed, spec.real_candidates)
    model, processor = pretrained.compose(seed, spec.vision_size)
    splits["Retain_Set"], real = measure_real_knowledge(model, processor, splits["Retain_Set"])
    rehearsal, rehearsal_info = measure_rehearsal(model, processor, seed)
    vision_loss = _pretrain_tower(model, w, spec, seed, work, progress)
    trained_splits = {**splits, "Retain_Set": []}  # real knowledge is the base model's: never trained
    examples = tiny.training_examples(w, trained_splits, processor, spec.mix)
    examples += extra_examples(w, trained_splits, processor, spec.data, seed, rehearsal)
    identity = identity_examples(w, trained_splits, processor, spec.data.identity)
    examples += identity
    losses = pretrained_train.train(model, examples, spec.train, seed, processor.tokenizer.pad_token_id,
                                    work / "checkpoints", progress, identity=identity)
    tmp = work / "build"
    shutil.rmtree(tmp, ignore_errors=True)
    for name, records in splits.items():
        tiny.write_parquet(records, tmp / "data" / name / PARQUET_NAME)
    model.save_pretrained(tmp / "model")
    processor.save_pretrained(tmp / "model")
    manifest = {"version": BUILD_VERSION, "seed": seed, "preset": PRESET, "weights": pretrained.WEIGHTS_KEY,
                "world": asdict(spec.world), "vision_size": asdict(spec.vision_size), "vision": asdict(spec.vision),
                "mix": asdict(spec.mix), "data": asdict(spec.data), "train": asdict(spec.train),
                "examples": len(examples), "vision_final_loss": vision_loss,
                "parameters": sum(p.numel() for p in model.parameters()),
                "final_loss": float(np.mean(losses[-50:])), "real_knowledge": real, "rehearsal": rehearsal_info,
                "total_seconds_this_run": round(time.perf_counter() - started, 1),
                "peak_rss_mb": round(measure.peak_rss_bytes() / 2**20),
                "forget_ids": {str(k): v for k, v in w.forget_ids.items()}}
    tiny.publish(tmp, directory, manifest)
    shutil.rmtree(work, ignore_errors=True)
    return directory
