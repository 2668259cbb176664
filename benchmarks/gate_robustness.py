"""The default gate on photos of the forget people that the fit never saw, perturbed (the selective-erasure bar).

Test_Set holds each forget person in two new renderings; each is perturbed five ways (Gaussian blur, rotation by
up to 10 degrees, JPEG at quality 40, brightness x0.7 or x1.3, a crop of 2-4 pixels a side resized back). For each
perturbation it prints vanilla's image classification and cloze accuracy, the eraser's, and the fraction of
prompts the gate turns on. Run: python benchmarks/gate_robustness.py [--seed 0] [--forget-ratio 10]
[--preset full|small|pretrained]
"""

from __future__ import annotations

import argparse
import io
import sys
from dataclasses import replace

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter

from mllmeraser import FitSettings, build_testbed, fit_eraser, load_model
from mllmeraser.bench import data, evaluate
from mllmeraser.cli import TESTBED_PRESETS


def perturb(image: Image.Image, kind: str, rng: np.random.Generator) -> Image.Image:
    if kind == "blur":
        return image.filter(ImageFilter.GaussianBlur(0.8))
    if kind == "rotate":
        return image.rotate(float(rng.uniform(-10, 10)), resample=Image.BILINEAR, fillcolor=(128, 128, 128))
    if kind == "jpeg":
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=40)
        return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")
    if kind == "lighting":
        return ImageEnhance.Brightness(image).enhance(float(rng.choice([0.7, 1.3])))
    if kind == "crop":
        width, height = image.size
        c = int(rng.integers(2, 5))
        return image.crop((c, c, width - c, height - c)).resize((width, height))
    raise ValueError(kind)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--forget-ratio", type=int, default=10)
    parser.add_argument("--preset", default="full", choices=TESTBED_PRESETS, help="the testbed (built if absent)")
    args = parser.parse_args()
    directory = build_testbed(seed=args.seed, preset=args.preset)
    data_dir = directory / "data"
    model, processor = load_model(directory / "model")
    eraser = fit_eraser(model, processor, forget=data.load_split_items(data_dir, "forget", args.forget_ratio),
                        retain=data.retained_inputs(data_dir, args.forget_ratio),
                        erasure=data.default_erasure_items(data_dir),
                        calibration=data.validation_items(data_dir, args.forget_ratio), settings=FitSettings(),
                        progress=False)
    test = evaluate.report_items(data_dir, args.forget_ratio, ("test",))["test"]
    rng = np.random.default_rng(0)
    print(f"{'photos':10s} {'vanilla cls':>11s} {'eraser cls':>10s} {'vanilla cloze':>13s} {'eraser cloze':>12s} {'gate fires':>10s}")
    for kind in ("none", "blur", "rotate", "jpeg", "lighting", "crop"):
        items = test if kind == "none" else [replace(i, image=perturb(i.image, kind, rng)) for i in test]
        vanilla = evaluate.score_items(model, processor, items, progress=False)
        with eraser.attach(model):
            erased = evaluate.score_items(model, processor, items, progress=False)
        fires = evaluate.fire_rate(evaluate.gate_scores(model, processor, eraser, {"x": items})["x"], eraser)
        print(f"{kind:10s} {vanilla['classification_image']:11.3f} {erased['classification_image']:10.3f} "
              f"{vanilla['cloze_image']:13.3f} {erased['cloze_image']:12.3f} {fires:10.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
