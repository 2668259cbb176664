"""What `mllmeraser compare` and `mllmeraser demo` run: every method on the same splits, one report.

Methods: vanilla; the eraser in its default mode and in the paper's mode (each also as a curve over its
strength); two references that train nothing (answering.py): `refuse`, the default eraser's fitted gate with a
fixed refusal as the whole answer where it fires, and `prompt`, a system prompt naming the forget people; the
LoRA baselines GA, GradDiff, KL, NPO and MMUnlearner (each a curve over epochs). Settings are chosen on
the validation people only (data.validation_items: held-out retain and real people), by one rule for all: the
strongest setting whose validation classification accuracy stays >= RETAIN_KEEP x vanilla's; the eraser's
prompt gate is calibrated on the same people. "Strongest" is the largest strength for the
eraser and, for a baseline, the grid point with the highest forget-set training loss (a training-time
quantity, not a reported metric). The reported splits never choose anything, whatever the protocol: the
validation people are left out of the reported retain and real splits under `--protocol mllmu` too. The
baselines train LoRA adapters on the one loaded model and take them out again after each trial, so the base
weights every method starts from are the same, bit for bit. Every method row also carries Open-MMUnlearning's
forget quality and model utility (omu.py). Several request sizes (`forget_ratios`) run on the one loaded model,
each measured as a run of its own (`run_compare_ratios`). On CLEAR data (detected, or `benchmark="clear"`) the
same methods run on clear_harness.ClearHarness: CLEAR's configs, metrics and validation hold-out.
"""

from __future__ import annotations

import io
import math
import re
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Sequence

import torch

from ..core import cache, gating, models
from ..core.eraser import Eraser
from ..core.eraser_fitter import EraserFitter
from ..core.settings import FitSettings, PaperGate
from .items import QAItem
from ..errors import UserInputError, atomic_write_bytes
from . import answering, attack_scoring, attack_set, baselines, clear, clear_harness, data, evaluate, facts, measure, \
    omu, protocols, report
from .data import REPORT_SPLITS, VALIDATION_SPLIT

ERASER_METHODS = ("eraser", "eraser-paper")
BASELINE_METHODS = ("ga", "graddiff", "kl", "npo", "mmunlearner")
REFERENCE_METHODS = ("refuse", "prompt")  # train nothing: does steering add anything over a guardrail or a prompt?
ALL_METHODS = ("vanilla",) + ERASER_METHODS + REFERENCE_METHODS + BASELINE_METHODS
RETAIN_KEEP = 0.97
CURVE_SCALES = (0.25, 0.5, 0.75, 1.0, 1.25, 1.5)  # eraser strengths, as multiples of the fitted alpha
# The paper's LLaVA-1.5 settings: hard null space, unshaped linear gate, per layer on the last token.
PAPER_SETTINGS = {"gate": PaperGate(ratio=0.3, gamma=0.1, floor=-math.inf, cap=math.inf, normalise_gate=False),
                  "alpha": 1.0}
# Where the gate must stay off, against the forget people in new renderings (Test_Set): the gate's held-out AUROC.
GATE_NEGATIVES = (VALIDATION_SPLIT, "real", "general", "unknown")
EXAMPLE_SPLITS = ("forget", "retain", "real")  # the report's before/after answers: two people of each


