"""Which erasers a request gets: the loaded erasers by name, the tenants' bindings, and the one combined eraser
the batcher attaches (every loaded eraser stacked, one term range per name)."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from ..core.compat import check_compatible, model_fingerprint
from ..core.eraser import Eraser
from ..errors import UserInputError

NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")


class PolicyError(Exception):
    """A request the policy refuses: an HTTP status, an OpenAI error type and code, the parameter at fault."""

    def __init__(self, status: int, message: str, code: str, param: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.code, self.param, self.kind = status, message, code, param, kind


def check_name(name: str) -> str:
    if not name or len(name) > 128 or not set(name) <= NAME_CHARS:
        raise PolicyError(400, f"eraser name {name!r} must be 1-128 characters of letters, digits, '.', '_', '-'",
                          "invalid_name", "name")
    return name


def load_erasers(directory: Path | None) -> dict[str, Eraser]:
    """Every `*.safetensors` in `directory`, by file stem (sorted), loaded with Eraser.load (never torch.load)."""
    if directory is None:
        return {}
    directory = Path(directory)
    if not directory.is_dir():
        raise UserInputError(directory, "not a directory of eraser .safetensors files")
    return {path.stem: Eraser.load(path) for path in sorted(directory.glob("*.safetensors"))}


def read_tenants(path: Path, names: Iterable[str] | None = None) -> dict[str, list[str]]:
    """The tenants file, JSON {api key: [eraser name, ...]}; an eraser name not among `names` (where given) is an
    error naming the file."""
    path = Path(path)
    try:
        tenants = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserInputError(path, "no such tenants file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserInputError(path, f"tenants file is not valid JSON ({exc})") from None
    if not isinstance(tenants, dict) or not all(
            isinstance(key, str) and key and isinstance(value, list) and all(isinstance(n, str) for n in value)
            for key, value in tenants.items()):
        raise UserInputError(path, 'tenants file must be a JSON object {"api key": ["eraser name", ...]}')
    known = set(names if names is not None else (n for bound in tenants.values() for n in bound))
    for key, bound in tenants.items():
        unknown = [name for name in bound if name not in known]
        if unknown:
            raise UserInputError(path, f"tenant {key[:4]}... is bound to unknown eraser(s) {unknown}; "
                                 f"loaded: {sorted(known)}")
    return {key: list(dict.fromkeys(bound)) for key, bound in tenants.items()}


def combine(erasers: Iterable[Eraser]) -> Eraser | None:
    """Every eraser stacked in one concatenation (Eraser.concat), or None for none. Raises
    ValueError where they cannot share one attachment (a prompt gate with the paper's per-layer gate, other
    layers, another steering mode)."""
    erasers = list(erasers)
    return Eraser.concat(erasers) if erasers else None


@dataclass(frozen=True)
class Snapshot:
    """One consistent state of the registry: its version and the loaded erasers by name (in load order). The
    engine turns it into what it attaches (engine.Steering): a change costs the changed erasers, not the rest."""

    version: int
    erasers: Mapping[str, Eraser] = field(default_factory=dict)


class Registry:
    """The loaded erasers (by name) and the tenants' bindings, changed at run time by the admin endpoints.

    Policy: without tenants every loaded eraser applies to every request; with tenants (API key -> names) a
    request gets its key's bound erasers plus any it names, and cannot switch a bound one off. Every change
    bumps `version`; the batcher applies the change before its next batch (engine.Steering).
    """

    def __init__(self, erasers: Mapping[str, Eraser], model: nn.Module | None,
                 tenants: Mapping[str, list[str]] | None = None):
        self._lock = threading.RLock()  # add holds it through check_new
        self._model = model
        self._fingerprint = None if model is None else model_fingerprint(model)
        self._erasers: dict[str, Eraser] = {}
        self._tenants = None if tenants is None else {key: list(bound) for key, bound in tenants.items()}
        self._version = 0
        for name, eraser in erasers.items():
            self.check(name, eraser)
            self._erasers[name] = eraser
        self._snapshot = self._build()

    @property
    def multi_tenant(self) -> bool:
        return self._tenants is not None

    def names(self) -> list[str]:
        with self._lock:
            return list(self._erasers)

    def describe(self) -> list[dict[str, Any]]:
        with self._lock:
            return [{"name": name, "terms": eraser.num_terms,
                     "gate": "paper" if eraser.prompt_gate is None else eraser.prompt_gate.kind,
                     "requests": [request.get("request") for request in eraser.requests()]}
                    for name, eraser in self._erasers.items()]

    @property
    def fingerprint(self) -> dict[str, Any] | None:
        """The served model's fingerprint (computed once at start-up), or None without a model."""
        return self._fingerprint

    def bindings(self, key: str) -> list[str]:
        """The erasers tenant `key` is bound to ([] for an unknown key or without tenants)."""
        with self._lock:
            return list((self._tenants or {}).get(key, []))

    def check(self, name: str, eraser: Eraser) -> None:
        """Refuse an eraser fitted for another model (Eraser.attach's checks, compat.check_compatible, against
        the fingerprint computed once at start-up), or one that cannot be stacked with the loaded ones."""
        try:
            if self._model is not None:
                check_compatible(self._model, hidden_size=eraser.hidden_size, layer_indices=eraser.layer_indices,
                                 layers_path=eraser.layers_path, fingerprint=eraser.fingerprint,
                                 model_print=self._fingerprint)
        except UserInputError as exc:
            raise PolicyError(400, f"eraser {name!r}: {exc}", "model_mismatch") from None
        try:  # against one loaded eraser: stacking checks equal fields, so one stands for all (O(one request))
            combine([next(iter(self._erasers.values())), eraser] if self._erasers else [eraser])
        except ValueError as exc:
            raise PolicyError(400, f"eraser {name!r} cannot be served with the loaded erasers: {exc}",
                              "incompatible_eraser") from None

    def _build(self) -> Snapshot:
        return Snapshot(self._version, dict(self._erasers))

    def snapshot(self) -> Snapshot:
        with self._lock:
            return self._snapshot

    def check_new(self, name: str, tenants: Iterable[str] = ()) -> None:
        """Refuse a name that is invalid or taken, or tenant keys the server does not know (PolicyError)."""
        check_name(name)
        tenants = list(tenants)
        with self._lock:
            if name in self._erasers:
                raise PolicyError(409, f"an eraser named {name!r} is already loaded: delete it first", "name_taken",
                                  "name")
            if tenants and self._tenants is None:
                raise PolicyError(400, "tenants given, but the server runs without --tenants", "no_tenants", "tenants")
            unknown = [key for key in tenants if not isinstance(key, str) or key not in (self._tenants or {})]
            if unknown:
                raise PolicyError(400, f"{len(unknown)} unknown tenant key(s)", "unknown_tenant", "tenants")

    def add(self, name: str, eraser: Eraser, tenants: Iterable[str] = ()) -> None:
        """Load `eraser` as `name` (bound to the given tenant keys too); effective from the next batch."""
        tenants = list(tenants)
        with self._lock:
            self.check_new(name, tenants)
            self.check(name, eraser)
            self._erasers[name] = eraser
            for key in tenants:
                self._tenants[key].append(name)
            self._version += 1
            self._snapshot = self._build()

    def remove(self, name: str) -> None:
        """Unload `name` (and unbind it from every tenant); effective from the next batch."""
        with self._lock:
            if name not in self._erasers:
                raise PolicyError(404, f"no eraser named {name!r} is loaded", "unknown_eraser", "name")
            del self._erasers[name]
            for bound in (self._tenants or {}).values():
                if name in bound:
                    bound.remove(name)
            self._version += 1
            self._snapshot = self._build()

    def check_bind(self, key: str, bind: Iterable[str] = (), unbind: Iterable[str] = ()) -> None:
        """Refuse a binding the server cannot hold: no tenants, an empty key, or a name that is not loaded."""
        with self._lock:
            if self._tenants is None:
                raise PolicyError(400, "the server runs without tenants (--tenants)", "no_tenants", "tenant")
            if not isinstance(key, str) or not key:
                raise PolicyError(400, "'tenant' must be the tenant's API key", "invalid_type", "tenant")
            names = list(bind) + list(unbind)
            if not all(isinstance(name, str) for name in names):
                raise PolicyError(400, "'bind' and 'unbind' must be lists of eraser names", "invalid_type", "bind")
            unknown = [name for name in bind if name not in self._erasers]
            if unknown:
                raise PolicyError(400, f"unknown eraser(s) {unknown}", "unknown_eraser", "bind")

    def bind(self, key: str, bind: Iterable[str] = (), unbind: Iterable[str] = ()) -> None:
        """Bind tenant `key` (a new key is created) to `bind` and from `unbind`; effective from its next request."""
        bind, unbind = list(bind), list(unbind)
        with self._lock:
            self.check_bind(key, bind, unbind)
            bound = self._tenants.setdefault(key, [])
            bound[:] = [name for name in bound if name not in unbind]
            bound += [name for name in dict.fromkeys(bind) if name not in bound]

    def resolve(self, api_key: str | None, requested: Iterable[str] = ()) -> tuple[str, ...]:
        """The erasers for a request: the policy's (see the class) plus `requested`. An unknown key (with
        tenants) is 401; an unknown requested name, 400."""
        requested = list(requested)
        with self._lock:
            if self._tenants is None:
                base = list(self._erasers)
            else:
                if api_key is None or api_key not in self._tenants:
                    raise PolicyError(401, "invalid API key: send a tenant key as 'Authorization: Bearer KEY'",
                                      "invalid_api_key", kind="authentication_error")
                base = list(self._tenants[api_key])
            unknown = [name for name in requested if name not in self._erasers]
            if unknown:
                raise PolicyError(400, f"unknown eraser(s) {unknown}", "unknown_eraser", "erasers")  # no list of the
                # loaded ones: their names may name people, and other tenants' requests
            return tuple(dict.fromkeys(base + requested))
