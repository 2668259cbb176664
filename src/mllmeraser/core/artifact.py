"""The one reader of the safetensors files mllmeraser writes, and every check an eraser must pass before
anything in it is used.

`read_artifact` reads any of them (erasers, model cache entries): it opens the file (safetensors parses the
layout and refuses a truncated file, a wrong header length or data it does not cover), parses the JSON header
stored under one metadata key, has it checked, and checks the tensor names, all before any tensor is read.
`read_eraser_file` reads an eraser through it, with these checks:

    the "mllmeraser" header   JSON with no NaN or Infinity (json refuses neither, nor 1e999, by default) and no
                              repeated key; known fields only, each of its type (an int is not a bool, a list
                              is a list); strengths finite, gate bounds finite or null (= unbounded), the gate
                              a dict of its known fields with finite thresholds, metadata a dict
    tensor names              exactly the gate kind's: "r" and "u", or "r" and "gate.<name>" for the names in
                              gating.TENSOR_NAMES (a file can set no other constructor argument)

and then every tensor's dtype, shape and finiteness. Every failure is a one-line UserInputError naming the
file and the field, so `fit`, `generate`, `eval`, `serve` (exit status 2) and the server's upload (HTTP 400)
all refuse a bad file alike, and no file can reach the hooks with a NaN in it: a NaN strength or direction
spreads through 0 * NaN to every row of a shared batch, a NaN bank row makes every distance NaN.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import safetensors
import torch
from torch import Tensor

from ..errors import UserInputError
from . import gating
from .attachment import STEERING_MODES
from .settings import nested_record

FORMAT_VERSION = 4  # 3: shared retain rows (owner -1); 4: fit records nested per gate; 1..4 are read
METADATA_KEY = "mllmeraser"
# Every field a header of format 1..4 holds; "gate" (format 2 on) is null for a per-layer gate
HEADER_FIELDS = ("format_version", "layers_path", "layer_indices", "hidden_size", "num_terms", "dtype", "mode",
                 "alpha", "gate_floor", "gate_cap", "gate", "metadata")
_SHOWN = 60  # characters of a bad value quoted in an error


class _Refused(ValueError):
    """A header value json must not parse (a non-finite number, a repeated key)."""


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # "1e999" parses to inf
        raise _Refused(f"non-finite number {text}")
    return value


def _non_finite(text: str) -> float:
    raise _Refused(f"non-finite number {text}")


def _no_repeats(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [key for key, _ in pairs]
    if len(set(keys)) != len(keys):
        raise _Refused(f"repeated key {next(k for k in keys if keys.count(k) > 1)!r}")
    return dict(pairs)


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= _SHOWN else text[: _SHOWN - 3] + "..."


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    """A finite JSON number (the parser has already refused non-finite ones; a bool is not a number)."""
    return (_is_int(value) or isinstance(value, float)) and math.isfinite(value)


class Checker:
    """Refusals of one file: `refuse(problem)` is the one-line UserInputError naming it (what read_artifact's
    `check` raises), and field checks that raise UserInputError(path, "field ... must be ..., got ...")."""

    def __init__(self, path: Path):
        self.path = path

    def refuse(self, problem: str) -> UserInputError:
        return UserInputError(self.path, " ".join(problem.split()))  # one line, whatever the value held

    def integer(self, field: str, value: Any, lowest: int) -> int:
        if not _is_int(value) or value < lowest:
            raise self.refuse(f"header field {field!r} must be an integer >= {lowest}, got {_shown(value)}")
        return value

    def string(self, field: str, value: Any, choices: tuple[str, ...] | None = None) -> str:
        if not isinstance(value, str) or not value or (choices is not None and value not in choices):
            wanted = f"one of {list(choices)}" if choices is not None else "a non-empty string"
            raise self.refuse(f"header field {field!r} must be {wanted}, got {_shown(value)}")
        return value

    def numbers(self, field: str, value: Any, count: int, nullable: bool = False) -> list:
        """A list of `count` finite numbers (or nulls, where `nullable`)."""
        ok = isinstance(value, list) and len(value) == count and all(
            _is_number(v) or (nullable and v is None) for v in value)
        if not ok:
            what = "finite numbers or nulls" if nullable else "finite numbers"
            raise self.refuse(f"header field {field!r} must be a list of {count} {what}, got {_shown(value)}")
        return value


def check_header(header: Any, check: Checker) -> None:
    """Refuse an eraser header (JSON already parsed by read_artifact) that breaks the module docstring's rules."""
    if not isinstance(header, dict) or "format_version" not in header:
        raise check.refuse("eraser header has no format_version")
    version = header["format_version"]
    if not _is_int(version) or version < 1:
        raise check.refuse(f"invalid format_version {_shown(version)}")
    if version > FORMAT_VERSION:
        raise check.refuse(f"format_version {version} is newer than this mllmeraser reads ({FORMAT_VERSION}): "
                           "upgrade mllmeraser")
    unknown = sorted(set(header) - set(HEADER_FIELDS))
    if unknown:
        raise check.refuse(f"unknown header field {unknown[0]!r}")
    missing = [field for field in HEADER_FIELDS if field not in header and field != "gate"]  # format 1: no gate
    if missing:
        raise check.refuse(f"header has no field {missing[0]!r}")
    check.string("layers_path", header["layers_path"])
    indices = header["layer_indices"]
    if not isinstance(indices, list) or not indices or not all(_is_int(i) and i >= 0 for i in indices):
        raise check.refuse(f"header field 'layer_indices' must be a non-empty list of layer numbers >= 0, "
                           f"got {_shown(indices)}")
    check.integer("hidden_size", header["hidden_size"], 1)
    terms = check.integer("num_terms", header["num_terms"], 1)
    check.string("dtype", header["dtype"], ("float32",))
    check.string("mode", header["mode"], STEERING_MODES)
    check.numbers("alpha", header["alpha"], terms)
    check.numbers("gate_floor", header["gate_floor"], terms, nullable=True)
    check.numbers("gate_cap", header["gate_cap"], terms, nullable=True)
    gate = header.get("gate")
    if gate is not None:
        _check_gate(check, gate, terms)
    metadata = header["metadata"]
    if not isinstance(metadata, dict):
        raise check.refuse(f"header field 'metadata' must be a JSON object, got {_shown(metadata)}")
    requests = metadata.get("requests")
    if requests is not None and not (isinstance(requests, list) and len(requests) == terms
                                     and all(isinstance(r, dict) for r in requests)):
        raise check.refuse(f"header field 'metadata.requests' must be a list of {terms} objects, got {_shown(requests)}")
    if "fingerprint" in metadata and not isinstance(metadata["fingerprint"], dict):
        raise check.refuse(f"header field 'metadata.fingerprint' must be a JSON object, "
                           f"got {_shown(metadata['fingerprint'])}")


