"""Attaching steering to a model: the SteeringHandle of one attachment, and which positions of each forward
are the prompt. The steering hooks themselves are layer_steering.py (the paper's per-layer gate) and
prompt_steering.py (prompt gates); both derive from SteeringHook here.

Hooks only: forward hooks on the decoder layers and a forward pre-hook on the model (it reads the attention
mask and how much is cached, so each forward knows which of its positions belong to the prompt), all removed
in `finally`. Modules are never replaced, so state_dict keys and the model's own code stay untouched. The one
other thing an attachment changes is `model.generate`, wrapped on the instance while attached: it tells the
hooks where the prompt ends, which a forward without a KV cache or a chunk of a chunked prefill cannot know.

Steering is decided once per prompt and applied to the prompt's positions (mode "prefill"), so every
generation path (cached or not, chunked prefill, beam search, assisted decoding, one-token prompts, left or
right padding) gives the tokens one cached forward over the prompt would: see SteeringHandle.
"""

from __future__ import annotations

import functools
import inspect
import itertools
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal

from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from . import gating
from .capture import capture
from .decoder_layers import hidden_states, replace_hidden_states

if TYPE_CHECKING:
    from .prompt_steering import FiredTerms


SteeringMode = Literal["prefill", "all"]
STEERING_MODES: tuple[str, ...] = ("prefill", "all")

ATTACHED_MARKER = "_mllmeraser_steering"
"""Attribute set on a model while a SteeringHandle is attached to it."""

CACHE_PROMPT = "_mllmeraser_prompt"
"""Attribute set on a KV cache a steered forward filled: (the handle's serial, the prompt it holds)."""
_SERIALS = itertools.count(1)  # one per SteeringHandle: a cache filled under one attachment is not another's