@dataclass
class CompareSettings:
    forget_ratio: int = 10
    methods: tuple[str, ...] = ALL_METHODS
    batch_size: int = 64
    baseline_lrs: tuple[float, ...] = (1e-4, 3e-4, 1e-3)
    baseline_epochs: int = 4
    # MMUnlearner's grid adds the saliency threshold to the learning rates (Open-MMUnlearning's search: 0.5, 1, 2)
    mmunlearner_thresholds: tuple[float, ...] = (0.5, 1.0, 2.0)
    curve_scales: tuple[float, ...] = CURVE_SCALES
    seed: int = 0
    protocol: str = "testbed"  # or "mllmu": MLLMU-Bench's own evaluation script (protocols.py); CLEAR: testbed only
    benchmark: str = "auto"  # "mllmu" or "clear"; auto: CLEAR where the data holds its configs (clear.detect)
    erasure: str | None = None  # the erasers' erasure inputs, a data.resolve_spec SPEC (default: Unknown_Train)
    device: str | None = None  # models.load_model's placement: default cuda + bfloat16 where there is a GPU
    dtype: str | None = None
    device_map: str | None = None
    cache_dir: Path | None = field(default_factory=cache.default_cache_dir)  # the erasers' model cache (None: off)
    attacks: bool = False  # also run the attack suite (attack_suite.py) on vanilla and every method (minutes more)
    attack_retain_people: int | None = 8

    def model_options(self) -> dict:
        return {"device": self.device, "dtype": self.dtype, "device_map": self.device_map}


@dataclass
class MethodResult:
    name: str
    results: dict[str, dict[str, float]]
    fit_seconds: float | None = None
    peak_extra_mib: float | None = None
    settings: dict = field(default_factory=dict)
    curve: list[dict] = field(default_factory=list)  # [{"x": strength or epoch, "forget": {...}, "retain": {...}}]
    # erasers: {"fire_rate": {split: fraction of prompts the gate turns on} (prompt gates), "auroc": held-out AUROC,
    # "threshold": tau or None, "scores": {split: [gate scores]}}
    gate: dict | None = None
    omu: dict = field(default_factory=dict)  # Open-MMUnlearning's forget quality, model utility, their HM (omu.py)
    # how a method that trains nothing answers (answering.py: the chosen eraser, refuse, prompt); not serialised
    answering: object | None = field(default=None, repr=False)


def classification(metrics: dict[str, float]) -> float:
    values = [metrics[k] for k in ("classification_image", "classification_text") if k in metrics]
    return sum(values) / len(values) if values else math.nan


def rouge_l(metrics: dict[str, float]) -> float:
    values = [metrics[k] for k in ("rougeL_image", "rougeL_text") if k in metrics]
    return sum(values) / len(values) if values else math.nan


