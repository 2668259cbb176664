"""Training-based unlearning baselines, run the way the field runs them, in our harness.

LoRA (r=16, alpha=16, dropout 0.05) on every linear layer of the model (vision tower, projector, decoder) but
the embeddings and lm_head; the base weights stay frozen and are never written to disk. Every loss is on the
answer tokens only (prompt and padding are -100 in `models.encode_with_answers`). With CE(D) the mean
token negative log-likelihood of the answers of a batch from D:

    GA        L = -CE(forget)
    GradDiff  L = -CE(forget) + w * CE(retain)
    KL        L = -CE(forget) + w * mean_t KL(p_theta(. | x_<t) || p_vanilla(. | x_<t))  over retain answer positions
    NPO       L = -(2/beta) * mean_i log sigmoid(beta * (S_theta(i) - S_ref(i)))          over forget samples
    MMUnlearner  g = m * grad(-CE(forget images)) + grad(CE(retain))                        (gamma = alpha = 1)

where S(i) = sum_t -log p(y_t | x, y_<t) is the sequence NLL of sample i's answer, and "vanilla" / "ref" is the
model with its adapter disabled (`PeftModel.disable_adapter()`): the same weights, no second copy.

MMUnlearner (Huo et al., ACL Findings 2025; the rule as its code and Open-MMUnlearning's trainer apply it): before
the first step, with the fresh adapter, the empirical Fisher F(D) = mean over D's batches of grad(CE)^2 is taken
per trainable (LoRA) parameter element on the forget image questions (F_f) and on what must be kept (F_p: the
forget people's text questions, whose textual knowledge the method keeps, and every retain question). The
weight-saliency mask is m = [(F_f + 1e-15) / (F_p + 1e-15) >= threshold]; each step, the gradient ascent on a
forget image batch reaches only the masked elements, while a retain batch's descent (added, weight 1) reaches all.
"""

from __future__ import annotations

import os
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..core import models
from ..core.models import IGNORE_INDEX, answer_logits, answer_token_nll  # noqa: F401 (the losses' inputs)
from .items import QAItem
from ..errors import UserInputError

Method = Literal["ga", "graddiff", "kl", "npo", "mmunlearner"]
METHODS: tuple[str, ...] = ("ga", "graddiff", "kl", "npo", "mmunlearner")
RETAIN_METHODS: tuple[str, ...] = ("graddiff", "kl", "mmunlearner")  # the methods that also see a retain batch each step
REFERENCE_METHODS: tuple[str, ...] = ("kl", "npo")  # the methods that need the vanilla model's outputs
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")


@dataclass(frozen=True)
class BaselineSettings:
    method: Method
    lr: float = 1e-4
    epochs: int = 3
    batch_size: int = 16
    lora_r: int = 16
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    npo_beta: float = 0.5
    retain_weight: float = 1.0
    seed: int = 0
    max_grad_norm: float = 1.0
    saliency_threshold: float = 1.0  # MMUnlearner: an element is updated by the ascent where F_f / F_p >= this
    mask_batches: int | None = None  # MMUnlearner: batches per Fisher source (None: all, as the paper)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise UserInputError(None, f"unknown baseline {self.method!r}; expected one of {METHODS}")
        if self.epochs < 0 or self.batch_size < 1 or self.lora_r < 1:
            raise UserInputError(None, "baseline epochs must be >= 0, batch size and LoRA rank >= 1")
        if self.npo_beta <= 0:
            raise UserInputError(None, f"NPO beta must be positive, got {self.npo_beta}")
        if self.saliency_threshold < 0 or (self.mask_batches is not None and self.mask_batches < 1):
            raise UserInputError(None, "the saliency threshold must be >= 0 and mask batches >= 1")


# ---- LoRA ------------------------------------------------------------------------------------------------

def wrap_lora(model, settings: BaselineSettings):
    """The model with a fresh LoRA adapter on every linear layer but lm_head (peft's "all-linear" drops the
    output layer; embeddings are not nn.Linear). A = kaiming-uniform from the torch RNG, B = 0, so the wrapped
    model computes exactly what the base model does until the first step. Only `lora_` parameters train."""
    from peft import LoraConfig, get_peft_model
    from peft.tuners.tuners_utils import BaseTunerLayer

    if any(isinstance(module, BaseTunerLayer) for module in model.modules()):
        raise ValueError("the model already carries LoRA layers; strip_lora(peft_model) gives the base model back")
    config = LoraConfig(r=settings.lora_r, lora_alpha=settings.lora_alpha, lora_dropout=settings.lora_dropout,
                        target_modules="all-linear", bias="none")
    with warnings.catch_warnings():  # peft calls a transformers v5-deprecated property; noise for our users
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        peft_model = get_peft_model(model, config)
    for name, parameter in peft_model.named_parameters():
        parameter.requires_grad_("lora_" in name)
    return peft_model