def per_row(values: Tensor, batch: int) -> Tensor:
    """Per-prompt values [B, ...] for a forward of `batch` rows: generate expands each prompt into consecutive
    rows (beams, num_return_sequences), so B divides `batch` and row i belongs to prompt i // (batch / B)."""
    if values.shape[0] == batch:
        return values
    if batch % values.shape[0]:
        raise RuntimeError(f"a forward of {batch} rows cannot carry the decisions of {values.shape[0]} prompts")
    return values.repeat_interleave(batch // values.shape[0], dim=0)


class _Prompt:
    """What one prompt's steering is fixed by, from its first forward on: the prompt's length T (positions
    0..T-1, padded coordinates), its 2-D mask over those positions, and the gate's decisions, taken once."""

    def __init__(self, length: int, mask: Tensor | None):
        self.length, self.mask = length, mask
        self.decisions: Tensor | None = None  # prompt gate: g [B, K]
        self.scores: Tensor | None = None
        self.fired: FiredTerms | None = None  # prompt gate: the terms that fired, what every steered layer adds
        self.layer_gates: dict[int, Tensor] = {}  # per-layer gate: shape_gate(h_last . u_l) [B, K], by layer


class SteeringHandle:
    """Steering hooks attached to one model; `.remove()` (idempotent) or use as a context manager.

    It also tracks which positions belong to the prompt, so every generation path steers the same positions
    with the same gate values as one cached forward over the prompt would:
      * a forward with nothing cached (no `cache`/`past_key_values`, or an empty one) starts a new prompt,
        all of whose positions are the prompt, unless it is a later step of one `model.generate` call;
      * outside `generate`, a forward that extends a KV cache continues the prompt that filled that cache (its
        positions and gate decisions travel with the cache object, copies included), so two conversations'
        decode steps may interleave; a cache no forward under this handle filled (built before attaching, by
        another attachment, or by hand) is refused with a RuntimeError: its prompt's decisions are unknown;
      * `model.generate` (wrapped while attached) fixes the prompt to its input: a generation without a KV
        cache re-runs prompt and answer at every step, and only the prompt's positions are steered, with the
        decisions of the first step; chunked prefill decides from the whole prompt before the first chunk
        (one extra forward up to the decision layer); assisted decoding's verification passes and decode steps
        start beyond the prompt and are left alone (mode "prefill"), seeing the steering through the cache.

    Single-threaded: a handle holds the state of the forward in flight (its mask, start and prompt), so one
    model with an attachment runs one forward at a time (serve's engine runs every batch on one thread).
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self.serial = next(_SERIALS)
        self._hooks: list[RemovableHandle] = []
        self.attention_mask: Tensor | None = None  # the 2-D mask of the forward in flight, or None
        self.start = 0  # the position (padded coordinates) of the forward in flight's first row entry
        self.prompt: _Prompt | None = None
        self._generation: dict[str, Any] | None = None  # generate()'s inputs, while a generate call runs
        self._suspended = False  # True during the decision pre-pass: the hooks stand aside
        self.first_layer: nn.Module | None = None  # the decoder's first layer, where a gate reads embeddings
        self.decoder_input: Tensor | None = None  # that layer's input in the forward in flight (DecoderInputRead)
        self.row_terms: Tensor | None = None
        """Per-row term mask [B, K] (1 keeps term k for prompt row b, 0 switches it off), or None (every term on):
        multiplied into the prompt gate's decisions and the paper gate's per-layer gates when a prompt is decided,
        so rows with different eraser sets share one forward pass. Set it before the prompt's first forward (B is
        the prompt count; generate's expanded rows follow their prompt)."""

    @property
    def decisions(self) -> Tensor | None:
        """The prompt gate's last decisions g [batch, K] (None before the first prompt)."""
        return None if self.prompt is None else self.prompt.decisions

    @property
    def scores(self) -> Tensor | None:
        return None if self.prompt is None else self.prompt.scores

    @property
    def attached(self) -> bool:
        return getattr(self.model, ATTACHED_MARKER, None) is self

    def remove(self) -> None:
        """Remove every hook this handle added, the generate wrapper and the model's marker; a second call does
        nothing."""
        try:
            for hook in self._hooks:
                hook.remove()
        finally:
            self._hooks.clear()
            if getattr(self.model.__dict__.get("generate"), "_mllmeraser_handle", None) is self:
                del self.model.__dict__["generate"]
            if self.attached:
                delattr(self.model, ATTACHED_MARKER)

    def __enter__(self) -> SteeringHandle:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.remove()

    def start_tracking(self) -> None:
        """Hook the model's forward (before and after) and wrap its generate: what tells each forward which of its
        positions are the prompt (below)."""
        self._hooks.append(self.model.register_forward_pre_hook(self._begin_forward, with_kwargs=True))
        self._hooks.append(self.model.register_forward_hook(self._end_forward, with_kwargs=True))
        self._wrap_generate()

    def masked(self, gates: Tensor) -> Tensor:
        """Gate values [batch, K] times the per-row term mask (row_terms), where one is set."""
        if self.row_terms is None:
            return gates
        return gates * per_row(self.row_terms.to(device=gates.device, dtype=gates.dtype), gates.shape[0])

    def hook_layer(self, layer: nn.Module, hook: SteeringHook) -> None:
        """Register `hook` on `layer` ahead of every other forward hook on it, until the handle is removed."""
        self._hooks.append(layer.register_forward_hook(hook, prepend=True))

    def hook_layer_input(self, layer: nn.Module, hook: Any) -> None:
        """Register `hook` as a forward pre-hook (with kwargs) on `layer`, until the handle is removed."""
        self._hooks.append(layer.register_forward_pre_hook(hook, with_kwargs=True, prepend=True))

    # ---- which positions are the prompt ---------------------------------------------------------------

    def _begin_forward(self, module: nn.Module, args: Any, kwargs: dict) -> None:
        if self._suspended:
            return
        mask = kwargs.get("attention_mask")
        self.attention_mask = mask if isinstance(mask, Tensor) and mask.ndim == 2 else None
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        self.start = int(cache.get_seq_length()) if hasattr(cache, "get_seq_length") else 0
        tokens = kwargs.get("input_ids", args[0] if args else None)
        if not isinstance(tokens, Tensor):
            tokens = kwargs.get("inputs_embeds")
        length = self.start + (tokens.shape[1] if isinstance(tokens, Tensor) and tokens.ndim >= 2 else 0)
        generation = self._generation
        if generation is not None:
            if generation["first"]:  # the first forward of a generate call: the prompt is generate's input
                generation["first"] = False
                prompt_length = generation["length"] or length
                self.prompt = _Prompt(prompt_length, self._prompt_mask(prompt_length, generation["mask"]))
        elif self.start == 0:  # nothing cached: a new prompt, and all of this forward is the prompt
            self.prompt = _Prompt(length, self._prompt_mask(length, None))
        else:  # extends a KV cache: the prompt that filled it, never the last one this handle saw
            self.prompt = self._prompt_of(cache)

    def _prompt_of(self, cache: Any) -> _Prompt:
        serial, prompt = getattr(cache, CACHE_PROMPT, (None, None))
        if serial != self.serial:
            raise RuntimeError("this forward extends a KV cache that no forward under this eraser's attachment "
                               "filled, so the gate decisions of its prompt are unknown: run the prompt's first "
                               "forward (on an empty cache) with the eraser attached, or use model.generate")
        return prompt

    def _end_forward(self, module: nn.Module, args: Any, kwargs: dict, output: Any) -> None:
        """Tag the KV cache this forward filled with its prompt (see _prompt_of)."""
        if self._suspended or self.prompt is None:
            return
        cache = getattr(output, "past_key_values", None)
        if cache is None:
            cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if cache is not None:
            try:
                setattr(cache, CACHE_PROMPT, (self.serial, self.prompt))
            except AttributeError:  # a cache that takes no attribute cannot be continued outside generate
                pass

    def _prompt_mask(self, length: int, fallback: Tensor | None) -> Tensor | None:
        mask = self.attention_mask if self.attention_mask is not None else fallback
        return None if mask is None else mask[:, :length]

    def steered_slice(self, seq: int) -> slice | None:
        """The positions of the forward in flight (seq of them, from self.start) to steer: the prompt's
        (mode "prefill"), or None where there are none."""
        prompt = self.prompt
        if prompt is None:
            return None
        end = min(seq, prompt.length - self.start)
        return slice(0, end) if end > 0 else None

    def _generate(self, original, *args: Any, **kwargs: Any) -> Any:
        if self._generation is not None:  # a generate call inside one (an assistant sharing the model)
            return original(*args, **kwargs)
        stored = dict(kwargs)
        tokens = args[0] if args and isinstance(args[0], Tensor) else stored.pop("inputs", None)
        if isinstance(tokens, Tensor):
            stored["input_ids"] = tokens
        prompt = stored.get("input_ids", stored.get("inputs_embeds"))
        mask = stored.get("attention_mask")
        self._generation = {"first": True, "length": prompt.shape[1] if isinstance(prompt, Tensor) else None,
                            "mask": mask if isinstance(mask, Tensor) and mask.ndim == 2 else None, "inputs": stored}
        try:
            return original(*args, **kwargs)
        finally:
            self._generation = None

    def _wrap_generate(self) -> None:
        original = self.model.generate
        if not callable(original):
            return

        @functools.wraps(original)
        def generate(*args: Any, **kwargs: Any) -> Any:
            return self._generate(original, *args, **kwargs)

        generate._mllmeraser_handle = self  # type: ignore[attr-defined]
        self.model.__dict__["generate"] = generate

    def prompt_features(self, decision_layer: nn.Module, pooling: str) -> Tensor:
        """The pooled prompt feature [B, d] at `decision_layer` from generate()'s whole input, by one forward
        that stops there: the decision of a prompt whose first forward holds only part of it (chunked prefill)."""
        from . import models  # models does not import attachment; imported here to keep attachment light at import

        generation = self._generation
        if generation is None:
            raise RuntimeError("the prompt's first forward does not hold all of it, and no generate call says what "
                               "the prompt is: feed a prompt in one forward, or generate")
        forward = inspect.signature(self.model.forward).parameters
        inputs = {key: value for key, value in generation["inputs"].items() if isinstance(value, Tensor)
                  and (key in forward or key in ("input_ids", "mm_token_type_ids", "token_type_ids"))}
        # An embeddings pooling reads the first layer's input (capture.reading_prompt): that forward stops there.
        read = self.first_layer if gating.reads_embeddings(pooling) else decision_layer
        self._suspended = True
        try:
            _, pooled = capture(self.model, [read], 0, pooling, self.first_layer,
                                **models.forward_inputs(self.model, inputs))
        finally:
            self._suspended = False
        return pooled


def new_handle(model: nn.Module) -> SteeringHandle:
    """A handle on `model`, which it marks as attached (one attachment per model at a time); the caller adds the
    hooks (`start_tracking`, `hook_layer`) and removes the handle if that fails."""
    if hasattr(model, ATTACHED_MARKER):
        raise RuntimeError("an eraser is already attached to this model: remove its handle before attaching another")
    handle = SteeringHandle(model)
    setattr(model, ATTACHED_MARKER, handle)
    return handle


def _add(hidden: Tensor, delta: Tensor, positions: slice | None) -> Tensor:
    """hidden + delta [batch, d] at `positions` (None: every position), in the hidden dtype."""
    delta = delta[:, None, :].type_as(hidden)
    if positions is None or (positions.start == 0 and positions.stop >= hidden.shape[1]):
        return hidden + delta
    steered = hidden.clone()
    steered[:, positions] += delta
    return steered


class SteeringHook:
    """A steered layer's forward hook: what every gate shares. Nothing happens while the handle stands aside
    or before a prompt; in mode "prefill" a forward holding none of the prompt's positions (a decode step) is
    left alone, the prefill's steering reaching it through the KV cache. `steer` adds the gate's term."""

    handle: SteeringHandle
    mode: str

    def __call__(self, module: nn.Module, args: Any, output: Any) -> Any:
        handle = self.handle
        if handle._suspended or handle.prompt is None:
            return None
        hidden = hidden_states(output)
        positions = handle.steered_slice(hidden.shape[1])
        if positions is None and self.mode == "prefill":
            return None
        delta = self.steer(module, hidden, positions)  # [batch, d] float32, or None
        if delta is None:
            return None
        return replace_hidden_states(output, _add(hidden, delta, positions if self.mode == "prefill" else None))

    def steer(self, module: nn.Module, hidden: Tensor, positions: slice | None) -> Tensor | None:
        raise NotImplementedError