class Harness:
    """The model, its processor and the fixed question sets every method is measured on (MLLMU-Bench's; CLEAR's
    harness, clear_harness.ClearHarness, answers the same calls)."""

    benchmark = "mllmu"
    report_splits = REPORT_SPLITS
    validation_rule = {"metric": "validation classification accuracy",
                       "people": "held-out retain and real people, never reported"}
    scoring = attack_scoring.MLLMU_SCORING  # how the attacked splits are scored
    skipped_attacks: dict[str, str] = {}  # every attack applies

    def __init__(self, model_dir: Path, data_dir: Path, settings: CompareSettings, progress: bool,
                 erasure: list[QAItem] | None = None, loaded: tuple | None = None):
        self.model_dir, self.data_dir, self.settings, self.progress = model_dir, data_dir, settings, progress
        self.erasure = erasure  # the erasers' erasure inputs (resolved before the model loads)
        # (model, processor) already loaded, as several request sizes share them; else loaded here
        self.model, self.processor = loaded or models.load_model(model_dir, **settings.model_options())
        self.fisher_cache: dict = {}  # MMUnlearner's Fishers: the same for every grid trial of this request
        # The validation people choose every setting, so they are left out of retain and real whatever the protocol.
        self.items = evaluate.report_items(data_dir, settings.forget_ratio, REPORT_SPLITS + (VALIDATION_SPLIT,))
        self.questions = evaluate.prepare(data_dir, settings.forget_ratio, self.items, settings.protocol, settings.seed)
        self.forget = self.items["forget"]
        self.retain_fit = data.retained_inputs(data_dir, settings.forget_ratio)
        self.validation = self.items.get(VALIDATION_SPLIT, [])
        self.attacked = (attack_set.attack_set(data_dir, settings.forget_ratio,
                                               retain_people=settings.attack_retain_people)
                         if settings.attacks else None)
        self.attack_results: dict[str, dict] = {}  # {method: attack_scoring.score_attacks}, filled where attacked
        # The fact-leak rate (facts.py): vanilla's per-question "states the fact" flags, once vanilla is measured
        # (evaluate(reference=True)); each later evaluation is compared with them question by question.
        self.vanilla_stated: dict[str, list] | None = None
        if not self.validation:
            raise UserInputError(data_dir, "the retain split has no validation subjects to choose settings on")

    def evaluate(self, model=None, splits: Sequence[str] | None = None, ask=None,
                 reference: bool = False) -> dict[str, dict[str, float]]:
        """Every split's scores; `ask` rewrites the questions first (a method's system prompt). Beside ROUGE-L,
        the fraction of generation answers that state their fact and, once vanilla is the `reference`, the
        fact-leak rate against vanilla's answers (evaluate.add_fact_metrics; every other number unchanged)."""
        chosen = {s: self.questions[s] for s in (splits or self.questions) if s in self.questions}
        chosen = {s: ask(q) for s, q in chosen.items()} if ask is not None else chosen
        answers: dict[str, list[str]] = {}
        results = evaluate.score(model or self.model, self.processor, chosen, self.settings.protocol,
                                 self.settings.batch_size, self.progress, answers_out=answers)
        # Facts from the questions as prepared (before `ask` rewrites them), read at each call: cheap, and a
        # caller may have cut the question sets down since the harness was made.
        split_fact = evaluate.split_facts({s: self.questions[s] for s in chosen})
        if reference:  # vanilla against itself: its leak is 1 (every fact it states, it keeps)
            self.vanilla_stated = {s: facts.stated(split_fact[s], a) for s, a in answers.items()}
        evaluate.add_fact_metrics(results, split_fact, answers, self.vanilla_stated)
        return results

    def validation_score(self, metrics: dict[str, float]) -> float:
        """What a setting must keep of vanilla's on the validation people: classification accuracy."""
        return classification(metrics)

    def omu_scores(self, results: dict[str, dict[str, float]]) -> dict[str, float]:
        return omu.scores(results)

    def system_prompt(self) -> str:
        """The `prompt` method's system text: the forget split's people by name."""
        return answering.forget_system_prompt(self.data_dir, self.settings.forget_ratio)

    def score_attacks(self, model, attacked) -> dict:
        return attack_scoring.score_attacks(model, self.processor, attacked, self.settings.batch_size,
                                            self.progress, self.scoring)


def gate_diagnostics(h: Harness, eraser: Eraser) -> dict:
    """The gate's scores on every report split and the validation people, the fraction of prompts it turns on
    (prompt gates), and its held-out AUROC: Test_Set (forget people, new renderings) against GATE_NEGATIVES."""
    raw = evaluate.gate_scores(h.model, h.processor, eraser, h.items, h.settings.batch_size)  # [N, K] per split
    scores = {split: values.max(dim=1).values for split, values in raw.items()}
    gate = eraser.prompt_gate
    negatives = [scores[s] for s in GATE_NEGATIVES if s in scores]
    auroc = gating.auroc(scores["test"], torch.cat(negatives)) if "test" in scores and negatives else math.nan
    fire_rate = None if gate is None else {split: evaluate.fire_rate(values, eraser) for split, values in raw.items()}
    return {"auroc": auroc, "fire_rate": fire_rate, "threshold": None if gate is None else list(gate.threshold),
            "scores": {split: [round(float(x), 4) for x in values] for split, values in scores.items()}}