def _check_gate(check: Checker, gate: Any, terms: int) -> None:
    if not isinstance(gate, dict):
        raise check.refuse(f"header field 'gate' must be a JSON object or null, got {_shown(gate)}")
    fields = set(gate)
    if fields != set(gating.HEADER_FIELDS):
        odd = sorted(fields - set(gating.HEADER_FIELDS)) or sorted(set(gating.HEADER_FIELDS) - fields)
        raise check.refuse(f"header field 'gate' must hold exactly {list(gating.HEADER_FIELDS)}, "
                           f"not {'with' if fields - set(gating.HEADER_FIELDS) else 'without'} {odd[0]!r}")
    check.string("gate.kind", gate["kind"], gating.GATE_KINDS)
    check.string("gate.pooling", gate["pooling"])
    try:
        gating.window_width(gate["pooling"])
    except ValueError as error:
        raise check.refuse(f"header field 'gate.pooling': {error}") from None
    check.integer("gate.layer", gate["layer"], 0)
    check.integer("gate.neighbours", gate["neighbours"], 1)
    check.numbers("gate.threshold", gate["threshold"], terms)


def tensor_names(header: dict[str, Any]) -> tuple[str, ...]:
    """The tensors a file with this (validated) header holds, no more and no fewer."""
    gate = header.get("gate")
    if gate is None:
        return ("r", "u")
    return ("r", *(f"gate.{name}" for name in gating.TENSOR_NAMES[gate["kind"]]))


