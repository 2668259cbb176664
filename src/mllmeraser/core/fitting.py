"""Fitting an eraser: contrast sets -> activations -> sufficient statistics -> closed-form gates.

1. Knowledge-recall inputs: the forget questions, their images perturbed by PGD (the model's own gradient,
   L-inf budget, pixels kept in range, eval mode, no parameter touched) so the model recalls the fact as
   strongly as it can. Knowledge-erasure inputs: questions the model refuses (on the testbed, questions
   about strangers) or any user-supplied set.
2. Forget (gate target 1) and retain (gate target 0) inputs: the forget questions (clean and PGD) and the
   retain questions (on a benchmark, less its validation hold-out, which only ever chooses settings).
3. The last prompt token's block output at every decoder layer feeds float64 sufficient statistics
   (`steering.SteeringStats`), then `steering.solve_gates` and `SteeringStats.direction` give (u_l, r_l).
The equations are in steering.py; this module only gathers their inputs. The one call that runs it all is
`Eraser.fit`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Sequence

import torch
from tqdm import tqdm

from ..errors import UserInputError
from . import hooks, models, steering
from .eraser import Eraser
from .inputs import QAItem


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


def fit_statistics(model, processor, *, forget: Sequence[QAItem], retain: Sequence[QAItem], erasure: Sequence[QAItem],
                   settings: FitSettings, layers_path: str | None = None,
                   progress: bool = True) -> tuple[steering.SteeringStats, str]:
    """The activations part: every contrast set through the model into one SteeringStats; also returns the
    decoder-layer path the statistics were taken at."""
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
