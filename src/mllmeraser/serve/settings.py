"""What the server is allowed and asked to do: request limits and server settings (no web framework imported)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Limits:
    """What one request may ask for; beyond any of them is a 400."""

    max_tokens: int = 512  # max_tokens must be in [1, this]
    max_prompt_chars: int = 32_000  # every message's text together
    max_prompt_tokens: int = 4_096  # the chat prompt's text tokens (image tokens aside)
    max_image_bytes: int = 10 * 2**20  # a decoded data: URL
    max_image_pixels: int = 4096 * 4096  # width x height
    max_eraser_bytes: int = 1 << 30  # an uploaded eraser

    @property
    def max_body_bytes(self) -> int:
        """A JSON request body: the largest image as base64 and the longest prompt, with room for the rest."""
        return self.max_image_bytes * 4 // 3 + 4 * self.max_prompt_chars + (1 << 20)


@dataclass(frozen=True)
class ServeSettings:
    model_name: str = "mllmeraser"
    admin_token: str | None = None
    limits: Limits = field(default_factory=Limits)
    max_batch: int = 16
    max_wait: float = 0.01  # seconds the oldest waiting request may wait for a batch to fill
