"""Attaching steering to a model: find its decoder layers, capture activations, add the steering term.

Hooks only: forward hooks on the decoder layers and a forward pre-hook on the model (it reads the attention
mask and how much is cached, so each forward knows which of its positions belong to the prompt), all removed
in `finally`. Modules are never replaced, so state_dict keys and the model's own code stay untouched. The one
other thing an attachment changes is `model.generate`, wrapped on the instance while attached: it tells the
hooks where the prompt ends, which a forward without a KV cache or a chunk of a chunked prefill cannot know.

Steering is decided once per prompt and applied to the prompt's positions (mode "prefill"), so every
generation path (cached or not, chunked prefill, beam search, assisted decoding, one-token prompts, left or
right padding) gives the tokens one cached forward over the prompt would: see SteeringHandle.

Decoder layers in transformers v5 return a Tensor (the hidden states); older code returned a tuple whose
first element is the hidden states. Both are handled.
"""

from __future__ import annotations

import functools
import inspect
import itertools
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from ..errors import UserInputError
from .families import FAMILIES
from . import gating
from .devices import on_device
from .steering import shape_gate

SteeringMode = Literal["prefill", "all"]
STEERING_MODES: tuple[str, ...] = ("prefill", "all")

ATTACHED_MARKER = "_mllmeraser_steering"
"""Attribute set on a model while a SteeringHandle is attached to it."""

CACHE_PROMPT = "_mllmeraser_prompt"
"""Attribute set on a KV cache a steered forward filled: (the handle's serial, the prompt it holds)."""
_SERIALS = itertools.count(1)  # one per SteeringHandle: a cache filled under one attachment is not another's

_OVERRIDE_HINT = "pass --layers-path with the dotted path to the text decoder's layer ModuleList"


def find_decoder_layers(model: nn.Module, path: str | None = None) -> tuple[list[str], list[nn.Module]]:
    """Dotted names and modules of the text decoder layers, from `path` or the family's (`families.FAMILIES`)."""
    if path is None:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        if model_type not in FAMILIES:
            raise UserInputError(
                None, f"no known decoder-layer path for model_type {model_type!r}: {_OVERRIDE_HINT}"
            )
        path = FAMILIES[model_type].layers_path
    try:
        layer_list = model.get_submodule(path)
    except AttributeError as error:
        raise UserInputError(None, f"layers path {path!r} does not resolve ({error}): {_OVERRIDE_HINT}") from None
    if not isinstance(layer_list, nn.ModuleList) or len(layer_list) == 0:
        found = type(layer_list).__name__ if not isinstance(layer_list, nn.ModuleList) else "an empty ModuleList"
        raise UserInputError(None, f"layers path {path!r} is {found}, not a non-empty ModuleList: {_OVERRIDE_HINT}")
    return [f"{path}.{i}" for i in range(len(layer_list))], list(layer_list)


def _hidden_states(output: Any) -> Tensor:
    """The hidden states [batch, seq, d] of a decoder layer's output: a Tensor (v5) or a tuple's first item."""
    if isinstance(output, Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]
    raise TypeError(f"cannot find hidden states in a decoder layer output of type {type(output).__name__}")


def _replace_hidden_states(output: Any, hidden: Tensor) -> Any:
    if isinstance(output, Tensor):
        return hidden
    return type(output)((hidden, *output[1:]))


class _StopForward(Exception):
    """Raised by a capture hook once every requested layer has been seen: skips the rest of the model."""


def capture_last_token(model: nn.Module, layers: Sequence[nn.Module], **inputs: Any) -> Tensor:
    """Block outputs at each row's last real token for each of `layers`, [batch, num_layers, d] float32 on CPU.

    Runs `model(**inputs)` under no_grad; the last real token is read from the inputs' 2-D attention mask (any
    padding side), or is the last position where there is none. The forward stops right after the last requested layer. Hooks already on
    the model (e.g. an attached eraser) run first, so their effect is included.
    """
    return capture(model, layers, **inputs)[0]


def capture(model: nn.Module, layers: Sequence[nn.Module], pooled_layer: int | None = None, pooling: str = "mean",
            **inputs: Any) -> tuple[Tensor, Tensor | None]:
    """(last-position block outputs [batch, num_layers, d], and the pooled prompt feature [batch, d] of
    `layers[pooled_layer]` under the inputs' attention mask (gating.pool), or None), float32 on CPU, from one
    forward pass that stops after the last requested layer (see capture_last_token).
    """
    with reading_prompt(layers, inputs.get("attention_mask"), pooled_layer, pooling, stop=True) as read:
        try:
            with torch.no_grad():
                # use_cache=False: a capture never decodes, and a KV cache would be built and dropped per batch
                # (about 10 GB at 7B)
                model(**{**inputs, "use_cache": False})
        except _StopForward:
            pass
    return read.last, read.pooled