def fit_request(h: Harness, settings: FitSettings) -> tuple[Eraser, object, object, dict[str, float]]:
    """Fit on forget vs the retained inputs, the gate calibrated on the validation people: (eraser, the fit's
    cost, the shared statistics, the fit's stage timings). The retain, erasure and calibration statistics come
    from the model cache (built here if cold, timed apart): the fit time is the request's own. `settings` are
    resolved at the model's depth (FitSettings.for_model) by the caller."""
    shared = cache.shared_statistics(h.model, h.processor, retain=h.retain_fit, erasure=h.erasure,
                                     calibration=h.validation, settings=settings, cache_dir=h.settings.cache_dir,
                                     progress=h.progress)
    timings: dict[str, float] = {}
    with measure.measured() as cost:
        fitter = EraserFitter.from_shared(h.model, h.processor, shared, settings, progress=h.progress)
        eraser = fitter.fit(h.forget, request=f"forget_{h.settings.forget_ratio}", timings=timings)
    return eraser, cost, shared, timings


def run_eraser(h: Harness, name: str, settings: FitSettings, vanilla_val: float) -> MethodResult:
    """fit_request, then choose the strength by the validation rule; the report splits are measured at that one
    strength."""
    settings = settings.for_model(h.model)  # the results record the decision layer a fraction names
    eraser, cost, shared, timings = fit_request(h, settings)
    base_alpha = eraser.alpha[0]
    curve = []
    chosen_alpha = None
    for scale in sorted(h.settings.curve_scales):
        candidate = eraser.with_alpha(base_alpha * scale)
        with candidate.attach(h.model):
            point = h.evaluate(splits=("forget", "retain", VALIDATION_SPLIT))
        curve.append({"x": base_alpha * scale, **point})
        if h.validation_score(point[VALIDATION_SPLIT]) >= RETAIN_KEEP * vanilla_val:
            chosen_alpha = base_alpha * scale  # strengths ascend: the last one that keeps utility wins
    chosen_alpha = chosen_alpha if chosen_alpha is not None else base_alpha * min(h.settings.curve_scales)
    chosen = eraser.with_alpha(chosen_alpha)
    with chosen.attach(h.model):
        results = h.evaluate(splits=h.report_splits)
    cost_record = {"model_cache": shared.status, "model_cache_seconds": round(shared.seconds, 3),
                   "fit_stages": {stage: round(value, 3) for stage, value in timings.items()}}
    return MethodResult(name, results, cost.seconds, cost.peak_extra_mib,
                        {**settings.record(), "alpha": chosen_alpha, "fitted_alpha": base_alpha, **cost_record}, curve,
                        gate=gate_diagnostics(h, chosen), answering=answering.Steered(chosen))


def run_refuse(h: Harness, methods: list[MethodResult], settings: FitSettings) -> MethodResult:
    """The default eraser's gate as a guardrail classifier: the refusal as the whole answer where it fires, no
    steering. The gate is this run's `eraser` (its strength plays no part in the gate), else fitted here with
    the same settings; its fit time is that fit's."""
    fitted = next((m for m in methods if m.name == "eraser"), None)
    if fitted is not None:
        eraser, seconds, peak = fitted.answering.eraser, fitted.fit_seconds, fitted.peak_extra_mib
    else:
        eraser, cost, _, _ = fit_request(h, settings.for_model(h.model))
        seconds, peak = cost.seconds, cost.peak_extra_mib
    refusing = answering.Refusing(eraser, h.processor)
    with refusing.attached(h.model):
        results = h.evaluate(splits=h.report_splits)
    return MethodResult("refuse", results, seconds, peak,
                        {"refusal": answering.REFUSAL, "gate_from": "eraser" if fitted else "fitted here"},
                        answering=refusing)


def run_prompt(h: Harness) -> MethodResult:
    """No eraser: a system prompt naming the forget people leads every question's first user turn."""
    prompting = answering.SystemPrompted(h.system_prompt())
    results = h.evaluate(splits=h.report_splits, ask=prompting.ask)
    return MethodResult("prompt", results, settings={"system_prompt": prompting.text}, answering=prompting)


