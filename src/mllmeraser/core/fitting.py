"""Fitting an eraser: contrast sets -> activations -> sufficient statistics -> closed-form gates.

1. Knowledge-recall inputs: the forget questions, their images perturbed by PGD (the model's own gradient,
   L-inf budget, pixels kept in range, eval mode, no parameter touched) so the model recalls the fact as
   strongly as it can. Knowledge-erasure inputs: questions the model refuses (on the testbed, questions
   about strangers: the Unknown_Train split) or any user-supplied set.
2. Forget (gate target 1) and retain (gate target 0) inputs: the forget questions (clean and PGD) and the
   retain questions, less the validation hold-out, which only ever chooses settings.
3. The last prompt token's block output at every decoder layer feeds float64 sufficient statistics
   (`steering.SteeringStats`), then `steering.solve_gates` and `SteeringStats.direction` give (u_l, r_l).
The equations are in steering.py; this module only gathers their inputs.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from tqdm import tqdm

from . import hooks, models, steering
from ..bench import data
from ..bench.data import QAItem
from .eraser import Eraser, model_fingerprint
from ..errors import UserInputError

DEFAULT_ERASURE_SPLIT = "Unknown_Train"


@dataclass(frozen=True)
class PGDSettings:
    eps: float = 8 / 255  # L-inf budget in pixel units ([0, 1] images)
    step: float = 2 / 255
    steps: int = 10


@dataclass(frozen=True)
class FitSettings:
    # Defaults chosen on the testbed's retain validation hold-out only (README, "Results").
    solver: str = "ridge"  # "ridge" (soft null space, our default) or "paper" (hard null-space projection)
    ratio: float = 0.3  # paper: fraction of retain eigen-directions kept as the null space
    gamma: float = 0.1  # paper: ridge on the projected system
    beta: float = 16.0  # ridge: retain weight per sample relative to forget
    lam: float = 1e-5  # ridge: L2 penalty relative to the mean eigenvalue (identity directions have little variance)
    alpha: float = 1.0  # steering strength (positive erases: r points from recall to erasure)
    layers: tuple[int, ...] | None = None  # steered decoder layers; None: 1..L-1 as in the paper
    floor: float = 0.7  # gate shaping (steering.shape_gate): gates below the floor are 0, above the cap clipped
    cap: float = 1.0
    normalise_gate: bool = True  # rescale u_l so the mean gate over forget inputs is 1 (see solve_eraser)
    mode: str = "prefill"
    pgd: PGDSettings = field(default_factory=PGDSettings)
    batch_size: int = 32


def pgd_images(model, processor, items: Sequence[QAItem], settings: PGDSettings) -> torch.Tensor:
    """Adversarially perturbed pixel values (normalised, as the model takes them) that maximise the
    likelihood of each item's ground-truth answer. Parameters are never updated; only the pixels get
    gradients."""
    inputs = models.encode_with_answers(processor, items)
    labels = inputs.pop("labels")
    inputs = models.forward_inputs(model, inputs)
    clean = inputs.pop("pixel_values").detach().float()
    low, high, scale = (t.to(clean.device) for t in models.pixel_value_bounds(processor, clean))
    eps, step = settings.eps * scale, settings.step * scale
    adversarial = clean.clone()
    param_dtype = next(model.parameters()).dtype
    requires = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        for _ in range(settings.steps):
            adversarial.requires_grad_(True)
            loss = model(**inputs, pixel_values=adversarial.to(param_dtype), labels=labels.to(clean.device)).loss
            (gradient,) = torch.autograd.grad(loss, adversarial)
            with torch.no_grad():  # descend the answer's loss = ascend its likelihood
                adversarial = adversarial - step * gradient.sign()
                adversarial = torch.maximum(torch.minimum(adversarial, clean + eps), clean - eps)
                adversarial = torch.maximum(torch.minimum(adversarial, high), low)
    finally:
        for p, flag in zip(model.parameters(), requires):
            p.requires_grad_(flag)
    return adversarial.detach()


def collect(model, processor, layers, items: Sequence[QAItem], stats: steering.SteeringStats, groups: Sequence[str],
            batch_size: int, desc: str, pgd: PGDSettings | None = None, progress: bool = True) -> None:
    """Feed the last-prompt-token block outputs of `items` into `stats` under each of `groups`. With `pgd`,
    image questions are first perturbed (the knowledge-recall inputs)."""
    for indices in tqdm(models.batches(items, batch_size), desc=desc, disable=not progress, unit="batch", leave=False):
        chunk = [items[i] for i in indices]
        batch = models.encode_prompts(processor, chunk)
        if pgd is not None and chunk[0].modality == "image" and pgd.steps > 0:
            batch["pixel_values"] = pgd_images(model, processor, chunk, pgd)
        acts = hooks.capture_last_token(model, layers, **models.forward_inputs(model, batch))
        for group in groups:
            stats.update(group, acts)


def default_erasure_items(data_dir: str | Path | None) -> list[QAItem]:
    if data_dir is not None:
        path = data.split_parquet(data_dir, DEFAULT_ERASURE_SPLIT)
        if path.exists():
            return data.expand_items(data.read_records(path), path)
    raise UserInputError(data_dir, f"no {DEFAULT_ERASURE_SPLIT} split here: pass --erasure SPEC (questions the model refuses)")


def fit_statistics(model, processor, forget: Sequence[QAItem], retain: Sequence[QAItem], erasure: Sequence[QAItem],
                   settings: FitSettings, layers_path: str | None = None, progress: bool = True) -> tuple[steering.SteeringStats, str]:
    names, layers = hooks.find_decoder_layers(model, layers_path)
    path = names[0].rsplit(".", 1)[0]
    stats = steering.SteeringStats(len(layers), model.config.get_text_config().hidden_size)
    bs = settings.batch_size
    collect(model, processor, layers, forget, stats, ("recall", "forget"), bs, "recall (PGD)", settings.pgd, progress)
    collect(model, processor, layers, forget, stats, ("forget",), bs, "forget", None, progress)
    collect(model, processor, layers, erasure, stats, ("erasure",), bs, "erasure", None, progress)
    collect(model, processor, layers, retain, stats, ("retain",), bs, "retain", None, progress)
    return stats, path


def solve_eraser(stats: steering.SteeringStats, settings: FitSettings, layers_path: str, fingerprint: dict,
                 request: str = "forget") -> Eraser:
    """The closed-form part: gates and directions for the steered layers, packed as an Eraser."""
    params = ({"ratio": settings.ratio, "gamma": settings.gamma} if settings.solver == "paper"
              else {"beta": settings.beta, "lam": settings.lam})
    gates = steering.solve_gates(stats, settings.solver, **params)
    if settings.normalise_gate:
        # The least-squares target on forget inputs is 1, but how close the solution gets depends on beta and
        # lam; rescaling so the forget mean is exactly 1 gives alpha, floor and cap one meaning across settings.
        forget_means = torch.stack([stats.sums["forget"][l] @ gates[l] for l in range(stats.num_layers)]) / stats.counts["forget"]
        gates = gates / forget_means[:, None]
    direction = stats.direction()
    steered = list(settings.layers) if settings.layers is not None else list(range(1, stats.num_layers))
    if not steered or any(not 0 <= i < stats.num_layers for i in steered):
        raise UserInputError(None, f"--layers must name decoder layers 0..{stats.num_layers - 1}, got {steered}")
    meta = {"fingerprint": fingerprint,
            "requests": [{"name": request, "counts": dict(stats.counts),
                          "fit": {**{k: v for k, v in asdict(settings).items() if k not in ("floor", "cap", "alpha")}}}]}
    return Eraser(u=gates[steered].float(), r=direction[steered].float(), alpha=settings.alpha,
                  layer_indices=steered, layers_path=layers_path, hidden_size=stats.hidden_size,
                  mode=settings.mode, floor=settings.floor, cap=settings.cap, metadata=meta)


def fit_eraser(model, processor, forget: Sequence[QAItem], retain: Sequence[QAItem], erasure: Sequence[QAItem],
               settings: FitSettings = FitSettings(), layers_path: str | None = None, request: str = "forget",
               progress: bool = True) -> Eraser:
    if not forget or not retain or not erasure:
        raise UserInputError(None, "fitting needs non-empty forget, retain and erasure sets")
    stats, path = fit_statistics(model, processor, forget, retain, erasure, settings, layers_path, progress)
    return solve_eraser(stats, settings, path, model_fingerprint(model), request)


def retain_for_fit(items: Sequence[QAItem]) -> list[QAItem]:
    """Retain questions usable for fitting: the validation hold-out is kept out of every fit."""
    return [i for i in items if not data.is_validation_subject(i.subject_id)]


GENERAL_TRAIN = "General_Train"


def retained_inputs(data_dir: str | Path, forget_ratio: int = 10) -> list[QAItem]:
    """The inputs the gate must leave alone: the retain split less its validation hold-out and, where the data
    has it, the testbed's training-only General_Train (visual-skill prompts). The compare job, the demo, the
    benchmarks and `mllmeraser fit` without `--retain` all fit on exactly this."""
    retain = retain_for_fit(data.load_split_items(data_dir, "retain", forget_ratio) or [])
    general = data.split_parquet(data_dir, GENERAL_TRAIN)
    return retain + (data.expand_items(data.read_records(general), general) if general.exists() else [])


# ---- command line ----------------------------------------------------------------------------------------

def add_cli(commands) -> None:
    parser = commands.add_parser("fit", help="fit an eraser for a forget request")
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", default=None, help="MLLMU-Bench directory that split names refer to")
    parser.add_argument("--forget", required=True, help="split name (forget_10), split dir/parquet, or JSONL")
    parser.add_argument("--retain", default=None, help="split name (retain_90), split dir/parquet, or JSONL "
                        "(default: the retain split under --data less its validation part, plus General_Train)")
    parser.add_argument("--erasure", default=None, help=f"questions the model refuses (default: {DEFAULT_ERASURE_SPLIT} under --data)")
    parser.add_argument("--out", required=True, type=Path, help="eraser file (.safetensors)")
    parser.add_argument("--solver", choices=("ridge", "paper"), default=FitSettings.solver)
    parser.add_argument("--alpha", type=float, default=FitSettings.alpha)
    parser.add_argument("--ratio", type=float, default=FitSettings.ratio)
    parser.add_argument("--gamma", type=float, default=FitSettings.gamma)
    parser.add_argument("--beta", type=float, default=FitSettings.beta)
    parser.add_argument("--lam", type=float, default=FitSettings.lam)
    parser.add_argument("--floor", type=float, default=FitSettings.floor)
    parser.add_argument("--cap", type=float, default=FitSettings.cap)
    parser.add_argument("--layers", default=None, help="comma-separated decoder layer indices (default 1..L-1)")
    parser.add_argument("--layers-path", default=None, help="dotted path of the decoder layer list (overrides the family's)")
    parser.add_argument("--mode", choices=("prefill", "all"), default="prefill")
    parser.add_argument("--pgd-eps", type=float, default=PGDSettings.eps * 255, help="L-inf budget, in /255 units")
    parser.add_argument("--pgd-step", type=float, default=PGDSettings.step * 255, help="step, in /255 units")
    parser.add_argument("--pgd-steps", type=int, default=PGDSettings.steps)
    parser.add_argument("--forget-ratio", type=int, default=10, choices=(5, 10, 15))
    parser.set_defaults(handler=run_cli)


def settings_from_args(args) -> FitSettings:
    layers = tuple(int(x) for x in args.layers.split(",")) if args.layers else None
    return FitSettings(solver=args.solver, ratio=args.ratio, gamma=args.gamma, beta=args.beta, lam=args.lam,
                       alpha=args.alpha, layers=layers, floor=args.floor, cap=args.cap, mode=args.mode,
                       pgd=PGDSettings(args.pgd_eps / 255, args.pgd_step / 255, args.pgd_steps))


def run_cli(args) -> int:
    settings = settings_from_args(args)
    model, processor = models.load_model(args.model)
    forget = data.resolve_spec(args.forget, args.data, args.forget_ratio)
    if args.retain is not None:
        retain = retain_for_fit(data.resolve_spec(args.retain, args.data, args.forget_ratio))
    elif args.data is not None:
        retain = retained_inputs(args.data, args.forget_ratio)
    else:
        raise UserInputError(None, "pass --retain SPEC, or --data DIR to fit on its retain split")
    erasure = data.resolve_spec(args.erasure, args.data, args.forget_ratio) if args.erasure else default_erasure_items(args.data)
    started = time.perf_counter()
    eraser = fit_eraser(model, processor, forget, retain, erasure, settings, args.layers_path, request=str(args.forget))
    eraser.save(args.out)
    seconds = time.perf_counter() - started
    print(f"fitted eraser ({settings.solver}, {len(eraser.layer_indices)} layers, alpha {settings.alpha}) "
          f"on {len(forget)} forget / {len(retain)} retain / {len(erasure)} erasure questions in {seconds:.1f}s")
    print(f"wrote {args.out} ({args.out.stat().st_size / 1024:.1f} KiB)")
    return 0
