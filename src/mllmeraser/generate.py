"""`mllmeraser generate`: one answer from a model, optionally with an eraser attached."""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

from PIL import Image

from .core import models
from .bench.data import QAItem
from .errors import UserInputError


def add_cli(commands) -> None:
    parser = commands.add_parser("generate", help="answer one prompt (with an eraser attached, if given)")
    parser.add_argument("--model", required=True)
    parser.add_argument("--eraser", type=Path, default=None)
    parser.add_argument("--alpha", type=float, default=None, help="override the eraser's strength")
    parser.add_argument("--image", type=Path, default=None)
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--max-new-tokens", type=int, default=50)
    parser.set_defaults(handler=run_cli)


def run_cli(args) -> int:
    image = None
    if args.image is not None:
        try:
            image = Image.open(args.image).convert("RGB")
        except FileNotFoundError:
            raise UserInputError(args.image, "no such image file") from None
        except Exception as exc:
            raise UserInputError(args.image, f"unreadable image ({type(exc).__name__})") from None
    model, processor = models.load_model(args.model)
    item = QAItem("prompt", "generation", "image" if image else "text", args.prompt, "", None, image)
    attached = nullcontext()
    if args.eraser is not None:
        from .core.eraser import Eraser
        eraser = Eraser.load(args.eraser)
        attached = (eraser.with_alpha(args.alpha) if args.alpha is not None else eraser).attach(model)
    # The prompt is sent as typed (no MLLMU-Bench suffix): QAItem.prompt would add one, so bypass it.
    with attached:
        answer = _answer(model, processor, item, args.max_new_tokens)
    print(answer)
    return 0


def _answer(model, processor, item: QAItem, max_new_tokens: int) -> str:
    import torch
    text = models.chat_text(processor, item.question, item.modality == "image")
    kwargs = {"text": [text], "return_tensors": "pt"}
    if item.image is not None:
        kwargs["images"] = [item.image]
    batch = models.to_device(dict(processor(**kwargs)), model)
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=processor.tokenizer.pad_token_id)
    return processor.tokenizer.decode(out[0, batch["input_ids"].shape[1]:], skip_special_tokens=True).strip()