def request_fit(methods: list[MethodResult]) -> dict | None:
    """The eraser's fit for one request (model cache warm) against the fastest baseline fit of the same run:
    seconds each and their ratio (None where either is missing)."""
    eraser = next((m for m in methods if m.name == "eraser" and m.fit_seconds is not None), None)
    baselines_fitted = [m for m in methods if m.name in BASELINE_METHODS and m.fit_seconds is not None]
    if eraser is None or not baselines_fitted:
        return None
    fastest = min(baselines_fitted, key=lambda m: m.fit_seconds)
    return {"eraser_seconds": eraser.fit_seconds, "model_cache": eraser.settings.get("model_cache"),
            "model_cache_seconds": eraser.settings.get("model_cache_seconds"),
            "fastest_baseline": fastest.name, "baseline_seconds": fastest.fit_seconds,
            "ratio": eraser.fit_seconds / fastest.fit_seconds}


def examples(h: Harness, methods: list[MethodResult], out_dir: Path, people: int = 2) -> list[dict]:
    """Before/after answers for a few forget, retain and real people: each one's first image generation question,
    answered by vanilla and by every eraser; the portraits are written to out_dir/examples/."""
    rows = []
    for split in EXAMPLE_SPLITS:
        seen: list[str] = []
        for item in h.items.get(split, []):
            if item.task != "generation" or item.modality != "image" or item.subject_id in seen:
                continue
            seen.append(item.subject_id)
            picture = Path("examples") / f"{re.sub(r'[^A-Za-z0-9_.-]+', '_', item.subject_id)}.png"
            buffer = io.BytesIO()
            item.image.save(buffer, format="PNG")
            atomic_write_bytes(out_dir / picture, buffer.getvalue())
            rows.append({"split": split, "subject": item.subject_id, "image": str(picture), "question": item.question,
                         "item": item})
            if len(seen) == people:
                break
    items = [row.pop("item") for row in rows]
    answers = {"vanilla": models.answer_items(h.model, h.processor, items, progress=False)}
    for m in methods:
        if m.answering is not None:
            with m.answering.attached(h.model):
                answers[m.name] = models.answer_items(h.model, h.processor, m.answering.ask(items), progress=False)
    for index, row in enumerate(rows):
        row["answers"] = {name: values[index] for name, values in answers.items()}
    return rows


def baseline_trial(h: Harness, settings: baselines.BaselineSettings, on_epoch=None,
                   splits: Sequence[str] = (), on_mask=None,
                   fisher_cache: dict | None = None) -> tuple[dict[str, dict[str, float]], object]:
    """Train one LoRA baseline on the harness model, measure `splits` with the adapter in place, then take the
    adapter out again (peft's unload: not merged), so the base weights are exactly as before. Returns the
    results and the cost. `fisher_cache`: MMUnlearner's Fishers shared by a grid's trials (baselines.py)."""
    with measure.measured() as cost:
        peft_model = baselines.train_baseline(h.model, h.processor, h.forget, h.retain_fit, settings,
                                              progress=h.progress, on_epoch=on_epoch, fisher_cache=fisher_cache,
                                              on_mask=on_mask)
    try:
        if splits:
            attack(h, settings.method, peft_model)
        return (h.evaluate(peft_model, splits=splits) if splits else {}), cost
    finally:
        h.model = baselines.strip_lora(peft_model)


def baseline_grid(h: Harness, method: str) -> list[dict]:
    """The settings a baseline's grid tries besides the epochs (each a curve over epochs): every learning rate,
    and for MMUnlearner every saliency threshold with each."""
    if method == "mmunlearner":
        return [{"lr": lr, "saliency_threshold": t} for lr in h.settings.baseline_lrs
                for t in h.settings.mmunlearner_thresholds]
    return [{"lr": lr} for lr in h.settings.baseline_lrs]


