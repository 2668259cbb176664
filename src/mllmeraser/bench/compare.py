"""What `mllmeraser compare` and `mllmeraser demo` run: every method on the same splits, one report.

Methods: vanilla; the eraser in its default mode and in the paper's mode (each also as a curve over its
strength); the LoRA baselines GA, GradDiff, KL and NPO (each a curve over epochs). Settings are chosen on
the retain validation hold-out only, by one rule for all: the strongest setting whose validation
classification accuracy stays >= RETAIN_KEEP x vanilla's. "Strongest" is the largest strength for the
eraser and, for a baseline, the grid point with the highest forget-set training loss (a training-time
quantity, not a reported metric). The reported splits never choose anything.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Sequence

import torch

from ..core import models
from ..core.eraser import Eraser
from ..core.fitting import FitSettings
from ..errors import UserInputError
from . import baselines, data, evaluate, measure, report
from .data import REPORT_SPLITS, VALIDATION_SPLIT

ERASER_METHODS = ("eraser", "eraser-paper")
BASELINE_METHODS = ("ga", "graddiff", "kl", "npo")
ALL_METHODS = ("vanilla",) + ERASER_METHODS + BASELINE_METHODS
RETAIN_KEEP = 0.97
CURVE_SCALES = (0.25, 0.5, 0.75, 1.0, 1.25, 1.5)  # eraser strengths, as multiples of the fitted alpha
# The paper's LLaVA-1.5 settings: hard null space, unshaped linear gate.
PAPER_SETTINGS = {"solver": "paper", "ratio": 0.3, "gamma": 0.1, "alpha": 1.0, "floor": -math.inf, "cap": math.inf,
                  "normalise_gate": False}


@dataclass
class CompareSettings:
    forget_ratio: int = 10
    methods: tuple[str, ...] = ALL_METHODS
    batch_size: int = 64
    baseline_lrs: tuple[float, ...] = (1e-4, 3e-4, 1e-3)
    baseline_epochs: int = 4
    curve_scales: tuple[float, ...] = CURVE_SCALES
    overhead_prompts: int = 32
    seed: int = 0
    # "validated": the eraser's strength is chosen by the validation rule, like every baseline's setting (compare);
    # "fitted": it is reported at the strength it was fitted with, as a user would run it (demo).
    eraser_strength: str = "validated"


@dataclass
class MethodResult:
    name: str
    results: dict[str, dict[str, float]]
    fit_seconds: float | None = None
    peak_extra_mib: float | None = None
    generation_overhead: float | None = None
    settings: dict = field(default_factory=dict)
    curve: list[dict] = field(default_factory=list)  # [{"x": strength or epoch, "forget": {...}, "retain": {...}}]


def classification(metrics: dict[str, float]) -> float:
    values = [metrics[k] for k in ("classification_image", "classification_text") if k in metrics]
    return sum(values) / len(values) if values else math.nan


def rouge_l(metrics: dict[str, float]) -> float:
    values = [metrics[k] for k in ("rougeL_image", "rougeL_text") if k in metrics]
    return sum(values) / len(values) if values else math.nan


class Harness:
    """The model, its processor and the fixed question sets every method is measured on."""

    def __init__(self, model_dir: Path, data_dir: Path, settings: CompareSettings, progress: bool):
        self.model_dir, self.data_dir, self.settings, self.progress = model_dir, data_dir, settings, progress
        self.model, self.processor = models.load_model(model_dir)
        self.items = evaluate.report_items(data_dir, settings.forget_ratio, REPORT_SPLITS + (VALIDATION_SPLIT,))
        self.forget = self.items["forget"]
        self.retain_fit = data.retained_inputs(data_dir, settings.forget_ratio)
        self.validation = self.items.get(VALIDATION_SPLIT, [])
        if not self.validation:
            raise UserInputError(data_dir, "the retain split has no validation subjects to choose settings on")
        self.overhead_items = [i for i in self.forget + self.items["retain"] if i.task == "generation" and i.modality == "image"]
        self.overhead_items = self.overhead_items[: settings.overhead_prompts]

    def evaluate(self, model=None, splits: Sequence[str] | None = None) -> dict[str, dict[str, float]]:
        chosen = {s: self.items[s] for s in (splits or self.items) if s in self.items}
        return evaluate.evaluate(model or self.model, self.processor, self.data_dir, items=chosen,
                                 batch_size=self.settings.batch_size, progress=self.progress)

    def generation_time_ratio(self, treated_model, context=None) -> float:
        """Wall time of greedy generation on the same prompts, treated over vanilla (one run, interleaved;
        attaching an eraser happens outside the timed region)."""
        def answer(model):
            return lambda: models.answer_items(model, self.processor, self.overhead_items, self.settings.batch_size,
                                                 progress=False)

        ratio, _, _ = measure.overhead_ratio(answer(self.model), answer(treated_model), repeats=5, context=context)
        return ratio


def run_eraser(h: Harness, name: str, settings: FitSettings, vanilla_val: float) -> MethodResult:
    erasure = data.default_erasure_items(h.data_dir)
    with measure.measured() as cost:
        eraser = Eraser.fit(h.model, h.processor, forget=h.forget, retain=h.retain_fit, erasure=erasure,
                            settings=settings, request=f"forget_{h.settings.forget_ratio}", progress=h.progress)
    base_alpha = eraser.alpha[0]
    curve = []
    chosen_alpha = None
    for scale in sorted(h.settings.curve_scales):
        candidate = eraser.with_alpha(base_alpha * scale)
        with candidate.attach(h.model):
            point = h.evaluate(splits=("forget", "retain", VALIDATION_SPLIT))
        curve.append({"x": base_alpha * scale, **point})
        if classification(point[VALIDATION_SPLIT]) >= RETAIN_KEEP * vanilla_val:
            chosen_alpha = base_alpha * scale  # strengths ascend: the last one that keeps utility wins
    chosen_alpha = chosen_alpha if chosen_alpha is not None else base_alpha * min(h.settings.curve_scales)
    if h.settings.eraser_strength == "fitted":
        chosen_alpha = base_alpha
    chosen = eraser.with_alpha(chosen_alpha)
    with chosen.attach(h.model):
        results = h.evaluate(splits=REPORT_SPLITS)
    overhead = h.generation_time_ratio(h.model, context=lambda: chosen.attach(h.model))
    return MethodResult(name, results, cost.seconds, cost.peak_extra_mib, overhead,
                        {**asdict(settings), "alpha": chosen_alpha, "fitted_alpha": base_alpha}, curve)


def run_baseline(h: Harness, method: str, vanilla_val: float) -> MethodResult:
    trials = []
    total_seconds, peak = 0.0, 0.0
    for lr in h.settings.baseline_lrs:
        base_model, _ = models.load_model(h.model_dir)  # a fresh copy per trial: the base stays untouched
        epochs: list[dict] = []

        def on_epoch(epoch: int, peft_model) -> None:
            point = h.evaluate(peft_model, splits=("forget", "retain", VALIDATION_SPLIT))
            epochs.append({"x": epoch, "lr": lr, "forget_nll": baselines.answer_nll(peft_model, h.processor, h.forget), **point})

        baseline_settings = baselines.BaselineSettings(method=method, lr=lr, epochs=h.settings.baseline_epochs,
                                                       seed=h.settings.seed)
        with measure.measured() as cost:
            peft_model = baselines.train_baseline(base_model, h.processor, h.forget, h.retain_fit, baseline_settings,
                                                  progress=h.progress, on_epoch=on_epoch)
        total_seconds += cost.seconds
        peak = max(peak, cost.peak_extra_mib)
        trials.append({"lr": lr, "epochs": epochs, "settings": asdict(baseline_settings)})
        del peft_model, base_model
    keepers = [p for t in trials for p in t["epochs"] if classification(p[VALIDATION_SPLIT]) >= RETAIN_KEEP * vanilla_val]
    pool = keepers or [min((p for t in trials for p in t["epochs"]), key=lambda p: p["forget_nll"])]
    best = max(pool, key=lambda p: p["forget_nll"])
    # Retrain the chosen setting for the chosen number of epochs and measure that fit alone.
    base_model, _ = models.load_model(h.model_dir)
    chosen_settings = baselines.BaselineSettings(method=method, lr=best["lr"], epochs=best["x"], seed=h.settings.seed)
    with measure.measured() as cost:
        peft_model = baselines.train_baseline(base_model, h.processor, h.forget, h.retain_fit, chosen_settings,
                                              progress=h.progress)
    results = h.evaluate(peft_model, splits=REPORT_SPLITS)
    overhead = h.generation_time_ratio(peft_model)
    curve = [p for t in trials for p in t["epochs"]]  # every grid point: one line per learning rate
    return MethodResult(method, results, cost.seconds, cost.peak_extra_mib, overhead,
                        {**asdict(chosen_settings), "grid_seconds": round(total_seconds, 1),
                         "grid": [{"lr": t["lr"], "epochs": len(t["epochs"])} for t in trials]}, curve)


def run_compare(model_dir: Path, data_dir: Path, out_dir: Path, settings: CompareSettings,
                progress: bool = True, eraser_settings: FitSettings | None = None) -> dict:
    unknown = [m for m in settings.methods if m not in ALL_METHODS]
    if unknown:
        raise UserInputError(None, f"unknown method(s) {unknown}; choose from {list(ALL_METHODS)}")
    torch.manual_seed(settings.seed)
    h = Harness(Path(model_dir), Path(data_dir), settings, progress)
    vanilla = MethodResult("vanilla", h.evaluate(splits=REPORT_SPLITS + (VALIDATION_SPLIT,)))
    vanilla_val = classification(vanilla.results.pop(VALIDATION_SPLIT))
    methods: list[MethodResult] = [vanilla]
    eraser_settings = eraser_settings or FitSettings()
    for name in settings.methods:
        if name == "eraser":
            methods.append(run_eraser(h, name, eraser_settings, vanilla_val))
        elif name == "eraser-paper":
            methods.append(run_eraser(h, name, replace(eraser_settings, **PAPER_SETTINGS), vanilla_val))
        elif name in BASELINE_METHODS:
            methods.append(run_baseline(h, name, vanilla_val))
    summary = {"model": str(model_dir), "data": str(data_dir), "forget_ratio": settings.forget_ratio,
               "eraser_strength": settings.eraser_strength,
               "retain_keep": RETAIN_KEEP, "vanilla_retain_val_classification": vanilla_val,
               "methods": [asdict(m) for m in methods]}
    report.write_report(summary, Path(out_dir))
    return summary
