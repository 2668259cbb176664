"""Talking to a model: loading a checkpoint offline, encoding prompts, batching, greedy answers.

Prompts go through the checkpoint's own processor and chat template, so one harness drives the testbed
LLaVA, llava-hf LLaVA-1.5 and Qwen2-VL / Qwen2.5-VL. What differs between the families (which load, where
their decoder layers are, processor quirks) is in `families.py`.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Sequence

import torch

from tqdm import tqdm

from ..errors import UserInputError
from .families import FAMILIES, LOADABLE, image_only_processor_class
from .inputs import PlainInput, PromptLike, as_items


@contextmanager
def quiet_transformers() -> Iterator[None]:
    """transformers' notices and progress bars off while the block runs, and as they were afterwards: loading a
    model must not change the caller's logging. The PIL fallback for image processors is what we want (no
    torchvision); its warning is noise. v5 draws "Loading weights" / "Writing model shards" tqdm bars on stderr
    whatever the log level; they break the CLI's one-line errors (an error after the model loaded came out as
    three lines), so the CLI runs each command inside this too."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*torchvision.*")
            yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


DTYPES = {"auto": "auto", "float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
"""What --dtype accepts: a name, or "auto" for the dtype the checkpoint was saved in."""


def resolve_device(device: str | torch.device | None) -> torch.device:
    """`device`, or the default: the first GPU where there is one, else the CPU."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise UserInputError(None, f"--device {device!r} is not a torch device ({exc})") from None


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype | str:
    """`dtype` (a torch dtype, a name in DTYPES), or the default: bfloat16 on a GPU, float32 elsewhere (half
    precision on a CPU is slow and its matmuls are not bit-reproducible across machines)."""
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise UserInputError(None, f"--dtype {dtype!r} is not one of {sorted(DTYPES)}")
    return DTYPES[dtype]


def load_model(path: str | Path, dtype: str | torch.dtype | None = None, device: str | torch.device | None = None,
               device_map: str | dict | None = None):
    """Load (model, processor) from a local checkpoint directory or the local HF cache, never the network.

    device: where the model goes (default: cuda where available, else cpu); dtype: a torch dtype or a name in
    DTYPES (default: bfloat16 on a GPU, float32 on the CPU); device_map: handed to `from_pretrained` (e.g.
    "auto": the layers spread over every visible GPU, then the CPU), in which case `device` is ignored.
    """
    from transformers import AutoModelForImageTextToText, AutoProcessor

    target = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, target)
    directory = Path(path)
    if directory.exists():
        config_path = directory / "config.json"
        if not config_path.is_file():
            raise UserInputError(directory, "not a model checkpoint (no config.json)")
        try:
            model_type = json.loads(config_path.read_text()).get("model_type")
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise UserInputError(config_path, f"not valid JSON ({exc})") from None
        if model_type not in LOADABLE:
            raise UserInputError(directory, f"model_type {model_type!r} is not supported; expected one of {LOADABLE}")
    try:
        with quiet_transformers():
            processor = _load_processor(AutoProcessor, path)
            placement = {"device_map": device_map} if device_map is not None else {}
            model = AutoModelForImageTextToText.from_pretrained(str(path), local_files_only=True, dtype=torch_dtype,
                                                                **placement)
    except UserInputError:
        raise
    except Exception as exc:  # transformers raises OSError, ValueError, safetensors errors, ...
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserInputError(path, f"cannot load checkpoint offline ({type(exc).__name__}: {first})") from None
    if device_map is None:
        model.to(target)
    model.eval()
    prepare_processor(processor)
    return model, processor


def _load_processor(auto_processor, path):
    """AutoProcessor, or, for a family with an image-only processor quirk (Qwen-VL) when torchvision is
    missing, the same processor class without its video processor (AutoProcessor raises OSError there: it
    cannot build the video processor)."""
    try:
        return auto_processor.from_pretrained(str(path), local_files_only=True)
    except Exception:
        import transformers
        from transformers import AutoConfig
        from transformers.utils import is_torchvision_available

        if is_torchvision_available():
            raise
        model_type = AutoConfig.from_pretrained(str(path), local_files_only=True).model_type
        family = FAMILIES.get(model_type)
        if family is None or family.image_only_processor is None:
            raise
        base = getattr(transformers, family.image_only_processor)
        return image_only_processor_class(base).from_pretrained(str(path), local_files_only=True)


def prepare_processor(processor) -> None:
    """Left padding: transformers' generate appends each new token after the row's last position, so a
    right-padded row would continue from a pad. (Steering reads the mask and works with either side.)"""
    processor.tokenizer.padding_side = "left"
    if processor.tokenizer.pad_token is None:
        processor.tokenizer.pad_token = processor.tokenizer.eos_token


def chat_text(processor, prompt: str, with_image: bool, history: Sequence[tuple[str, str]] = (),
              prefill: str = "") -> str:
    """The chat prompt: earlier (user, assistant) turns, if any, then `prompt`; the image goes in the first user
    turn. `prefill` is appended after the generation prompt: the assistant's turn starts with it."""
    turns = [*history, (prompt, None)]
    messages = []
    for index, (user, assistant) in enumerate(turns):
        image = [{"type": "image"}] if with_image and index == 0 else []
        messages.append({"role": "user", "content": image + [{"type": "text", "text": user}]})
        if assistant is not None:
            messages.append({"role": "assistant", "content": [{"type": "text", "text": assistant}]})
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    return text + answer_prefix(processor) + prefill if prefill else text


_ANSWER_PROBE = "MLLMERASER_ANSWER_PROBE"


def answer_prefix(processor) -> str:
    """What the chat template writes between its generation prompt and the text of an assistant turn, read off the
    template itself: " " for LLaVA-1.5's "ASSISTANT:" (the answer's first word takes its leading space, as the
    model saw it in training), "" for ChatML's "<|im_start|>assistant\n" (SmolLM2, Qwen-VL). Answers
    (`encode_with_answers`) and prefills (`chat_text`) start with it. Where the template does not render a
    finished assistant turn after the generation prompt, " " (LLaVA-1.5's, what every answer took before)."""
    user = {"role": "user", "content": [{"type": "text", "text": "?"}]}
    assistant = {"role": "assistant", "content": [{"type": "text", "text": _ANSWER_PROBE}]}
    try:
        prompt = processor.apply_chat_template([user], add_generation_prompt=True)
        finished = processor.apply_chat_template([user, assistant], add_generation_prompt=False)
    except Exception:  # a template that cannot render an assistant turn from content parts
        return " "
    if not finished.startswith(prompt) or _ANSWER_PROBE not in finished[len(prompt):]:
        return " "
    return finished[len(prompt): finished.index(_ANSWER_PROBE, len(prompt))]


def encode_prompts(processor, items: Sequence[PromptLike], images: Sequence | None = None) -> dict[str, torch.Tensor]:
    """A left-padded batch of chat prompts. All items of a batch share one modality (see `batches`).
    `images` overrides the items' own images (PGD feeds perturbed pixels this way)."""
    with_image = items[0].modality == "image"
    if any((item.modality == "image") != with_image for item in items):
        raise ValueError("a batch mixes image and text-only questions; group them with batches()")
    texts = [chat_text(processor, item.text, with_image, item.history, item.prefill) for item in items]
    if with_image:
        return dict(processor(text=texts, images=list(images or [item.image for item in items]),
                              padding=True, return_tensors="pt"))
    return dict(processor(text=texts, padding=True, return_tensors="pt"))


IGNORE_INDEX = -100
"""The label of a position no loss reads (the prompt, padding), as transformers' losses take it."""


def encode_with_answers(processor, items: Sequence[PromptLike], images: Sequence | None = None
                        ) -> dict[str, torch.Tensor]:
    """Teacher-forcing inputs: each row is [left padding][chat prompt][answer_prefix + answer, eos][right padding].

    `labels` is -100 everywhere except on the answer tokens and the final eos, so a causal LM loss on it is the
    answer's negative log-likelihood given the prompt. The answer block is right-padded by hand (the tokenizer
    pads on the left, which would put padding between prompt and answer); `forward_inputs` numbers positions
    from the attention mask, so the right padding never shifts a real token. Keys: input_ids,
    attention_mask, labels, and pixel_values (and the family's image extras) for image items; per-token
    modality ids (Qwen-VL's mm_token_type_ids) are extended with 0 (text) over the answer block."""
    batch = encode_prompts(processor, items, images)
    tokenizer = processor.tokenizer
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos token to end the answers with")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    prefix = answer_prefix(processor)
    answer_ids = [ids + [tokenizer.eos_token_id] for ids in
                  tokenizer([prefix + item.answer for item in items], add_special_tokens=False)["input_ids"]]
    width = max(len(ids) for ids in answer_ids)
    answer_block = torch.full((len(items), width), pad_id, dtype=batch["input_ids"].dtype)
    answer_mask = torch.zeros((len(items), width), dtype=batch["attention_mask"].dtype)
    for row, ids in enumerate(answer_ids):
        answer_block[row, : len(ids)] = torch.tensor(ids, dtype=answer_block.dtype)
        answer_mask[row, : len(ids)] = 1
    prompt_labels = torch.full_like(batch["input_ids"], IGNORE_INDEX)
    answer_labels = answer_block.masked_fill(answer_mask == 0, IGNORE_INDEX)
    per_token = {key: torch.cat([batch[key], batch[key].new_zeros(len(items), width)], dim=1)
                 for key in ("mm_token_type_ids", "token_type_ids") if key in batch}  # answer tokens are text (0)
    return {**batch, **per_token,
            "input_ids": torch.cat([batch["input_ids"], answer_block], dim=1),
            "attention_mask": torch.cat([batch["attention_mask"], answer_mask], dim=1),
            "labels": torch.cat([prompt_labels, answer_labels], dim=1)}


def prompt_width(labels: torch.Tensor) -> int:
    """The number of leading columns of an `encode_with_answers` batch that hold the (left-padded) prompts: every
    row's answer block starts right after them, and its first token is labelled."""
    answered = (labels != IGNORE_INDEX).any(dim=0).nonzero()
    if answered.numel() == 0:
        raise ValueError("no answer tokens in the labels")
    return int(answered[0])


def answer_logits(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, labels) of an `encode_with_answers` batch over the trailing columns that hold the answers (and
    the position before the first answer token), not the whole prompt: `logits_to_keep` spares the [B, T, vocab]
    tensor, GBs for image prompts at 7B. answer_token_nll takes the pair as it would take full-length logits and
    labels. No KV cache is built (a loss needs none; checkpointed blocks would drop it anyway)."""
    inputs = forward_inputs(model, {k: v for k, v in batch.items() if k != "labels"})
    labels = batch["labels"].to(inputs["input_ids"].device)
    keep = min(labels.shape[1] - prompt_width(labels) + 1, labels.shape[1])
    logits = model(**inputs, logits_to_keep=keep, use_cache=False).logits
    return logits, labels[:, -keep:]


def answer_token_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-position NLL of the next token, -log softmax(logits[:, t])[labels[:, t+1]], and the mask of the
    positions whose next token is an answer token (labels != -100). Both [B, T-1]; NLL is 0 off the mask."""
    logits = logits[:, :-1].float()
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    log_probs = torch.nn.functional.log_softmax(logits, dim=-1)
    nll = -log_probs.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return nll * mask, mask


@torch.no_grad()
def answer_nlls(model, processor, items: Sequence[PromptLike], batch_size: int = 32) -> list[float]:
    """Each item's mean answer-token NLL (its answer and the eos after it, given its prompt), in item order:
    exp(-value) is the per-token probability that likelihood-based metrics (CLEAR's, TOFU's) compare."""
    out = [0.0] * len(items)
    for indices in batches(items, batch_size):
        logits, labels = answer_logits(model, encode_with_answers(processor, [items[i] for i in indices]))
        nll, mask = answer_token_nll(logits, labels)
        for index, total, count in zip(indices, nll.sum(dim=1).tolist(), mask.sum(dim=1).tolist()):
            out[index] = total / max(count, 1)
    return out


def batches(items: Sequence[PromptLike], batch_size: int) -> list[list[int]]:
    """Indices of `items` grouped by modality and answer cap (max_new_tokens: a batch shares a generation length;
    for MLLMU-Bench items, whose caps differ by task, the groups are their tasks), in order of first appearance."""
    groups: dict[tuple[str, int], list[int]] = {}
    for index, item in enumerate(items):
        groups.setdefault((item.modality, item.max_new_tokens), []).append(index)
    return [indices[i: i + batch_size] for indices in groups.values() for i in range(0, len(indices), batch_size)]


def to_device(batch: dict[str, torch.Tensor], model) -> dict[str, torch.Tensor]:
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    return {k: (v.to(device, dtype) if torch.is_floating_point(v) else v.to(device)) for k, v in batch.items()}


@torch.no_grad()
def generate(model, processor, items: Sequence[PromptLike], max_new_tokens: int) -> list[str]:
    """Greedy answers for one batch (left-padded), decoded without the prompt."""
    batch = to_device(encode_prompts(processor, items), model)
    output = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                            pad_token_id=processor.tokenizer.pad_token_id)
    new_tokens = output[:, batch["input_ids"].shape[1]:]
    return [text.strip() for text in processor.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]