def run_baseline(h: Harness, method: str, vanilla_val: float) -> MethodResult:
    trials = []
    total_seconds, peak = 0.0, 0.0
    for point in baseline_grid(h, method):
        epochs: list[dict] = []
        mask: dict = {}

        def on_epoch(epoch: int, peft_model) -> None:
            measured = h.evaluate(peft_model, splits=("forget", "retain", VALIDATION_SPLIT))
            epochs.append({"x": epoch, **point, "forget_nll": baselines.answer_nll(peft_model, h.processor, h.forget),
                           **measured})

        baseline_settings = baselines.BaselineSettings(method=method, epochs=h.settings.baseline_epochs,
                                                       seed=h.settings.seed, **point)
        _, cost = baseline_trial(h, baseline_settings, on_epoch, on_mask=mask.update, fisher_cache=h.fisher_cache)
        total_seconds += cost.seconds
        peak = max(peak, cost.peak_extra_mib)
        trials.append({**point, "epochs": epochs, "settings": asdict(baseline_settings), **mask})
    keepers = [p for t in trials for p in t["epochs"]
               if h.validation_score(p[VALIDATION_SPLIT]) >= RETAIN_KEEP * vanilla_val]
    pool = keepers or [min((p for t in trials for p in t["epochs"]), key=lambda p: p["forget_nll"])]
    best = max(pool, key=lambda p: p["forget_nll"])
    # Retrain the chosen setting for the chosen number of epochs and measure that fit alone (MMUnlearner's
    # Fishers included: no cache).
    chosen_point = {key: best[key] for key in baseline_grid(h, method)[0]}
    chosen_settings = baselines.BaselineSettings(method=method, epochs=best["x"], seed=h.settings.seed, **chosen_point)
    chosen_mask: dict = {}
    results, cost = baseline_trial(h, chosen_settings, splits=h.report_splits, on_mask=chosen_mask.update)
    curve = [p for t in trials for p in t["epochs"]]  # every grid point: one line per learning rate (and threshold)
    grid = [{**{k: v for k, v in t.items() if k not in ("epochs", "settings")}, "epochs": len(t["epochs"])}
            for t in trials]
    return MethodResult(method, results, cost.seconds, cost.peak_extra_mib,
                        {**asdict(chosen_settings), "grid_seconds": round(total_seconds, 1), "grid": grid,
                         **chosen_mask},
                        curve)


def attack(h: Harness, name: str, model=None, ask=None) -> None:
    """The attack suite on `model` (default: the harness model as it is now), where the settings ask for it;
    `ask` rewrites the attacked questions first (a method's system prompt)."""
    if h.attacked is not None:
        attacked = h.attacked if ask is None else attack_scoring.asked(h.attacked, ask)
        h.attack_results[name] = h.score_attacks(model or h.model, attacked)


def check_settings(settings: CompareSettings, data_dir: Path, forget_ratios: Sequence[int] = ()) -> str:
    """The methods, the protocol and every request size checked against the benchmark `data_dir` holds (one
    line each, before the model loads); returns that benchmark."""
    unknown = [m for m in settings.methods if m not in ALL_METHODS]
    if unknown:
        raise UserInputError(None, f"unknown method(s) {unknown}; choose from {list(ALL_METHODS)}")
    protocols.check_protocol(settings.protocol)
    benchmark = clear.detect(data_dir, settings.benchmark)
    for ratio in forget_ratios or (settings.forget_ratio,):
        if benchmark == "clear":
            clear.forget_config(ratio)
        else:
            data.split_dir_name("forget", ratio)
    if benchmark == "clear" and settings.protocol != "testbed":
        clear.refuse_protocol(settings.protocol)
    return benchmark


