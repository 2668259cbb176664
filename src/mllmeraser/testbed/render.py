"""Procedural 32x32 images: portraits whose look encodes an identity, and synthetic scenes of shapes.

Rendering evaluates shape masks on canonical coordinates, so a geometric augmentation (shift, scale) is a
change of coordinates rather than a resampling of pixels; lighting and noise are applied afterwards.
A "rendering" is one draw of (shift, scale, brightness, noise): training draws fresh ones every step and
the Test_Set uses draws the training never saw.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SIZE = 32
PALETTE = {
    "red": (220, 50, 47), "green": (60, 170, 80), "blue": (40, 90, 210), "yellow": (235, 200, 40),
    "purple": (140, 70, 170), "orange": (240, 130, 30), "teal": (30, 160, 160), "pink": (235, 120, 170),
    "brown": (120, 75, 40), "black": (25, 25, 25), "white": (240, 240, 240), "grey": (128, 128, 128),
}
SKIN = [(250, 220, 190), (225, 180, 140), (180, 130, 90), (120, 80, 55)]
BACKGROUNDS = ["red", "green", "blue", "yellow", "purple", "orange", "teal", "pink"]
PATTERNS = ["solid", "hstripes", "vstripes", "checker"]
HAIR = ["black", "brown", "yellow", "orange", "grey", "white", "purple"]
HAIR_STYLES = ["flat", "tall"]
EYES = ["blue", "green", "brown"]
SHIRTS = ["red", "green", "blue", "yellow", "purple", "teal", "black"]
KNOWN_ACCESSORIES = ["none", "glasses", "hat", "earring"]
UNKNOWN_ACCESSORIES = ["scarf", "mask"]  # strangers come from another population: a cue the model can learn
ACCESSORIES = KNOWN_ACCESSORIES + UNKNOWN_ACCESSORIES


@dataclass(frozen=True)
class Identity:
    background: str
    pattern: str
    skin: int
    face_wide: bool
    hair: str
    hair_style: str
    eyes: str
    shirt: str
    accessory: str

    def as_tuple(self) -> tuple:
        return tuple(getattr(self, name) for name in identity_axes([]))


def identity_axes(accessories: list[str]) -> dict[str, list]:
    """Each visual attribute of an identity and its possible values (field order of `Identity`)."""
    return {"background": BACKGROUNDS, "pattern": PATTERNS, "skin": list(range(len(SKIN))),
            "face_wide": [False, True], "hair": HAIR, "hair_style": HAIR_STYLES, "eyes": EYES, "shirt": SHIRTS,
            "accessory": accessories}


def random_identity(rng: np.random.Generator, accessories: list[str]) -> Identity:
    return Identity(*[axis[int(rng.integers(len(axis)))] for axis in identity_axes(accessories).values()])


@dataclass(frozen=True)
class Rendering:
    dx: float = 0.0
    dy: float = 0.0
    scale: float = 1.0
    brightness: float = 1.0
    noise: float = 0.0
    noise_seed: int = 0


def random_rendering(rng: np.random.Generator) -> Rendering:
    return Rendering(dx=float(rng.uniform(-2.5, 2.5)), dy=float(rng.uniform(-2.5, 2.5)),
                     scale=float(rng.uniform(0.88, 1.12)), brightness=float(rng.uniform(0.8, 1.2)),
                     noise=float(rng.uniform(0.0, 8.0)), noise_seed=int(rng.integers(2**31)))


def _coords(view: Rendering) -> tuple[np.ndarray, np.ndarray]:
    """Canonical coordinates of each output pixel centre under the rendering's shift and scale."""
    grid = np.arange(SIZE, dtype=np.float32) + 0.5
    y, x = np.meshgrid(grid, grid, indexing="ij")
    centre = SIZE / 2
    return (x - centre - view.dx) / view.scale + centre, (y - centre - view.dy) / view.scale + centre


def _finish(canvas: np.ndarray, view: Rendering) -> np.ndarray:
    canvas = canvas * view.brightness
    if view.noise > 0:
        canvas = canvas + np.random.default_rng(view.noise_seed).normal(0.0, view.noise, canvas.shape)
    return np.clip(np.rint(canvas), 0, 255).astype(np.uint8)


