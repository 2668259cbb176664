"""Stage 1 of the testbed's training: pretrain the CLIP tower, as LLaVA starts from a pretrained CLIP.

Linear heads read the mean of the tower's last-layer patch features (exactly what LLaVA's projector is fed:
`vision_feature_layer=-1`, CLS dropped) and learn, on fresh renderings every step:
- the identity of every known person (fictitious and real; CLIP, too, has seen the people it can name), and
  one more class, "a stranger", for random identities in a stranger's accessory: a stranger's identity features
  should say "a stranger", not "the known person who looks most like them";
- each visual attribute of *random* identities (background, hair, accessory, ...), so a stranger's look is
  described by features the tower already has;
- colour, shape and count of random scenes: generic visual concepts, as in CLIP's pretraining.
The heads are then discarded and the tower is frozen for the LLaVA stage (LLaVA freezes CLIP).

Why: trained from scratch inside LLaVA, the tower either collapsed (at the decoder's learning rate) or stayed
weak (at a tenth of it: image classification 0.43-0.70 where text reached 1.00, general split 0.43).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from . import render, world
from .train import optimise, pixel_values


@dataclass(frozen=True)
class VisionSettings:
    steps: int = 2000  # measured on full builds: retain image cloze 0.92 at 1,000 steps, 0.96-0.98 at 2,000
    batch_size: int = 64  # 3/8 known people, 3/8 random identities, 1/4 random scenes
    lr: float = 2e-3
    warmup: int = 50


def patch_features(tower, pixels: torch.Tensor) -> torch.Tensor:
    """Mean over patches of the last layer's features, the CLS token dropped: what the projector sees."""
    return tower(pixel_values=pixels, output_hidden_states=True).hidden_states[-1][:, 1:].mean(dim=1)


class Heads(torch.nn.Module):
    def __init__(self, width: int, people: int):
        super().__init__()
        self.identity = torch.nn.Linear(width, people + 1)  # the last class: "a stranger"
        self.attributes = torch.nn.ModuleDict(
            {name: torch.nn.Linear(width, len(values)) for name, values in render.identity_axes(render.ACCESSORIES).items()})
        self.scene = torch.nn.ModuleDict(
            {question[0]: torch.nn.Linear(width, len(question[-1])) for question in world.SCENE_QUESTIONS})


def _attribute_labels(identities: list[render.Identity]) -> dict[str, torch.Tensor]:
    return {name: torch.tensor([values.index(getattr(i, name)) for i in identities])
            for name, values in render.identity_axes(render.ACCESSORIES).items()}


def _scene_labels(scenes: list[world.Scene]) -> dict[str, torch.Tensor]:
    return {prop: torch.tensor([pool.index(value_of(s)) for s in scenes])
            for prop, _, _, _, value_of, pool in world.SCENE_QUESTIONS}


def pretrain_vision(tower, people: list[render.Identity], settings: VisionSettings, seed: int,
                    progress: bool = True) -> list[float]:
    """Train `tower` in place on the tasks above; returns the loss curve (sum of the heads' cross-entropies)."""
    torch.manual_seed(seed)
    rng = np.random.default_rng([seed, 5])
    heads = Heads(tower.config.hidden_size, len(people))

    def lr_at(step: int) -> float:
        warm = min(1.0, (step + 1) / settings.warmup)
        return warm * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * step / settings.steps)))

    n_known = n_random = settings.batch_size * 3 // 8
    n_scenes = settings.batch_size - n_known - n_random
    cross_entropy = torch.nn.functional.cross_entropy

    def batch_loss() -> torch.Tensor:
        known = rng.integers(len(people), size=n_known)
        identities = [people[i] for i in known]
        identities += [render.random_identity(rng, render.ACCESSORIES) for _ in range(n_random)]
        scenes = [world.random_scene(rng, "") for _ in range(n_scenes)]
        images = [render.render_portrait(i, render.random_rendering(rng)) for i in identities]
        images += [render.render_scene(s.shape, s.colour, s.cells, render.random_rendering(rng)) for s in scenes]
        features = patch_features(tower, pixel_values(images))
        portraits, scene_features = features[: len(identities)], features[len(identities):]
        strangers = [n_known + k for k, i in enumerate(identities[n_known:]) if i.accessory in render.UNKNOWN_ACCESSORIES]
        identity_rows = list(range(n_known)) + strangers
        identity_labels = torch.tensor(known.tolist() + [len(people)] * len(strangers))
        loss = cross_entropy(heads.identity(portraits[identity_rows]), identity_labels)
        for name, labels in _attribute_labels(identities).items():
            loss = loss + cross_entropy(heads.attributes[name](portraits), labels)
        for prop, labels in _scene_labels(scenes).items():
            loss = loss + cross_entropy(heads.scene[prop](scene_features), labels)
        return loss

    tower.train()
    parameters = list(tower.parameters()) + list(heads.parameters())
    losses = optimise(parameters, batch_loss, settings.steps, settings.lr, lr_at, 0.0, "pretrain vision tower", progress)
    tower.eval()
    return losses