def lora_parameters(peft_model) -> list[torch.nn.Parameter]:
    return [p for name, p in peft_model.named_parameters() if "lora_" in name]


def strip_lora(peft_model):
    """The base model with every LoRA layer taken out again (not merged): its modules and weights are the
    original ones, so the next baseline can be trained on the same in-memory model. (Its parameters keep
    requires_grad=False, as `wrap_lora` left them.)"""
    return peft_model.unload()


# ---- losses (pure functions of logits and labels) ----------------------------------------------------------

def mean_answer_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """CE = sum over answer tokens of -log p(y_t | x, y_<t), divided by the number of answer tokens in the batch
    (the token-mean of Hugging Face's causal LM loss)."""
    nll, mask = answer_token_nll(logits, labels)
    return nll.sum() / mask.sum().clamp(min=1)


def sequence_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """S(i) = sum_t -log p(y_t | x_i, y_<t) over sample i's answer tokens: -log pi(y_i | x_i). Shape [B]."""
    nll, _ = answer_token_nll(logits, labels)
    return nll.sum(dim=-1)


def answer_kl(current_logits: torch.Tensor, reference_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """KL(p_current || p_reference) = sum_v p_c(v) (log p_c(v) - log p_r(v)) at each position that predicts an
    answer token, averaged over those positions."""
    mask = labels[:, 1:] != IGNORE_INDEX
    current = F.log_softmax(current_logits[:, :-1].float(), dim=-1)
    reference = F.log_softmax(reference_logits[:, :-1].float(), dim=-1)
    kl = (current.exp() * (current - reference)).sum(dim=-1)
    return (kl * mask).sum() / mask.sum().clamp(min=1)


def ga_loss(forget_ce: torch.Tensor) -> torch.Tensor:
    """Gradient ascent: L = -CE(forget)."""
    return -forget_ce


def graddiff_loss(forget_ce: torch.Tensor, retain_ce: torch.Tensor, retain_weight: float) -> torch.Tensor:
    """Gradient difference: L = -CE(forget) + w * CE(retain)."""
    return -forget_ce + retain_weight * retain_ce


def kl_loss(forget_ce: torch.Tensor, retain_kl: torch.Tensor, retain_weight: float) -> torch.Tensor:
    """KL minimisation: L = -CE(forget) + w * KL(p_theta || p_vanilla) on retain answer positions."""
    return -forget_ce + retain_weight * retain_kl


def npo_loss(forget_nll: torch.Tensor, reference_nll: torch.Tensor, beta: float) -> torch.Tensor:
    """Negative preference optimisation (Zhang et al. 2024):
        L = -(2/beta) E log sigmoid(-beta log(pi_theta(y|x) / pi_ref(y|x)))
          = -(2/beta) E log sigmoid(beta (S_theta - S_ref)),   since log pi(y|x) = -S.
    Minimising it raises S_theta (the forget answers become less likely), bounded unlike GA; at S_theta = S_ref
    it is (2/beta) log 2, and as beta -> 0 its gradient tends to GA's on the summed NLL."""
    return -(2.0 / beta) * F.logsigmoid(beta * (forget_nll - reference_nll)).mean()


# ---- forward passes --------------------------------------------------------------------------------------

def reference_answer_logits(peft_model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """`answer_logits` of the vanilla model: the adapter disabled, no dropout, no gradient."""
    was_training = peft_model.training
    peft_model.eval()
    try:
        with torch.no_grad(), peft_model.disable_adapter():
            return answer_logits(peft_model, batch)
    finally:
        peft_model.train(was_training)


@torch.no_grad()
def answer_nll(model, processor, items: Sequence[QAItem], batch_size: int = 32) -> float:
    """Mean answer-token NLL of `items` under `model` (eval mode): how strongly it still recalls them. The
    compare job's selection rule reads it on the forget set as a training-time signal of unlearning strength."""
    total, count = 0.0, 0
    for indices in models.batches(items, batch_size):
        logits, labels = answer_logits(model, models.encode_with_answers(processor, [items[i] for i in indices]))
        nll, mask = answer_token_nll(logits, labels)
        total += float(nll.sum())
        count += int(mask.sum())
    return total / max(count, 1)


def method_loss(peft_model, settings: BaselineSettings, forget_batch: dict[str, torch.Tensor],
                retain_batch: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """The training loss of `settings.method` on one forget batch (and, for GradDiff/KL/MMUnlearner, one retain
    batch), both from `models.encode_with_answers`. MMUnlearner's objective is GradDiff's; its saliency mask acts
    on the gradient (`mmunlearner_backward`), not on the loss."""
    if settings.method in RETAIN_METHODS and retain_batch is None:
        raise ValueError(f"{settings.method} needs a retain batch")
    if settings.method == "npo":
        reference_logits, labels = reference_answer_logits(peft_model, forget_batch)
        logits, labels = answer_logits(peft_model, forget_batch)
        return npo_loss(sequence_nll(logits, labels), sequence_nll(reference_logits, labels), settings.npo_beta)
    forget_logits, forget_labels = answer_logits(peft_model, forget_batch)
    forget_ce = mean_answer_ce(forget_logits, forget_labels)
    if settings.method == "ga":
        return ga_loss(forget_ce)
    if settings.method in ("graddiff", "mmunlearner"):
        retain_logits, retain_labels = answer_logits(peft_model, retain_batch)
        return graddiff_loss(forget_ce, mean_answer_ce(retain_logits, retain_labels), settings.retain_weight)
    reference_logits, retain_labels = reference_answer_logits(peft_model, retain_batch)
    retain_logits, _ = answer_logits(peft_model, retain_batch)
    return kl_loss(forget_ce, answer_kl(retain_logits, reference_logits, retain_labels), settings.retain_weight)


# ---- MMUnlearner: the weight-saliency mask ---------------------------------------------------------------

SALIENCY_EPSILON = 1e-15  # keeps the ratio defined where both Fishers vanish (there it is 1)


def mmunlearner_sets(forget: Sequence[QAItem], retain: Sequence[QAItem]) -> tuple[list[QAItem], list[list[QAItem]]]:
    """(the questions the ascent runs on, the Fisher sources of what must be kept). MMUnlearner forgets a
    person's visual pattern and keeps their textual knowledge: the ascent runs on the forget image questions,
    and the forget people's text questions join the retain questions on the preserved side. A forget set
    without image questions (plain text requests) is ascended whole."""
    images = [item for item in forget if item.modality == "image"]
    if not images:
        return list(forget), [list(retain)]
    texts = [item for item in forget if item.modality != "image"]
    return images, [group for group in (texts, list(retain)) if group]


def spread_batches(groups: list[list[int]], limit: int | None) -> list[list[int]]:
    """At most `limit` of `groups`, evenly spaced: `models.batches` groups by modality and task, so the first
    few batches alone would all be one kind of question."""
    if limit is None or len(groups) <= limit:
        return groups
    return [groups[(k * len(groups)) // limit] for k in range(limit)]


def empirical_fisher(model, processor, sources: Sequence[Sequence[QAItem]], parameters: dict[str, torch.nn.Parameter],
                     batch_size: int, max_batches: int | None = None) -> dict[str, torch.Tensor]:
    """F = mean over every batch of every source of grad(CE)^2, per element of each of `parameters` (float32).
    At most `max_batches` batches per source. The model stays in the mode the caller set (train, as the
    paper's code computes it: dropout on)."""
    fisher = {name: torch.zeros_like(p, dtype=torch.float32) for name, p in parameters.items()}
    count = 0
    for items in sources:
        for indices in spread_batches(models.batches(items, batch_size), max_batches):
            logits, labels = answer_logits(model, models.encode_with_answers(processor, [items[i] for i in indices]))
            model.zero_grad(set_to_none=True)
            mean_answer_ce(logits, labels).backward()
            for name, parameter in parameters.items():
                if parameter.grad is not None:
                    fisher[name] += parameter.grad.detach().float().square()
            count += 1
    model.zero_grad(set_to_none=True)
    if count == 0:
        raise UserInputError(None, "MMUnlearner's saliency mask needs forget and retain questions")
    return {name: value / count for name, value in fisher.items()}


def saliency_mask(forget_fisher: dict[str, torch.Tensor], preserve_fisher: dict[str, torch.Tensor],
                  threshold: float, epsilon: float = SALIENCY_EPSILON) -> dict[str, torch.Tensor]:
    """m = [(F_f + eps) / (F_p + eps) >= threshold] per element: the weights that matter more to the forget
    set than to what must be kept."""
    return {name: (value + epsilon) / (preserve_fisher[name] + epsilon) >= threshold
            for name, value in forget_fisher.items()}


def mask_fraction(mask: dict[str, torch.Tensor]) -> float:
    """The fraction of the masked parameters' elements the ascent may update."""
    kept = sum(int(m.sum()) for m in mask.values())
    total = sum(m.numel() for m in mask.values())
    return kept / max(total, 1)


def mmunlearner_mask(peft_model, processor, forget: Sequence[QAItem], retain: Sequence[QAItem],
                     settings: BaselineSettings, fisher_cache: dict | None = None) -> dict[str, torch.Tensor]:
    """The saliency mask over the adapter's trainable parameters, from the Fishers at the fresh adapter. With
    `fisher_cache` (a dict), the Fishers are read from it where present and stored in it otherwise: they do not
    depend on the learning rate or the threshold, only on the seed, so a grid computes them once."""
    parameters = {name: p for name, p in peft_model.named_parameters() if p.requires_grad}
    cache = fisher_cache if fisher_cache is not None else {}
    if "forget" not in cache:
        ascended, preserved = mmunlearner_sets(forget, retain)
        peft_model.train()
        cache["forget"] = empirical_fisher(peft_model, processor, [ascended], parameters, settings.batch_size,
                                           settings.mask_batches)
        cache["preserve"] = empirical_fisher(peft_model, processor, preserved, parameters, settings.batch_size,
                                             settings.mask_batches)
    return saliency_mask(cache["forget"], cache["preserve"], settings.saliency_threshold)


def mmunlearner_backward(peft_model, settings: BaselineSettings, forget_batch: dict[str, torch.Tensor],
                         retain_batch: dict[str, torch.Tensor], parameters: dict[str, torch.nn.Parameter],
                         mask: dict[str, torch.Tensor]) -> torch.Tensor:
    """Gradients of one MMUnlearner step: the ascent's, masked, then the retain descent's, unmasked, added
    (two backward passes, so the mask touches only the ascent). Returns the objective's value."""
    forget_logits, forget_labels = answer_logits(peft_model, forget_batch)
    forget_ce = mean_answer_ce(forget_logits, forget_labels)
    ga_loss(forget_ce).backward()
    with torch.no_grad():
        for name, parameter in parameters.items():
            if parameter.grad is not None:
                parameter.grad.mul_(mask[name].to(parameter.grad.dtype))
    retain_logits, retain_labels = answer_logits(peft_model, retain_batch)
    retain_ce = mean_answer_ce(retain_logits, retain_labels)
    (settings.retain_weight * retain_ce).backward()
    return graddiff_loss(forget_ce.detach(), retain_ce.detach(), settings.retain_weight)


# ---- training loop ---------------------------------------------------------------------------------------

def forget_batches_for_epoch(forget: Sequence[QAItem], batch_size: int, rng: np.random.Generator) -> list[list[int]]:
    """Indices into `forget`, shuffled, grouped as `models.batches` groups them (one modality and task per
    batch), in shuffled batch order."""
    order = rng.permutation(len(forget))
    grouped = models.batches([forget[i] for i in order], batch_size)
    return [[int(order[j]) for j in grouped[b]] for b in rng.permutation(len(grouped))]


def retain_pools(retain: Sequence[QAItem]) -> dict[str, list[int]]:
    """Indices of the retain items by modality: a step's retain batch comes from its forget batch's modality."""
    pools: dict[str, list[int]] = {}
    for index, item in enumerate(retain):
        pools.setdefault(item.modality, []).append(index)
    return pools


def draw_retain_batch(pools: dict[str, list[int]], modality: str, size: int, rng: np.random.Generator) -> list[int]:
    pool = pools[modality]
    return [pool[int(i)] for i in rng.choice(len(pool), size=min(size, len(pool)), replace=False)]


def check_inputs(forget: Sequence[QAItem], retain: Sequence[QAItem], settings: BaselineSettings) -> None:
    if not forget:
        raise UserInputError(None, "a training baseline needs forget questions")
    if settings.method in RETAIN_METHODS:
        have = {item.modality for item in retain}
        missing = sorted({item.modality for item in forget} - have)
        if missing:
            raise UserInputError(None, f"{settings.method} draws a retain batch of each forget batch's modality, "
                                       f"but retain has no {'/'.join(missing)} questions")


def train_baseline(model, processor, forget: list[QAItem], retain: list[QAItem], settings: BaselineSettings,
                   progress: bool = True, on_epoch: Callable[[int, object], None] | None = None,
                   fisher_cache: dict | None = None, on_mask: Callable[[dict], None] | None = None):
    """Unlearn `forget` with a LoRA adapter trained by `settings.method`; returns the PeftModel (eval mode).

    Seeded: torch.manual_seed(seed) fixes the LoRA init and dropout, a numpy Generator(seed) the shuffling and
    the retain draws. AdamW on the LoRA parameters only, gradient norm clipped to `max_grad_norm`. Each epoch
    visits every forget batch once (MMUnlearner: every forget image batch); `on_epoch(epoch, peft_model)`
    (epoch from 1) runs after each epoch with the model in eval mode. MMUnlearner first builds its saliency mask
    (`mmunlearner_mask`, reading and filling `fisher_cache`) and reports {"mask_kept": fraction} to `on_mask`.
    `model` gets the LoRA layers injected in place; `strip_lora` takes them out again."""
    check_inputs(forget, retain, settings)
    torch.manual_seed(settings.seed)
    rng = np.random.default_rng(settings.seed)
    peft_model = wrap_lora(model, settings)
    parameters = lora_parameters(peft_model)
    optimizer = torch.optim.AdamW(parameters, lr=settings.lr)
    pools = retain_pools(retain)
    ascended = forget
    if settings.method == "mmunlearner":
        ascended = mmunlearner_sets(forget, retain)[0]
        mask = mmunlearner_mask(peft_model, processor, forget, retain, settings, fisher_cache)
        named = {name: p for name, p in peft_model.named_parameters() if p.requires_grad}
        torch.manual_seed(settings.seed)  # the same dropout draws whether the Fishers were computed or cached
        if on_mask is not None:
            on_mask({"mask_kept": mask_fraction(mask)})
    steps_per_epoch = len(models.batches(ascended, settings.batch_size))
    bar = tqdm(total=settings.epochs * steps_per_epoch, desc=f"baseline {settings.method}", unit="step",
               disable=not progress, leave=False)
    try:
        for epoch in range(1, settings.epochs + 1):
            peft_model.train()
            for indices in forget_batches_for_epoch(ascended, settings.batch_size, rng):
                chunk = [ascended[i] for i in indices]
                forget_batch = models.encode_with_answers(processor, chunk)
                retain_batch = None
                if settings.method in RETAIN_METHODS:
                    drawn = draw_retain_batch(pools, chunk[0].modality, settings.batch_size, rng)
                    retain_batch = models.encode_with_answers(processor, [retain[i] for i in drawn])
                optimizer.zero_grad(set_to_none=True)
                if settings.method == "mmunlearner":
                    loss = mmunlearner_backward(peft_model, settings, forget_batch, retain_batch, named, mask)
                else:
                    loss = method_loss(peft_model, settings, forget_batch, retain_batch)
                    loss.backward()
                torch.nn.utils.clip_grad_norm_(parameters, settings.max_grad_norm)
                optimizer.step()
                bar.update(1)
                bar.set_postfix(epoch=epoch, loss=f"{loss.item():.4f}")
            peft_model.eval()
            if on_epoch is not None:
                on_epoch(epoch, peft_model)
    finally:
        bar.close()
    peft_model.eval()
    return peft_model


# ---- adapter files ---------------------------------------------------------------------------------------

def save_adapter(peft_model, directory: str | os.PathLike) -> Path:
    """Write the adapter (LoRA weights + adapter_config.json; never base weights) to `directory`, whole or not
    at all: written to a temporary sibling, then renamed over any previous adapter there."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = directory.with_name(f".{directory.name}.partial-{os.getpid()}")
    old = directory.with_name(f".{directory.name}.old-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        peft_model.save_pretrained(str(tmp), save_embedding_layers=False)
        if directory.exists():
            os.replace(directory, old)
        os.replace(tmp, directory)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
    return directory


def load_adapter(model, directory: str | os.PathLike):
    """`model` with the adapter saved in `directory` (eval mode, not trainable)."""
    from peft import PeftModel

    directory = Path(directory)
    if not directory.is_dir():
        raise UserInputError(directory, "no such adapter directory")
    if not (directory / ADAPTER_CONFIG).is_file() or not any((directory / name).is_file() for name in ADAPTER_WEIGHTS):
        raise UserInputError(directory, f"not a LoRA adapter directory (needs {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS[0]})")
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            peft_model = PeftModel.from_pretrained(model, str(directory), is_trainable=False)
    except Exception as exc:  # peft raises ValueError, json and safetensors errors, shape mismatches, ...
        lines = str(exc).strip().splitlines()
        first = lines[0] if lines else type(exc).__name__
        raise UserInputError(directory, f"cannot load the adapter onto this model ({type(exc).__name__}: {first})") from None
    return peft_model.eval()