class PromptRead:
    """What `reading_prompt` read from one forward: `last` [batch, num_layers, d], the block outputs at each
    row's last prompt position, and `pooled` [batch, d] (or None), float32 on CPU."""

    def __init__(self, num_layers: int):
        self._captured: list[Tensor | None] = [None] * num_layers
        self.pooled: Tensor | None = None

    @property
    def complete(self) -> bool:
        return all(c is not None for c in self._captured)

    @property
    def last(self) -> Tensor:
        missing = [index for index, c in enumerate(self._captured) if c is None]
        if missing:
            raise RuntimeError(f"the forward pass never reached the layers at positions {missing}")
        return torch.stack(self._captured, dim=1)  # type: ignore[arg-type]


@contextmanager
def reading_prompt(layers: Sequence[nn.Module], mask: Tensor | None, pooled_layer: int | None = None,
                   pooling: str = "mean", columns: int | None = None, stop: bool = False) -> Iterator[PromptRead]:
    """Within the block, the next forward of the model over `layers` is read into the yielded PromptRead: at
    each of `layers`, the block output at each row's last prompt position, and the pooled prompt feature of
    `layers[pooled_layer]` (gating.pool under the 2-D attention `mask`).

    The prompt is the first `columns` positions of the inputs (None: all of them). A teacher-forced forward
    (models.encode_with_answers: [left padding][prompt][answer][right padding]) thus reads what a forward of
    the prompt alone would, causal attention keeping the answer out of the prompt's positions, and still gives
    the answer's logits: one forward for both (fitting's PGD). With `stop`, _StopForward is raised once every
    layer is read (the caller catches it: the rest of the model never runs)."""
    read = PromptRead(len(layers))

    def make_hook(index: int):
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            hidden = _hidden_states(output)
            hidden = hidden if columns is None else hidden[:, :columns]
            rows = _mask_for(mask if columns is None or mask is None else mask[:, :columns], hidden)
            last = gating.last_real_positions(rows, hidden.shape[1], hidden.shape[0], hidden.device)
            read._captured[index] = hidden[torch.arange(hidden.shape[0], device=hidden.device), last].to(
                device="cpu", dtype=torch.float32)
            if index == pooled_layer:
                read.pooled = gating.pool(hidden, rows, pooling).cpu()
            if stop and read.complete:
                raise _StopForward

        return hook

    handles = [layer.register_forward_hook(make_hook(index)) for index, layer in enumerate(layers)]
    try:
        yield read
    finally:
        for handle in handles:
            handle.remove()


def _mask_for(mask: Tensor | None, hidden: Tensor) -> Tensor | None:
    """The 2-D attention mask's columns for the positions `hidden` holds (the last seq of them: a forward
    that extends a KV cache sees only its new positions)."""
    if mask is None or mask.ndim != 2:
        return None
    return mask[:, -hidden.shape[1]:] if mask.shape[1] >= hidden.shape[1] else None