def _check_tensors(check: Checker, header: dict[str, Any], tensors: dict[str, Tensor]) -> None:
    """dtype, shape and finiteness of each tensor (names were checked before any was read)."""
    terms, layers, width = header["num_terms"], len(header["layer_indices"]), header["hidden_size"]
    for name in (name for name in tensors if name.endswith("_owner")):  # first: they give the banks' rows
        owner = tensors[name]
        if owner.dtype != torch.int64 or owner.ndim != 1:
            raise check.refuse(f"tensor {name!r} is {owner.dtype} {list(owner.shape)}, expected torch.int64 [N]")
    for name, tensor in tensors.items():
        if name.endswith("_owner"):
            continue
        floats = (torch.float16, torch.bfloat16, torch.float32) if name.endswith("_bank") else (torch.float32,)
        if tensor.dtype not in floats:
            expected = " or ".join(str(dtype) for dtype in floats)
            raise check.refuse(f"tensor {name!r} is {tensor.dtype}, expected {expected}")
        owner = name.replace("_bank", "_owner")
        expected_shape, why = {"r": ([terms, layers, width], ""), "u": ([terms, layers, width], ""),
                               "gate.u": ([terms, width], "")}.get(name) or (
            [tensors[owner].shape[0], width], f" (a row per entry of {owner!r})")
        if list(tensor.shape) != expected_shape:
            raise check.refuse(f"tensor {name!r} has shape {list(tensor.shape)}, expected {expected_shape}{why}")
        if not bool(torch.isfinite(tensor).all()):
            raise check.refuse(f"tensor {name!r} holds non-finite values (NaN or infinity)")


def read_artifact(path: str | Path, key: str, what: str, check: Callable[[Any, Checker], None] | None = None,
                  names: Callable[[Any], Sequence[str]] | None = None,
                  tensors: bool = True) -> tuple[Any, dict[str, Tensor]]:
    """(header, tensors) of a safetensors file that mllmeraser wrote (an eraser, a model cache entry): the one
    reader of such files. The header is the JSON under the file's metadata `key`, parsed strictly (no NaN or
    Infinity, no repeated key) and handed to `check(header, checker)`, which raises `checker.refuse(problem)`
    where it is not right; then, before any tensor is read, the file must hold exactly the tensors
    `names(header)` names (None: whatever it holds), and they are read unless `tensors` is False. Any problem
    is a one-line UserInputError naming the file and the problem; `what` names the kind of file in it."""
    path = Path(path)
    checker = Checker(path)
    if not path.is_file():
        raise checker.refuse(f"no such {what} file")
    try:
        with safetensors.safe_open(str(path), framework="pt") as reader:
            header = _parse_json(checker, reader.metadata() or {}, key, what)
            if check is not None:
                check(header, checker)
            held = set(reader.keys())
            expected = list(reader.keys()) if names is None else list(names(header))
            unknown = sorted(held - set(expected))
            if unknown:
                raise checker.refuse(f"unknown tensor {unknown[0]!r} (a file with this header holds {expected})")
            missing = [name for name in expected if name not in held]
            if missing:
                raise checker.refuse(f"missing tensor {missing[0]!r}")
            loaded = {name: reader.get_tensor(name) for name in expected} if tensors else {}
    except safetensors.SafetensorError as error:
        raise checker.refuse(f"not a safetensors file ({error})") from None
    except OSError as error:
        raise checker.refuse(f"unreadable {what} file ({error.strerror or error})") from None
    return header, loaded


def _parse_json(checker: Checker, raw_metadata: dict[str, str], key: str, what: str) -> Any:
    if key not in raw_metadata:
        raise checker.refuse(f"not an mllmeraser {what} (no {key!r} metadata)")
    try:
        return json.loads(raw_metadata[key], parse_constant=_non_finite, parse_float=_finite_float,
                          object_pairs_hook=_no_repeats)
    except _Refused as error:
        raise checker.refuse(f"{what} header holds a {error}") from None
    except (ValueError, RecursionError) as error:  # JSONDecodeError, an int of over 4300 digits, deep nesting
        raise checker.refuse(f"{what} header is not valid JSON ({error})") from None


def read_eraser_file(path: str | Path) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """(header, tensors) of an eraser artifact, every check of the module docstring passed; else a one-line
    UserInputError naming the file and the field. The header is read and checked before any tensor. A file of
    format 3 or before has its requests' fit records read into format 4's nested form (settings.nested_record)."""
    header, tensors = read_artifact(path, METADATA_KEY, "eraser", check_header, tensor_names)
    _check_tensors(Checker(Path(path)), header, tensors)
    if header["format_version"] < 4:  # each request's fit record was one flat bag of every gate's settings
        for request in header["metadata"].get("requests") or ():
            if "fit" in request:
                request["fit"] = nested_record(request["fit"])
    return header, tensors