def answer_items(model, processor, items: Sequence[PromptLike | PlainInput], batch_size: int = 64,
                 progress: bool = True, desc: str = "answer") -> list[str]:
    """Greedy answers to `items` (prompts, e.g. QAItems, or plain (image or None, question, answer) tuples, see
    `inputs.as_items`), in their order: batched by modality and answer cap, each answer capped at its item's
    max_new_tokens."""
    items = as_items(items)
    answers: list[str] = [""] * len(items)
    groups = batches(items, batch_size)
    for indices in tqdm(groups, desc=desc, disable=not progress, unit="batch", leave=False):
        chunk = [items[i] for i in indices]
        for index, answer in zip(indices, generate(model, processor, chunk, chunk[0].max_new_tokens)):
            answers[index] = answer
    return answers


def forward_inputs(model, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inputs for a plain forward pass that sees the positions `generate` would: with left padding a
    Llama-decoder LLaVA must number positions from the attention mask, not from the padded start.
    (Qwen2-VL / Qwen2.5-VL derive their multimodal rope positions from the attention mask themselves.)"""
    batch = to_device(batch, model)
    # Per-token modality ids from the processor (Qwen-VL's mm_token_type_ids: 0 text, 1 image, 2 video) must
    # cover input_ids: a caller that appends answer tokens to an encoded prompt and extends only input_ids
    # and attention_mask (as pgd.pgd_images did before encode_with_answers) makes Qwen-VL's get_rope_index
    # fail on the length mismatch. Appended tokens are text, so the ids are extended with zeros on the right.
    length = batch["input_ids"].shape[1] if "input_ids" in batch else None
    for key in ("mm_token_type_ids", "token_type_ids"):
        ids = batch.get(key)
        if ids is not None and length is not None and ids.shape[1] < length:
            batch[key] = torch.cat([ids, ids.new_zeros(ids.shape[0], length - ids.shape[1])], dim=1)
    if model.config.model_type == "llava" and "attention_mask" in batch and "position_ids" not in batch:
        batch["position_ids"] = (batch["attention_mask"].long().cumsum(-1) - 1).clamp(min=0)
    return batch


def pixel_value_bounds(processor, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-element (low, high, scale) of normalised pixel values: the image range [0, 1] mapped through the
    processor's (x - mean) / std, and 1/std (one pixel-space unit in normalised units). Handles [B, C, H, W]
    (LLaVA) and Qwen-VL's flattened patches [N, C * T * P * P] (channel-major within a patch)."""
    image_processor = processor.image_processor
    mean = torch.tensor(image_processor.image_mean, dtype=torch.float32)
    std = torch.tensor(image_processor.image_std, dtype=torch.float32)
    if pixel_values.ndim == 4:
        shape = (1, -1, 1, 1)
        mean, std = mean.view(shape), std.view(shape)
    elif pixel_values.ndim == 2:
        per_channel = pixel_values.shape[1] // len(mean)
        mean, std = mean.repeat_interleave(per_channel)[None], std.repeat_interleave(per_channel)[None]
    else:
        raise ValueError(f"unexpected pixel_values shape {tuple(pixel_values.shape)}")
    return ((0 - mean) / std).expand_as(pixel_values), ((1 - mean) / std).expand_as(pixel_values), (1 / std).expand_as(pixel_values)
