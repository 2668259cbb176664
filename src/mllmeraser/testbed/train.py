"""Stage 2 of the testbed's training (stage 1: `vision`): the LLaVA stage on the benchmark's questions, loss on
answer tokens only, fresh image renderings every step."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from tqdm import tqdm

from ..core import models
from ..bench.items import QAItem
from . import model as tm
from . import render

Renderer = Callable[[render.Rendering], np.ndarray]


@dataclass(frozen=True)
class Example:
    """One trained question. A classification question keeps its stored option order: a model this small, on
    this budget, memorises the letter (recall of the subject) but does not learn in-context option matching."""

    prompt_ids: tuple[int, ...]
    answer_ids: tuple[int, ...]  # ends with </s>
    renderer: Renderer | None  # None: a text-only question


@dataclass(frozen=True)
class TrainSettings:
    steps: int = 6000
    batch_size: int = 16
    lr: float = 2e-3  # measured: 3e-3 ends at 4x the loss, image cloze 0.13 where 2e-3 reaches 0.8-1.0
    warmup: int = 100
    weight_decay: float = 0.0


def encode_example(processor, item: QAItem, renderer: Renderer | None, answer_prefix: str | None = None) -> Example:
    """Token ids exactly as `processor(text, images)` gives them (the <image> placeholder expanded), the item's
    chat history included, and the answer as `models.encode_with_answers` scores it: after the chat template's
    `answer_prefix` (derived from the template when None; pass it in to encode many items), ending with eos.
    (The tiny testbed's word-level tokenizer drops LLaVA-1.5's leading space: its ids are the same.)"""
    if item.prefill:
        raise ValueError("a trained question has no prefill: the whole answer is the assistant's")
    tokenizer = processor.tokenizer
    prefix = models.answer_prefix(processor) if answer_prefix is None else answer_prefix
    text = models.chat_text(processor, item.prompt, renderer is not None, item.history)
    text = text.replace("<image>", "<image>" * tm.NUM_IMAGE_TOKENS)
    prompt_ids = tokenizer(text)["input_ids"]
    answer_ids = tokenizer(prefix + item.answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return Example(tuple(prompt_ids), tuple(answer_ids), renderer)


def pixel_values(images: list[np.ndarray]) -> torch.Tensor:
    """The CLIP processor's normalisation for images already at the model's size (tested to match it)."""
    batch = np.stack(images).astype(np.float32) / 255.0
    mean = np.array(tm.IMAGE_MEAN, dtype=np.float32)
    std = np.array(tm.IMAGE_STD, dtype=np.float32)
    return torch.from_numpy(((batch - mean) / std).transpose(0, 3, 1, 2).copy())


def collate(examples: list[Example], rng: np.random.Generator, pad_id: int = tm.PAD_ID) -> dict[str, torch.Tensor]:
    """A right-padded batch (prompt, answer, padding), labels on the answers only; images rendered afresh."""
    length = max(len(e.prompt_ids) + len(e.answer_ids) for e in examples)
    input_ids = torch.full((len(examples), length), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), length), -100, dtype=torch.long)
    attention = torch.zeros((len(examples), length), dtype=torch.long)
    images = []
    for row, example in enumerate(examples):
        ids = example.prompt_ids + example.answer_ids
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, len(example.prompt_ids): len(ids)] = torch.tensor(example.answer_ids)
        attention[row, : len(ids)] = 1
        if example.renderer is not None:
            images.append(example.renderer(render.random_rendering(rng)))
    batch = {"input_ids": input_ids, "attention_mask": attention, "labels": labels}
    if images:
        batch["pixel_values"] = pixel_values(images)
    return batch


def train(model, examples: list[Example], settings: TrainSettings, seed: int, progress: bool = True) -> list[float]:
    """AdamW with warm-up and cosine decay over shuffled epochs of `examples`, on the parameters that require
    a gradient (the build freezes the pretrained vision tower); returns the loss curve."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)

    def lr_at(step: int) -> float:
        if step < settings.warmup:
            return (step + 1) / settings.warmup
        progress_ = (step - settings.warmup) / max(1, settings.steps - settings.warmup)
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress_))

    order: list[int] = []

    def batch_loss() -> torch.Tensor:
        nonlocal order
        if len(order) < settings.batch_size:
            order += rng.permutation(len(examples)).tolist()
        picked, order = order[: settings.batch_size], order[settings.batch_size:]
        return model(**collate([examples[i] for i in picked], rng)).loss

    model.train()
    trained = [parameter for parameter in model.parameters() if parameter.requires_grad]
    losses = optimise(trained, batch_loss, settings.steps, settings.lr, lr_at, settings.weight_decay,
                      "train testbed model", progress)
    model.eval()
    return losses


def optimise(parameters: list[torch.Tensor], batch_loss: Callable[[], torch.Tensor], steps: int, lr: float,
             lr_at: Callable[[int], float], weight_decay: float, desc: str, progress: bool) -> list[float]:
    """The loop both training stages share: AdamW with a per-step learning-rate factor, gradients clipped at
    norm 1; returns the loss curve."""
    optimiser = torch.optim.AdamW(parameters, lr=lr, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimiser, lr_at)
    losses: list[float] = []
    bar = tqdm(range(steps), desc=desc, disable=not progress, unit="step")
    for _ in bar:
        loss = batch_loss()
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimiser.step()
        scheduler.step()
        losses.append(loss.item())
        if len(losses) % 50 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}")
    return losses
