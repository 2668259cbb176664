"""White-box attacks on an erasure: they read activations and likelihoods, which an API user does not get, and
so measure what an erasure that leaves the weights untouched cannot hide from whoever holds them.

    probe        a linear probe for the correct option letter, fitted on retain people's activations and read on
                 the forget people's (as read, and re-centred: an attacker's cheap undoing of a common shift)
    membership   LOSS and Min-K% membership inference, forget people against never-seen people (AUROC)
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path
from typing import Sequence

import torch

from ..core import gating, models
from ..core.capture import capture_last_token
from ..core.decoder_layers import find_decoder_layers
from . import evaluate, prompts
from .attack_set import AttackSet, first_people, split_records
from .attacks import Context
from .items import QAItem


@torch.no_grad()
def last_token_features(model, processor, items: Sequence[QAItem], layer_indices: Sequence[int],
                        batch_size: int = 64) -> torch.Tensor:
    """[N, len(layer_indices), d]: block outputs at the last prompt token (after any attached eraser's hooks)."""
    _, layers = find_decoder_layers(model)
    chosen = [layers[i] for i in layer_indices]
    out = [None] * len(items)
    for indices in models.batches(items, batch_size):
        batch = models.to_device(models.encode_prompts(processor, [items[i] for i in indices]), model)
        feats = capture_last_token(model, chosen, **batch)
        for row, index in enumerate(indices):
            out[index] = feats[row]
    return torch.stack(out)


def ridge_probe(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, classes: int,
                ridge: float = 1.0, centre_test: bool = False) -> torch.Tensor:
    """Predicted classes of `test_x` from a one-vs-rest ridge regression fitted on standardised `train_x`.
    `centre_test`: centre the test features on their own mean (undoes a shift common to them, e.g. a steering
    vector added to every forget prompt), not on the training mean."""
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    x = torch.cat([(train_x - mean) / std, torch.ones(len(train_x), 1)], 1).double()
    t = torch.cat([(test_x - (test_x.mean(0) if centre_test else mean)) / std, torch.ones(len(test_x), 1)], 1).double()
    y = torch.nn.functional.one_hot(train_y, classes).double()
    w = torch.linalg.solve(x.T @ x + ridge * torch.eye(x.shape[1], dtype=x.dtype), x.T @ y)
    return (t @ w).argmax(1)


def probe_attack(model, processor, forget: Sequence[QAItem], retain: Sequence[QAItem], eraser=None,
                 layer_indices: Sequence[int] | None = None, batch_size: int = 64) -> dict[str, float]:
    """A linear probe for the correct option letter of classification questions: fitted on retain people's
    activations, read on the forget people's, with `eraser` attached (if given) for both. Accuracy per layer, as
    read and with the forget features re-centred on their own mean ("centred": an attacker's cheap undoing of a
    common shift)."""
    letters = {letter: i for i, letter in enumerate(prompts.OPTION_LETTERS)}
    train = [i for i in retain if i.task == "classification"]
    test = [i for i in forget if i.task == "classification"]
    _, layers = find_decoder_layers(model)
    layer_indices = list(layer_indices or (0, len(layers) // 2, len(layers) - 1))
    with eraser.attach(model) if eraser is not None else nullcontext():
        xs = last_token_features(model, processor, train, layer_indices, batch_size)
        ts = last_token_features(model, processor, test, layer_indices, batch_size)
    y = torch.tensor([letters[i.answer] for i in train])
    truth = torch.tensor([letters[i.answer] for i in test])
    accuracy = lambda k, centre: float((ridge_probe(xs[:, k], y, ts[:, k], len(letters), centre_test=centre)  # noqa: E731
                                        == truth).double().mean())
    return {f"layer {l}{' centred' if centre else ''}": accuracy(k, centre)
            for centre in (False, True) for k, l in enumerate(layer_indices)}


@torch.no_grad()
def token_logprobs(model, processor, items: Sequence[QAItem], batch_size: int = 32) -> list[torch.Tensor]:
    """Per item, the log-probabilities of its answer tokens (teacher-forced, as models.encode_with_answers)."""
    out: list[torch.Tensor | None] = [None] * len(items)
    for indices in models.batches(items, batch_size):
        batch = models.to_device(models.encode_with_answers(processor, [items[i] for i in indices]), model)
        labels = batch.pop("labels")
        logits = model(**models.forward_inputs(model, batch)).logits[:, :-1].float()
        target = labels[:, 1:]
        logp = torch.log_softmax(logits, -1).gather(-1, target.clamp(min=0)[..., None])[..., 0]
        for row, index in enumerate(indices):
            out[index] = logp[row][target[row] != -100].cpu()
    return out


def min_k_score(logp: torch.Tensor, k: float = 0.2) -> float:
    count = max(1, int(math.ceil(k * len(logp))))
    return float(logp.sort().values[:count].mean())


def non_member_items(forget: Sequence[QAItem], unknown_names: dict[str, str], ctx: Context) -> list[QAItem]:
    """Never-seen people (Unknown_Set) asked the forget people's questions with the forget people's answers
    (their names swapped in): the same questions and answer forms, about people the model never saw."""
    strangers = list(unknown_names.items())
    items = []
    for index, item in enumerate(i for i in forget if i.task != "classification"):
        sid, stranger = strangers[index % len(strangers)]
        name = ctx.names.get(item.subject_id, "\0")
        items.append(replace(item, subject_id=sid, question=item.question.replace(name, stranger),
                             answer=item.answer.replace(name, stranger), image=item.image_source))
    return items


def membership_attack(model, processor, forget: Sequence[QAItem], non_members: Sequence[QAItem], eraser=None,
                      batch_size: int = 32) -> dict[str, float]:
    """LOSS and Min-K% (k=20%) membership inference, forget people (members) against never-seen people: the
    AUROC of each score (0.5: cannot tell them apart)."""
    members = [i for i in forget if i.task != "classification"]
    with eraser.attach(model) if eraser is not None else nullcontext():
        m, n = token_logprobs(model, processor, members, batch_size), token_logprobs(model, processor, non_members, batch_size)
    loss = lambda lp: torch.tensor([float(x.mean()) for x in lp])  # noqa: E731 (higher: more likely a member)
    mink = lambda lp: torch.tensor([min_k_score(x) for x in lp])  # noqa: E731
    return {"loss_auroc": gating.auroc(loss(m), loss(n)), "min_k_auroc": gating.auroc(mink(m), mink(n))}


def white_box(model, processor, data_dir: str | Path, forget_ratio: int, attacked: AttackSet, eraser=None,
              batch_size: int = 32) -> dict[str, dict[str, float]]:
    """{"probe": {layer: accuracy}, "membership": {score: AUROC}} with `eraser` attached (vanilla where None)."""
    report = evaluate.report_items(data_dir, forget_ratio, ("forget", "retain", "unknown"))
    unknown = sorted({i.subject_id for i in report.get("unknown", [])})
    names = {str(r["ID"]): str(r.get("name") or "") for r in split_records(Path(data_dir), ["Unknown_Set"])}
    non_members = non_member_items(report["forget"], {s: names.get(s, s) for s in unknown}, attacked.context)
    retain = first_people(report["retain"], 20)
    return {"probe": probe_attack(model, processor, report["forget"], retain, eraser, batch_size=batch_size),
            "membership": membership_attack(model, processor, report["forget"], non_members, eraser, batch_size)}