def _rows(values: Tensor, batch: int) -> Tensor:
    """Per-prompt values [B, ...] for a forward of `batch` rows: generate expands each prompt into consecutive
    rows (beams, num_return_sequences), so B divides `batch` and row i belongs to prompt i // (batch / B)."""
    if values.shape[0] == batch:
        return values
    if batch % values.shape[0]:
        raise RuntimeError(f"a forward of {batch} rows cannot carry the decisions of {values.shape[0]} prompts")
    return values.repeat_interleave(batch // values.shape[0], dim=0)


def _masked(handle: SteeringHandle, gates: Tensor) -> Tensor:
    """Gate values [batch, K] times the handle's per-row term mask (row_terms), where one is set."""
    if handle.row_terms is None:
        return gates
    return gates * _rows(handle.row_terms.to(device=gates.device, dtype=gates.dtype), gates.shape[0])


class _Prompt:
    """What one prompt's steering is fixed by, from its first forward on: the prompt's length T (positions
    0..T-1, padded coordinates), its 2-D mask over those positions, and the gate's decisions, taken once."""

    def __init__(self, length: int, mask: Tensor | None):
        self.length, self.mask = length, mask
        self.decisions: Tensor | None = None  # prompt gate: g [B, K]
        self.scores: Tensor | None = None
        self.fired: _Fired | None = None  # prompt gate: the terms that fired, what every steered layer adds
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
        self._suspended = True
        try:
            _, pooled = capture(self.model, [decision_layer], 0, pooling, **models.forward_inputs(self.model, inputs))
        finally:
            self._suspended = False
        return pooled


def _new_handle(model: nn.Module) -> SteeringHandle:
    if hasattr(model, ATTACHED_MARKER):
        raise RuntimeError("an eraser is already attached to this model: remove its handle before attaching another")
    handle = SteeringHandle(model)
    setattr(model, ATTACHED_MARKER, handle)
    return handle


def _start_tracking(handle: SteeringHandle) -> None:
    handle._hooks.append(handle.model.register_forward_pre_hook(handle._begin_forward, with_kwargs=True))
    handle._hooks.append(handle.model.register_forward_hook(handle._end_forward, with_kwargs=True))
    handle._wrap_generate()


def _add(hidden: Tensor, delta: Tensor, positions: slice | None) -> Tensor:
    """hidden + delta [batch, d] at `positions` (None: every position), in the hidden dtype."""
    delta = delta[:, None, :].type_as(hidden)
    if positions is None or (positions.start == 0 and positions.stop >= hidden.shape[1]):
        return hidden + delta
    steered = hidden.clone()
    steered[:, positions] += delta
    return steered


class _Steering:
    """A steered layer's forward hook: what every gate shares. Nothing happens while the handle stands aside
    or before a prompt; in mode "prefill" a forward holding none of the prompt's positions (a decode step) is
    left alone, the prefill's steering reaching it through the KV cache. `steer` adds the gate's term."""

    handle: SteeringHandle
    mode: str

    def __call__(self, module: nn.Module, args: Any, output: Any) -> Any:
        handle = self.handle
        if handle._suspended or handle.prompt is None:
            return None
        hidden = _hidden_states(output)
        positions = handle.steered_slice(hidden.shape[1])
        if positions is None and self.mode == "prefill":
            return None
        delta = self.steer(module, hidden, positions)  # [batch, d] float32, or None
        if delta is None:
            return None
        return _replace_hidden_states(output, _add(hidden, delta, positions if self.mode == "prefill" else None))

    def steer(self, module: nn.Module, hidden: Tensor, positions: slice | None) -> Tensor | None:
        raise NotImplementedError


class _LayerSteering(_Steering):
    """Forward hook of one layer under the paper's per-layer gate: at the prompt's first forward, the gate
    value g_l = shape_gate(h_last . u_l) is read at each row's last real prompt token and kept; every forward
    then adds sum_k alpha_k g_lk r_lk to the prompt's positions (mode "all": to every position)."""

    def __init__(self, handle: SteeringHandle, index: int, u: Tensor, r: Tensor, alpha: Tensor, floor: Tensor,
                 cap: Tensor, mode: str):
        self.handle, self.index, self.mode = handle, index, mode
        self.terms = (u, r, alpha, floor, cap)  # u, r: [K, d]; alpha, floor, cap: (K,); float32
        self._on: dict[torch.device, tuple[Tensor, ...]] = {}

    def steer(self, module: nn.Module, hidden: Tensor, positions: slice | None) -> Tensor | None:
        handle = self.handle
        u, r, alpha, floor, cap = on_device(self._on, hidden.device,
                                            lambda device: tuple(t.to(device) for t in self.terms))
        prompt = handle.prompt
        gates = prompt.layer_gates.get(self.index)
        if gates is None:
            mask = None if prompt.mask is None else _rows(prompt.mask, hidden.shape[0])  # per expanded row
            last = gating.last_real_positions(mask, prompt.length, hidden.shape[0], hidden.device) - handle.start
            if bool(((last < 0) | (last >= hidden.shape[1])).any()):
                raise RuntimeError("the paper's gate reads the last prompt token at every layer, and this forward does "
                                   "not hold it (chunked prefill?): generate without prefill_chunk_size, or use a "
                                   "prompt gate")
            h_last = hidden[torch.arange(hidden.shape[0], device=hidden.device), last].to(torch.float32)
            gates = prompt.layer_gates[self.index] = _masked(handle, shape_gate(h_last @ u.T, floor, cap))  # [B, K]
        return (_rows(gates, hidden.shape[0]) * alpha) @ r


def attach_steering(
    model: nn.Module,
    layers: Sequence[nn.Module],
    u: Tensor,
    r: Tensor,
    alpha: Sequence[float],
    floor: Sequence[float],
    cap: Sequence[float],
    mode: SteeringMode = "prefill",
) -> SteeringHandle:
    """Hook `layers` so block l's output gets + sum_k alpha_k shape_gate(h_last . u[k, l]) r[k, l] on the
    prompt's positions, h_last being each row's last real prompt token (read from the attention mask, so any
    padding side works) when the prompt is first seen.

    u, r: [K, len(layers), d]; alpha, floor, cap: K values. mode 'prefill' (the paper) steers the prompt's
    positions only, on every generation path (see SteeringHandle); 'all' steers every position, generated ones
    included, with the prompt's gate values. At most one attachment per model: a second raises RuntimeError
    until the first handle is removed.

    The hooks are prepended, so every other forward hook on a layer sees the steered output, whenever it was
    registered (transformers 5 installs its output_hidden_states hooks lazily, on first use).
    """
    if mode not in STEERING_MODES:
        raise ValueError(f"mode must be one of {STEERING_MODES}, got {mode!r}")
    num_terms = u.shape[0]
    if u.ndim != 3 or u.shape != r.shape or u.shape[1] != len(layers):
        raise ValueError(f"u and r must both be [K, {len(layers)}, d], got {list(u.shape)} and {list(r.shape)}")
    if not len(alpha) == len(floor) == len(cap) == num_terms:
        raise ValueError(f"alpha, floor and cap need {num_terms} values each")
    per_term = [torch.tensor(values, dtype=torch.float32) for values in (alpha, floor, cap)]
    handle = _new_handle(model)
    try:
        _start_tracking(handle)
        for index, layer in enumerate(layers):
            hook = _LayerSteering(handle, index, u[:, index].float(), r[:, index].float(), *per_term, mode=mode)
            handle._hooks.append(layer.register_forward_hook(hook, prepend=True))
    except BaseException:
        handle.remove()
        raise
    return handle


@dataclass(frozen=True)
class PromptDecision:
    """A prompt gate's decision for a batch of prompts, with what it steers: scores s [B, K], g [B, K] in
    {0, 1}, and for the terms `fired` [F] (those with g = 1 in some row) their directions r [F, L, d] and
    strengths alpha [F], float32, on any device. Taken from one consistent state of the terms' source."""

    scores: Tensor
    fires: Tensor
    fired: Tensor
    r: Tensor
    alpha: Tensor


class PromptTerms:
    """What _PromptSteering reads when it decides a prompt: the pooling of the gate's input, and
    `prompt_decision` (z [B, d] -> PromptDecision). A source may change between prompts (index.RequestIndex: requests added and
    withdrawn while attached); a prompt keeps the decision, directions and strengths it was decided with."""

    pooling: str

    def prompt_decision(self, z: Tensor) -> PromptDecision:
        raise NotImplementedError


class FixedPromptTerms(PromptTerms):
    """A fixed gate with directions r [K, L, d] and strengths alpha [K] (an Eraser's): r is moved once per
    device, and only the fired terms' rows are taken per prompt."""

    def __init__(self, gate: gating.PromptGate, r: Tensor, alpha: Tensor):
        self.gate, self.pooling = gate, gate.pooling
        self.r, self.alpha = r.float(), alpha.float()
        self._on: dict[torch.device, tuple[Tensor, Tensor]] = {}

    def prompt_decision(self, z: Tensor) -> PromptDecision:
        r, alpha = on_device(self._on, z.device, lambda device: (self.r.to(device), self.alpha.to(device)))
        scores = self.gate.scores(z)
        fires = self.gate.fires(scores)
        fired = fires.any(dim=0).nonzero().flatten()
        return PromptDecision(scores, fires, fired, r.index_select(0, fired), alpha.index_select(0, fired))


class _Fired:
    """The steering of one decided prompt, sparse in the terms: with w = (g * alpha)[:, fired] [B, F] (columns
    of terms that fire for some row), block l gets w @ r[fired, l], O(B F d) per layer whatever K is; nothing
    at all (None) where no term fires for any row."""

    def __init__(self, decisions: Tensor, decision: PromptDecision):
        weights = decisions.index_select(1, decision.fired.to(decisions.device)) * decision.alpha.to(decisions.device)
        # row_terms may have switched a fired term off in every row: such a column adds only zeros
        live = weights.ne(0).any(dim=0).nonzero().flatten()
        self.count = int(live.numel())
        self._on: dict[torch.device, tuple[Tensor, Tensor]] = {}
        if self.count:
            r = decision.r.index_select(0, live.to(decision.r.device))
            # [L, F, d], contiguous per layer: one plain [B, F] @ [F, d] product per steered layer
            self.terms = (weights.index_select(1, live), r.transpose(0, 1).contiguous().to(weights.device))

    def delta(self, position: int, hidden: Tensor) -> Tensor | None:
        """sum_k alpha_k g_k r[k, position] for each row of the forward in flight [batch, d], or None."""
        if not self.count:
            return None
        weights, r = on_device(self._on, hidden.device, lambda device: tuple(t.to(device) for t in self.terms))
        return _rows(weights, hidden.shape[0]) @ r[position]


class _PromptSteering(_Steering):
    """Forward hook of one layer under a prompt gate: at the decision layer (`decides`), pool the prompt and
    decide g [batch, K] once per prompt from `terms`; at every steered layer (`position` in the steered list,
    None for a decision layer that is not steered), add (g * alpha) @ r[:, position] to the prompt's positions,
    over the fired terms only (_Fired)."""

    def __init__(self, handle: SteeringHandle, terms: PromptTerms, decides: bool, position: int | None, mode: str):
        self.handle, self.terms, self.decides, self.position, self.mode = handle, terms, decides, position, mode

    def steer(self, module: nn.Module, hidden: Tensor, positions: slice | None) -> Tensor | None:
        handle = self.handle
        prompt = handle.prompt
        if self.decides and prompt.decisions is None:
            pooling = self.terms.pooling
            if handle.start == 0 and positions is not None and positions.stop == prompt.length:
                # generate's own mask (the fallback where its forward gets none) has a row per prompt, not per
                # expanded row (beams)
                mask = None if prompt.mask is None else _rows(prompt.mask.to(hidden.device), hidden.shape[0])
                z = gating.pool(hidden[:, : prompt.length], mask, pooling)
            else:  # the forward holds part of the prompt (chunked prefill): decide from all of it first
                z = handle.prompt_features(module, pooling)
            decision = self.terms.prompt_decision(z)
            prompt.scores = decision.scores
            prompt.decisions = _masked(handle, decision.fires)
            prompt.fired = _Fired(prompt.decisions, decision)
        if self.position is None or prompt.fired is None:
            return None  # the decision layer is not itself steered, or this prompt was never decided
        return prompt.fired.delta(self.position, hidden)


def attach_prompt_steering(
    model: nn.Module,
    decision_layer: nn.Module,
    layers: Sequence[nn.Module],
    gate: gating.PromptGate,
    r: Tensor,
    alpha: Sequence[float],
    mode: SteeringMode = "prefill",
) -> SteeringHandle:
    """Hook `layers` (all at or after `decision_layer` in the forward) so block l's output gets
    + sum_k alpha_k g_k r[k, l] on the prompt's positions, with g = gate.decide(pooled prompt at
    `decision_layer`) made once per prompt (see SteeringHandle for what a prompt is on each generation path).

    The attention mask is read from the model's own forward call (a pre-hook on `model`), so left and right
    padding both pool the real positions only. mode 'prefill' steers the prompt's positions; 'all' also steers
    generated positions, with the prompt's decision. Same one-attachment rule as attach_steering.
    """
    num_terms = gate.num_terms
    if r.ndim != 3 or r.shape[0] != num_terms or r.shape[1] != len(layers):
        raise ValueError(f"r must be [K={num_terms}, {len(layers)}, d], got {list(r.shape)}")
    if len(alpha) != num_terms:
        raise ValueError(f"alpha needs {num_terms} values")
    terms = FixedPromptTerms(gate, r, torch.tensor(alpha, dtype=torch.float32))
    return attach_prompt_terms(model, decision_layer, layers, terms, mode)


def attach_prompt_terms(
    model: nn.Module,
    decision_layer: nn.Module,
    layers: Sequence[nn.Module],
    terms: PromptTerms,
    mode: SteeringMode = "prefill",
) -> SteeringHandle:
    """attach_prompt_steering over any PromptTerms: `terms.prompt_decision` is called once per prompt, so a source that
    changes (index.RequestIndex) steers each new prompt with its state at that prompt's decision."""
    if mode not in STEERING_MODES:
        raise ValueError(f"mode must be one of {STEERING_MODES}, got {mode!r}")
    handle = _new_handle(model)
    try:
        _start_tracking(handle)
        steered = {id(layer): index for index, layer in enumerate(layers)}
        if id(decision_layer) not in steered:
            hook = _PromptSteering(handle, terms, True, None, mode)
            handle._hooks.append(decision_layer.register_forward_hook(hook, prepend=True))
        for index, layer in enumerate(layers):
            hook = _PromptSteering(handle, terms, layer is decision_layer, index, mode)
            handle._hooks.append(layer.register_forward_hook(hook, prepend=True))
    except BaseException:
        handle.remove()
        raise
    return handle