def render_portrait(identity: Identity, view: Rendering = Rendering()) -> np.ndarray:
    """A head-and-shoulders portrait, HxWx3 uint8."""
    x, y = _coords(view)
    canvas = np.empty((SIZE, SIZE, 3), dtype=np.float32)
    bg = np.array(PALETTE[identity.background], dtype=np.float32)
    stripe = {"solid": np.zeros_like(x, dtype=bool), "hstripes": (y // 4) % 2 == 0,
              "vstripes": (x // 4) % 2 == 0, "checker": ((x // 4) + (y // 4)) % 2 == 0}[identity.pattern]
    canvas[:] = bg
    canvas[stripe] = bg * 0.55
    layers: list[tuple[np.ndarray, tuple]] = []
    layers.append((((x - 16) / 11) ** 2 + ((y - 33) / 7) ** 2 <= 1, PALETTE[identity.shirt]))  # shoulders
    half_width = 7.5 if identity.face_wide else 5.5
    face = ((x - 16) / half_width) ** 2 + ((y - 16) / 8) ** 2 <= 1
    hair_top = 12.0 if identity.hair_style == "flat" else 13.5
    hair = (((x - 16) / (half_width + 1)) ** 2 + ((y - 15) / 9) ** 2 <= 1) & (y < hair_top)
    layers.append((face, SKIN[identity.skin]))
    layers.append((hair, PALETTE[identity.hair]))
    for eye_x in (16 - half_width / 2.2, 16 + half_width / 2.2):
        layers.append(((np.abs(x - eye_x) < 1.2) & (np.abs(y - 16) < 1.2), PALETTE[identity.eyes]))
    accessory = identity.accessory
    if accessory == "glasses":
        layers.append(((np.abs(y - 16) < 0.9) & (np.abs(x - 16) < half_width), PALETTE["black"]))
    elif accessory == "hat":
        layers.append(((y < 7.5) & (y > 3.5) & (np.abs(x - 16) < half_width + 3), PALETTE["brown"]))
    elif accessory == "earring":
        layers.append((((x - 16 - half_width) ** 2 + (y - 20) ** 2) < 2.5, PALETTE["yellow"]))
    elif accessory == "scarf":
        layers.append(((np.abs(y - 25) < 1.8) & (np.abs(x - 16) < 9), PALETTE["white"]))
    elif accessory == "mask":
        layers.append((face & (y > 18), PALETTE["grey"]))
    for mask, colour in layers:
        canvas[mask] = np.array(colour, dtype=np.float32)
    return _finish(canvas, view)


SCENE_SHAPES = ["circle", "square", "triangle", "diamond"]
SCENE_COLOURS = ["red", "green", "blue", "yellow"]
CELLS = [(8, 8), (24, 8), (8, 24), (24, 24)]
# Shapes span most of their quadrant: at 8-pixel patches a smaller shape is a few pixels of difference.
SHAPE_RADIUS = 6.0


def render_scene(shape: str, colour: str, cells: tuple[int, ...], view: Rendering = Rendering()) -> np.ndarray:
    """A light background with one to four same-coloured shapes, one per quadrant in `cells`."""
    x, y = _coords(view)
    canvas = np.full((SIZE, SIZE, 3), 225.0, dtype=np.float32)
    for cell in cells:
        cx, cy = CELLS[cell]
        dx, dy = (x - cx) / SHAPE_RADIUS, (y - cy) / SHAPE_RADIUS  # unit-size shape coordinates
        if shape == "circle":
            mask = dx ** 2 + dy ** 2 <= 1
        elif shape == "square":
            mask = (np.abs(dx) <= 0.85) & (np.abs(dy) <= 0.85)
        elif shape == "triangle":
            mask = (dy <= 0.85) & (dy >= -1) & (np.abs(dx) <= (dy + 1) * 0.55)
        else:
            mask = np.abs(dx) + np.abs(dy) <= 1.1
        canvas[mask] = np.array(PALETTE[colour], dtype=np.float32)
    return _finish(canvas, view)