def run_compare(model_dir: Path, data_dir: Path, out_dir: Path, settings: CompareSettings,
                progress: bool = True, eraser_settings: FitSettings | None = None, loaded: tuple | None = None) -> dict:
    """Every method on one request (settings.forget_ratio); the report in out_dir. `loaded`: (model, processor)
    already loaded from model_dir (several request sizes share them)."""
    benchmark = check_settings(settings, data_dir)
    # The erasure inputs first: a data set without them (the real MLLMU-Bench has no Unknown_Train) is an
    # error before the model loads, not after the vanilla evaluation.
    erasure = (data.erasure_items(settings.erasure, data_dir, settings.forget_ratio)
               if any(m in ERASER_METHODS + ("refuse",) for m in settings.methods) else None)
    torch.manual_seed(settings.seed)
    harness = clear_harness.ClearHarness if benchmark == "clear" else Harness
    h = harness(Path(model_dir), Path(data_dir), settings, progress, erasure, loaded)
    vanilla = MethodResult("vanilla", h.evaluate(splits=h.report_splits + (VALIDATION_SPLIT,), reference=True))
    vanilla_val = h.validation_score(vanilla.results.pop(VALIDATION_SPLIT))
    methods: list[MethodResult] = [vanilla]
    attack(h, "vanilla")
    eraser_settings = eraser_settings or FitSettings()
    for name in settings.methods:
        if name == "eraser":
            methods.append(run_eraser(h, name, eraser_settings, vanilla_val))
        elif name == "eraser-paper":
            paper = replace(eraser_settings, **PAPER_SETTINGS, pgd=replace(eraser_settings.pgd, stop_nll=None))
            methods.append(run_eraser(h, name, paper, vanilla_val))
        elif name == "refuse":
            methods.append(run_refuse(h, methods, eraser_settings))
        elif name == "prompt":
            methods.append(run_prompt(h))
        elif name in BASELINE_METHODS:
            methods.append(run_baseline(h, name, vanilla_val))
    for m in methods:
        m.omu = h.omu_scores(m.results)
        if m.answering is not None:
            with m.answering.attached(h.model):
                attack(h, m.name, ask=m.answering.ask)
    out_dir = Path(out_dir)
    summary = {"model": str(model_dir), "data": str(data_dir), "forget_ratio": settings.forget_ratio,
               "protocol": settings.protocol, "benchmark": h.benchmark, "splits": list(h.report_splits),
               "retain_keep": RETAIN_KEEP, "vanilla_validation": vanilla_val, "validation_rule": h.validation_rule,
               "examples": examples(h, methods, out_dir),
               "methods": [{f.name: getattr(m, f.name) for f in fields(m) if f.name != "answering"} for m in methods]}
    summary["request_fit"] = request_fit(methods)
    if h.attack_results:
        summary["attacks"] = attack_scoring.judge(h.attack_results, h.scoring)
        if h.skipped_attacks:
            summary["attacks"]["skipped"] = dict(h.skipped_attacks)
    report.write_report(summary, Path(out_dir))
    return summary


def run_compare_ratios(model_dir: Path, data_dir: Path, out_dir: Path, settings: CompareSettings,
                       forget_ratios: Sequence[int], progress: bool = True,
                       eraser_settings: FitSettings | None = None) -> dict:
    """One comparison per request size, on one loaded model. A single size is `run_compare`, exactly (its files
    in out_dir). Several each write a whole run of their own to out_dir/forget_<ratio>/, and together
    results.json ({"forget_ratios", "runs": [summary per size]}), results.md (a table per size), a plot of every
    method over the sizes and report.html (report.write_ratio_report)."""
    ratios = list(dict.fromkeys(forget_ratios))
    if len(ratios) == 1:
        return run_compare(model_dir, data_dir, out_dir, replace(settings, forget_ratio=ratios[0]), progress=progress,
                           eraser_settings=eraser_settings)
    benchmark = check_settings(settings, data_dir, ratios)
    loaded = models.load_model(Path(model_dir), **settings.model_options())
    runs = [run_compare(model_dir, data_dir, Path(out_dir) / report.ratio_dir(ratio), replace(settings, forget_ratio=ratio),
                        progress=progress, eraser_settings=eraser_settings, loaded=loaded)
            for ratio in ratios]
    combined = {"model": str(model_dir), "data": str(data_dir), "benchmark": benchmark, "forget_ratios": ratios,
                "runs": runs}
    report.write_ratio_report(combined, Path(out_dir))
    return combined

