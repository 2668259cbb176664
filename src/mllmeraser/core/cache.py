"""The model cache: what every deletion request on one model shares, computed once and kept on disk.

A fit reads two kinds of inputs (collection.py). Per request: the forget questions (their PGD recall pass and,
for a prompt gate, their pooled features). Per model: everything else, the same for every request,

    erasure   counts and sums of the steered layers' last-token outputs (the erasure mean of r_l)
    retain    prompt gates: pooled features at the decision layer (the knn bank; the ridge Grams), and of the
              retain photos' occluded copies ("retain_occluded", FitSettings.occlusion);
              paper gate: counts, sums and Grams of the steered layers (the null space)
    calibration  prompt gates: pooled features of the held-out calibration prompts (the threshold)

`SharedStatistics` holds them; `shared_statistics` loads them from a cache directory or computes and writes
them there. An entry is one safetensors file named by a key: the sha256 of

    the model's fingerprint (compat.model_fingerprint: weights sampled, not just the name), its parameter
    dtype and device type (the same weights in bfloat16 or on a GPU give other activations), the settings
    that shape the statistics (gate family, pooling, decision layer, occlusion, steered layers, decoder-layer path,
    batch size: padding changes the float sums), CACHE_VERSION, a digest of every retain, erasure and
    calibration item (its text, its options, its answer and its image's bytes), a digest of what turns an item
    into a forward besides the weights (`processing_identity`: the processor's and image processor's settings,
    the chat template, the tokenizer's class, size and padding side, the attention implementation) and the
    versions of torch, transformers and mllmeraser (their kernels and processors change activations too).

So a change to the data, the settings, the weights, the processing or the libraries reads another entry
(entries written before the processing and versions were part of the key are simply never read again), and
a stale entry is never read: it only takes disk until `mllmeraser cache --clear`. The tokenizer's vocabulary
itself is not hashed (its size is): a tokenizer edited in place at the same size is not seen. A request's fit with a warm cache runs only its forget
set through the model. Entries are written atomically; one that cannot be read is rebuilt and overwritten.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from torch import Tensor

from ..errors import UserInputError, atomic_write_bytes
from ..version import __version__
from . import collection, distributed, steering
from .artifact import Checker, read_artifact
from .compat import model_fingerprint
from .decoder_layers import find_decoder_layers
from .inputs import EncodedImage, PromptLike
from .settings import FitSettings, PaperGate, steered_layers

log = logging.getLogger(__name__)

CACHE_VERSION = 1
CACHE_ENV = "MLLMERASER_CACHE"  # the per-user cache root (the testbed's builds live there too)
METADATA_KEY = "mllmeraser_cache"
ENTRY = "model cache entry"  # what read_artifact's errors call these files
SHARED_GROUPS = ("retain", "erasure")  # the SteeringStats groups a cache entry holds


def cache_root() -> Path:
    """$MLLMERASER_CACHE, else ~/.cache/mllmeraser."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "mllmeraser")


def default_cache_dir() -> Path:
    """Where fits keep their model caches: <cache root>/fits."""
    return cache_root() / "fits"


def item_digest(items: Sequence[PromptLike]) -> str:
    """sha256 over every item's prompt-shaping fields (its `cache_fields()`) and image bytes, in order. An
    EncodedImage hashes its file bytes without decoding; a PIL image its mode, size and pixels."""
    digest = hashlib.sha256()
    for item in items:
        digest.update(json.dumps(item.cache_fields(), sort_keys=True).encode())
        image = item.image_source
        if isinstance(image, EncodedImage):
            digest.update(b"encoded:" + hashlib.sha256(image.data).digest())
        elif image is not None:
            digest.update(f"pil:{image.mode}:{image.size}:".encode() + hashlib.sha256(image.tobytes()).digest())
        else:
            digest.update(b"none")
    return digest.hexdigest()


