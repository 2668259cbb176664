"""Whether an artifact fits a model: the model's fingerprint and the one check every attachment makes.

An eraser (or a request index) records the hidden size, the steered layers and the fingerprint of the model it
was fitted on. `check_compatible` is the one place that compares them with a model, for `Eraser.attach`,
`RequestIndex.attach` and the server's registry (which passes the fingerprint it computed once at start-up);
`fingerprint_mismatch` is the one rule for comparing two fingerprints, also used where two artifacts are
combined.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import UserInputError
from .decoder_layers import find_decoder_layers

_FINGERPRINT_ROWS = 64
_FINGERPRINT_SAMPLES = 256
# Where the weights sit, not which they are: never compared (an offloaded copy of a model is that model)
_NOT_COMPARED = ("weights_on_meta",)


def model_fingerprint(model: nn.Module) -> dict[str, Any]:
    """Cheap identity of a model: model_type, text hidden size, decoder layers, vocab size, two weight hashes.

    `weights_sha256` hashes every parameter: its name, its shape and up to 256 evenly spaced elements (flat
    indices floor(i * numel / 256)), gathered on the device the parameter lives on and moved to the CPU only as
    that sample. So two checkpoints of one architecture differ wherever a dense change touches any weight
    matrix (a fine-tune, a LoRA merged into the attention projections with the embeddings frozen); an edit of
    single elements outside the samples is not seen. Parameters on the meta device (offloaded, not in memory)
    cannot be read: where there are any, `weights_on_meta` counts them and `weights_sha256` is left out (a hash
    of the rest would not compare with a whole model's), so the weights are not checked for that model.
    `embedding_sha256` (the only hash before `weights_sha256`, still checked against old artifacts) hashes ~64
    strided rows of the input embedding. Both round the values to bfloat16, so one checkpoint loaded in
    float32 or bfloat16 hashes alike, and in float16 too where it is stored in float16 (llava-hf's) or in
    bfloat16 (values below float16's normal range excepted); float32 weights loaded in float16 are rounded twice
    and hash otherwise. `num_layers` is the text config's num_hidden_layers.
    """
    config = model.config
    text_config = config.get_text_config()
    embedding = model.get_input_embeddings().weight
    fingerprint = {
        "model_type": config.model_type,
        "hidden_size": int(text_config.hidden_size),
        "num_layers": int(text_config.num_hidden_layers),
        "vocab_size": int(embedding.shape[0]),
    }
    if not embedding.is_meta:
        stride = max(1, embedding.shape[0] // _FINGERPRINT_ROWS)
        fingerprint["embedding_sha256"] = _sha256(embedding.detach()[::stride])
    digest, on_meta = hashlib.sha256(), 0
    for name, parameter in model.named_parameters():
        if parameter.is_meta:
            on_meta += 1
            continue
        flat = parameter.detach().reshape(-1)  # a view: parameters are contiguous (a copy otherwise)
        count = min(_FINGERPRINT_SAMPLES, flat.numel())
        index = torch.arange(count, device=flat.device) * flat.numel() // max(count, 1)
        digest.update(f"{name} {list(parameter.shape)};".encode())
        digest.update(_bfloat16_bytes(flat[index]))
    if on_meta:
        fingerprint["weights_on_meta"] = on_meta
    else:
        fingerprint["weights_sha256"] = digest.hexdigest()[:16]
    return fingerprint


def _bfloat16_bytes(values: Tensor) -> bytes:
    return values.to(dtype=torch.bfloat16).to("cpu").contiguous().view(torch.int16).numpy().tobytes()


def _sha256(values: Tensor) -> str:
    return hashlib.sha256(_bfloat16_bytes(values)).hexdigest()[:16]


def fingerprint_mismatch(fitted: dict[str, Any], current: dict[str, Any]) -> str | None:
    """The first key both fingerprints hold with different values, or None: a key only one holds (e.g.
    `weights_sha256`, which artifacts written before it existed lack) is not compared, nor `weights_on_meta`
    (where the weights sit, not which they are)."""
    return next((key for key, value in fitted.items()
                 if key not in _NOT_COMPARED and key in current and current[key] != value), None)


def check_compatible(model: nn.Module, *, hidden_size: int, layer_indices: tuple[int, ...], layers_path: str,
                     fingerprint: dict[str, Any] | None, model_print: dict[str, Any] | None = None,
                     what: str = "eraser") -> list[nn.Module]:
    """The model's decoder layers at `layers_path`, where an artifact fitted for `hidden_size`, steering
    `layer_indices` and recording `fingerprint` (None: not checked) can be attached to it; else a one-line
    UserInputError saying what differs (`what` names the artifact). `model_print`: the model's fingerprint
    where it is already known (the server computes it once), else it is computed here when needed."""
    _, layers = find_decoder_layers(model, layers_path)
    model_hidden = int(model.config.get_text_config().hidden_size)
    if model_hidden != hidden_size:
        raise UserInputError(None, f"{what} was fitted for hidden size {hidden_size}, model has {model_hidden}")
    if max(layer_indices) >= len(layers):
        raise UserInputError(None, f"{what} steers layer {max(layer_indices)}, model has {len(layers)} decoder layers")
    if fingerprint is not None:
        current = model_print if model_print is not None else model_fingerprint(model)
        key = fingerprint_mismatch(fingerprint, current)
        if key is not None:
            raise UserInputError(None, f"{what} was fitted for {key} {fingerprint[key]!r}, model has {current[key]!r} "
                                       "(another model)")
    return layers
