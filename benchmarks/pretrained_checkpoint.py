"""Score the newest fine-tuning checkpoint of an unfinished pretrained-preset build: canonical classification and
cloze of 10 known people (the 4 forget-10% people and 6 retain people, both modalities) and the 30 capital
candidates of the real-knowledge split. Pause the build first (`kill -STOP`): two torch jobs on 2 cores slow each
other 10-70x. Usage: python benchmarks/pretrained_checkpoint.py [--seed N] [--threads T]"""

from __future__ import annotations

import argparse
import json

import torch
from safetensors.torch import load_file

from mllmeraser.bench.data import expand_items
from mllmeraser.bench.evaluate import aggregate, item_scores
from mllmeraser.core import models
from mllmeraser.testbed import pretrained, pretrained_build, pretrained_train, world


def checkpoint_model(seed: int):
    """The preset's composed model with the build's pretrained tower and the newest checkpoint's trained weights
    (the embeddings are the composition's own: frozen during fine-tuning)."""
    work = pretrained_build.work_dir(pretrained_build.default_build_dir(seed))
    newest = pretrained_train.newest_checkpoints(work / "checkpoints")  # one per stage, in training order
    spec = pretrained_build.PRESETS[pretrained_build.PRESET]
    model, processor = pretrained.compose(seed, spec.vision_size)
    model.model.vision_tower.load_state_dict(load_file(work / "vision_tower.safetensors"))
    for checkpoint in newest:
        loaded = model.load_state_dict(load_file(checkpoint / "trainable.safetensors"), strict=False)
        assert not loaded.unexpected_keys, loaded.unexpected_keys
    return model.eval(), processor, newest[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, processor, checkpoint = checkpoint_model(args.seed)
    spec = pretrained_build.PRESETS[pretrained_build.PRESET]
    splits = pretrained_build.make_splits(world.build_world(args.seed, spec.world), args.seed, spec.real_candidates)
    people = [i for i in expand_items(splits["forget_10"] + splits["retain_90"][:6])
              if i.task in ("classification", "cloze")]
    print("checkpoint", checkpoint.name, "losses (last 10):",
          [round(x, 3) for x in json.loads((checkpoint / "state.json").read_text())["losses"][-10:]])
    for name, items in (("people", people), ("real", expand_items(splits["Retain_Set"]))):
        answers = models.answer_items(model, processor, items, batch_size=16, progress=False)
        scores = aggregate(item_scores(i, a) for i, a in zip(items, answers))
        print(name, {k: round(v, 3) for k, v in scores.items() if k.startswith(("classification", "cloze", "rougeL"))})
        print("  e.g.", [(i.question[:40], a[:40]) for i, a in list(zip(items, answers))[:3]])


if __name__ == "__main__":
    main()