def processing_identity(model, processor) -> dict[str, Any]:
    """The key's part for everything between an item and the model's activations other than the weights: a
    digest of the processor's settings (processor.to_dict(): the image processor's size, crop, mean, std,
    resampling, and the processor's own patch size and image token), the chat template, the tokenizer's class,
    size and padding side, and the attention implementation; and the library versions, in the clear (so
    `mllmeraser cache` can show them)."""
    import transformers

    tokenizer = getattr(processor, "tokenizer", processor)
    described = {
        "processor": processor.to_dict() if hasattr(processor, "to_dict") else None,
        "chat_template": getattr(processor, "chat_template", None) or getattr(tokenizer, "chat_template", None),
        "tokenizer": [type(tokenizer).__name__, len(tokenizer) if hasattr(tokenizer, "__len__") else None,
                      getattr(tokenizer, "padding_side", None)],
        "attn_implementation": getattr(model.config, "_attn_implementation", None),
    }
    digest = hashlib.sha256(json.dumps(described, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return {"processing": digest,
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "mllmeraser": __version__}}


def shape_settings(settings: FitSettings, layers_path: str, steered: Sequence[int]) -> dict[str, Any]:
    """The fit settings that change what a cache entry holds (the others act on the closed forms only), of
    settings resolved at the model's depth (FitSettings.at_depth: the decision layer an absolute index)."""
    if isinstance(settings.gate, PaperGate):
        return {"family": "paper", "layers_path": layers_path, "steered": list(steered),
                "batch_size": settings.batch_size}
    shape = {"family": "prompt", "layers_path": layers_path, "steered": list(steered),
             "batch_size": settings.batch_size, "pooling": settings.pooling, "decision_layer": settings.decision_layer}
    if settings.occlusion:  # named only where on: entries made before the setting existed keep their keys
        shape["occlusion"] = settings.occlusion
    return shape


@dataclass(eq=False)
class SharedStatistics:
    """A model's shared fit inputs (see the module docstring). `stats` holds the groups SHARED_GROUPS (retain
    counts, sums and, for the paper gate, Grams; erasure counts and sums); `features` the pooled prompt
    features "retain", "retain_occluded" (where retain has photos and occlusion is on) and, where calibration
    prompts were given, "calibration" [N, d] float32 (prompt gates);
    `identity` the key's inputs; `key` their sha256."""

    key: str
    identity: dict[str, Any]
    stats: steering.SteeringStats
    features: dict[str, Tensor] = field(default_factory=dict)
    status: str = "computed"  # "computed", "built" (computed and written to `path`) or "loaded" (from `path`)
    path: Path | None = None
    seconds: float = 0.0  # computing or loading

    @property
    def source(self) -> str:
        """Where these statistics came from, for people: "computed", "built at PATH" or "loaded from PATH"."""
        return {"built": f"built at {self.path}", "loaded": f"loaded from {self.path}"}.get(self.status, self.status)

    def check(self, settings: FitSettings, layers_path: str, steered: Sequence[int]) -> None:
        """Raise ValueError where these statistics were made under other settings than `settings`'s."""
        wanted, have = shape_settings(settings, layers_path, steered), self.identity["settings"]
        differ = sorted(k for k in {*wanted, *have} if have.get(k) != wanted.get(k))
        if differ:
            raise ValueError(f"the shared statistics were computed with other settings ({', '.join(differ)}): "
                             f"{ {k: have.get(k) for k in differ} } vs { {k: wanted.get(k) for k in differ} }")

    def save(self, path: str | os.PathLike) -> Path:
        tensors = {f"stats.{name}": t.detach().cpu().contiguous() for name, t in self.stats.state_dict().items()}
        tensors.update({f"features.{name}": t.detach().cpu().contiguous() for name, t in self.features.items()})
        header = {"cache_version": CACHE_VERSION, "key": self.key, "identity": self.identity}
        data = safetensors.torch.save(tensors, metadata={METADATA_KEY: json.dumps(header)})
        return atomic_write_bytes(path, data)

    @classmethod
    def load(cls, path: str | os.PathLike, device: torch.device | None = None) -> SharedStatistics:
        """Read an entry written by `save`; a one-line UserInputError naming the file where it is not one."""
        header, tensors = read_artifact(path, METADATA_KEY, ENTRY, _check_entry)
        try:
            stats = steering.SteeringStats.from_state_dict(
                {name.removeprefix("stats."): t for name, t in tensors.items() if name.startswith("stats.")}, device)
        except ValueError as error:
            raise UserInputError(path, f"{ENTRY} holds no valid statistics ({error})") from None
        features = {name.removeprefix("features."): t for name, t in tensors.items() if name.startswith("features.")}
        return cls(header["key"], header["identity"], stats, features, status="loaded", path=Path(path))


def _check_entry(header: Any, check: Checker) -> None:
    """Refuse a header that is not this version's entry header (read_artifact's check)."""
    version = header.get("cache_version") if isinstance(header, dict) else None
    if version != CACHE_VERSION:
        raise check.refuse(f"cache version {version!r}, expected {CACHE_VERSION}")
    if not isinstance(header.get("key"), str) or not isinstance(header.get("identity"), dict):
        raise check.refuse(f"{ENTRY} header has no key or no identity")


def cache_key(identity: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:32]


def entry_path(cache_dir: Path, key: str) -> Path:
    return Path(cache_dir) / f"shared-{key}.safetensors"


def shared_statistics(model, processor, *, retain: Sequence[PromptLike], erasure: Sequence[PromptLike],
                      calibration: Sequence[PromptLike] | None, settings: FitSettings, layers_path: str | None = None,
                      cache_dir: str | os.PathLike | None = None, progress: bool = True) -> SharedStatistics:
    """The shared statistics of `model` on these retain, erasure and calibration items under `settings`:
    read from `cache_dir` where an entry with their key is there, else computed (the forwards of collection.py)
    and, with a `cache_dir`, written there. cache_dir None: computed, never written."""
    names, layers = find_decoder_layers(model, layers_path)
    path = names[0].rsplit(".", 1)[0]
    settings = settings.at_depth(len(layers))  # keyed by the layer a fraction names: one entry for both spellings
    steered = steered_layers(settings, len(layers))
    parameter = next(model.parameters())
    identity = {
        "cache_version": CACHE_VERSION,
        "fingerprint": model_fingerprint(model),
        "dtype": str(parameter.dtype).removeprefix("torch."),
        "device_type": parameter.device.type,
        "settings": shape_settings(settings, path, steered),
        "retain": [len(retain), item_digest(retain)],
        "erasure": [len(erasure), item_digest(erasure)],
        "calibration": None if not calibration else [len(calibration), item_digest(calibration)],
        **processing_identity(model, processor),
    }
    key = cache_key(identity)
    started = time.perf_counter()
    entry = None if cache_dir is None else entry_path(Path(cache_dir), key)
    if entry is not None and entry.is_file():
        try:
            shared = SharedStatistics.load(entry, collection.statistics_device(model))
            if shared.key == key:
                shared.seconds = time.perf_counter() - started
                return shared
        except UserInputError as error:
            log.warning("model cache entry %s is unreadable (%s); rebuilding it", entry, error.problem)
    stats, features = collection.shared_inputs(model, processor, retain=retain, erasure=erasure, calibration=calibration,
                                            settings=settings, layers_path=layers_path, progress=progress)
    shared = SharedStatistics(key, identity, stats, features)
    if entry is not None and distributed.world()[0] == 0:  # one writer: rank 0 under torchrun
        shared.save(entry)
        shared.status, shared.path = "built", entry
    shared.seconds = time.perf_counter() - started
    return shared


def entries(cache_dir: str | os.PathLike | None = None) -> list[tuple[Path, int, dict[str, Any]]]:
    """(path, bytes, identity) of every entry in `cache_dir` (default default_cache_dir()); an unreadable
    one has identity {"error": ...}."""
    directory = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    found = []
    for path in sorted(directory.glob("shared-*.safetensors")):
        try:
            identity = read_artifact(path, METADATA_KEY, ENTRY, _check_entry, tensors=False)[0]["identity"]
        except UserInputError as error:  # a listing must not fail on one bad file
            identity = {"error": error.problem}
        found.append((path, path.stat().st_size, identity))
    return found


def clear(cache_dir: str | os.PathLike | None = None) -> int:
    """Delete every entry in `cache_dir` (default default_cache_dir()); returns how many bytes were freed."""
    freed = 0
    for path, size, _ in entries(cache_dir):
        path.unlink(missing_ok=True)
        freed += size
    return freed

