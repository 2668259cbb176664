"""OpenAI chat messages into one prompt: the turns, system text leading the first user turn, and at most one image,
a data: URL decoded and checked against the server's limits. Bad input is a PolicyError (a 400 naming the
message and part at fault), before the batcher sees anything.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import io
from typing import Any

from PIL import Image

from ..core.inputs import Prompt, as_items, fold_system
from .policy import PolicyError
from .settings import Limits


def decode_image(url: str, limits: Limits, param: str) -> Image.Image:
    """A data: URL's image, RGB; anything else (another scheme, not base64, not an image, too big) is a 400."""
    if not url.startswith("data:"):
        raise PolicyError(400, "only data: URLs are accepted for images (the server fetches nothing)",
                          "unsupported_image_url", param)
    header, _, payload = url.partition(",")
    if ";base64" not in header:
        raise PolicyError(400, "the image data: URL must be base64-encoded", "invalid_image", param)
    if len(payload) > limits.max_image_bytes * 4 // 3 + 4:
        raise PolicyError(400, f"image larger than {limits.max_image_bytes} bytes", "image_too_large", param)
    try:
        raw = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise PolicyError(400, "the image data: URL is not valid base64", "invalid_image", param) from None
    try:
        image = Image.open(io.BytesIO(raw))
        width, height = image.size
        if width * height > limits.max_image_pixels:
            raise PolicyError(400, f"image of {width}x{height} pixels is over the limit of {limits.max_image_pixels}",
                              "image_too_large", param)
        image.load()
        return image.convert("RGB")
    except PolicyError:
        raise
    except Exception as exc:  # PIL raises UnidentifiedImageError, OSError, DecompressionBombError, ...
        raise PolicyError(400, f"the data: URL is not a readable image ({type(exc).__name__})", "invalid_image",
                          param) from None


def _message_parts(message: dict, index: int, limits: Limits) -> tuple[str, list[Image.Image]]:
    content = message.get("content")
    param = f"messages[{index}].content"
    if isinstance(content, str):
        return content, []
    if not isinstance(content, list):
        raise PolicyError(400, "a message's content must be a string or a list of parts", "invalid_type", param)
    texts, images = [], []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind == "image_url":
            spec = part.get("image_url")
            url = spec.get("url") if isinstance(spec, dict) else spec
            if not isinstance(url, str):
                raise PolicyError(400, "image_url needs a url", "invalid_type", f"{param}[{j}].image_url")
            images.append(decode_image(url, limits, f"{param}[{j}].image_url"))
        else:
            raise PolicyError(400, "a content part must be {type: text, text} or {type: image_url, image_url: {url}}",
                              "invalid_content_part", f"{param}[{j}]")
    return "\n".join(texts), images


def parse_messages(messages: Any, limits: Limits) -> Prompt:
    """OpenAI messages -> one prompt item: system text leads the first user turn, earlier (user, assistant) turns
    become the chat history, the last message must be the user's; at most one image, placed in the first user
    turn (where the model's chat template puts it)."""
    if not isinstance(messages, list) or not messages:
        raise PolicyError(400, "'messages' must be a non-empty list", "invalid_type", "messages")
    system, turns, images = [], [], []  # turns: [role, text]
    for index, message in enumerate(messages):
        role = message.get("role") if isinstance(message, dict) else None
        if role not in ("system", "developer", "user", "assistant"):
            raise PolicyError(400, "a message's role must be system, user or assistant", "invalid_role",
                              f"messages[{index}].role")
        text, found = _message_parts(message, index, limits)
        images += found
        if role in ("system", "developer"):
            system.append(text)
        elif turns and turns[-1][0] == role:
            turns[-1][1] += "\n" + text
        else:
            turns.append([role, text])
    if not turns or turns[-1][0] != "user":
        raise PolicyError(400, "the last message must be the user's", "invalid_messages", "messages")
    if turns[0][0] != "user":
        turns.insert(0, ["user", ""])
    if len(images) > 1:
        raise PolicyError(400, "at most one image per request", "too_many_images", "messages")
    if system:
        turns[0][1] = fold_system("\n".join(system), turns[0][1])
    chars = sum(len(text) for _, text in turns)
    if chars > limits.max_prompt_chars:
        raise PolicyError(400, f"the messages hold {chars} characters, over the limit of {limits.max_prompt_chars}",
                          "prompt_too_long", "messages")
    history = tuple((turns[i][1], turns[i + 1][1]) for i in range(0, len(turns) - 1, 2))
    (item,) = as_items([(images[0] if images else None, turns[-1][1], "")])
    return dataclasses.replace(item, history=history) if history else item
