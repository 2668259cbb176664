"""`mllmeraser generate`: one prompt answered, with an eraser attached if one is given."""

from __future__ import annotations

from pathlib import Path

from ..errors import UserInputError
from .options import add_eraser_args, add_model_arg, attached, load_eraser, load_model


def add_parsers(commands) -> None:
    generate = commands.add_parser("generate", help="answer one prompt (with an eraser attached, if given)")
    add_model_arg(generate)
    add_eraser_args(generate)
    generate.add_argument("--image", type=Path, default=None)
    generate.add_argument("--prompt", required=True)
    generate.add_argument("--max-new-tokens", type=int, default=50)
    generate.set_defaults(handler=run_generate)


def run_generate(args) -> int:
    from PIL import Image

    from ..core import models
    from ..core.inputs import as_items

    image = None
    if args.image is not None:
        try:
            image = Image.open(args.image).convert("RGB")
        except FileNotFoundError:
            raise UserInputError(args.image, "no such image file") from None
        except Exception as exc:
            raise UserInputError(args.image, f"unreadable image ({type(exc).__name__})") from None
    eraser = load_eraser(args.eraser, args.alpha)  # a bad file is refused before a model is loaded
    model, processor = load_model(args)
    item = as_items([(image, args.prompt, "")])  # a plain input: the prompt is sent as typed
    with attached(model, eraser):
        (answer,) = models.generate(model, processor, item, args.max_new_tokens)
    print(answer)
    return 0
