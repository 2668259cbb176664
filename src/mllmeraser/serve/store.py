"""The server's state on disk: the `--erasers DIR` directory, its manifest and its audit log.

    DIR/manifest.json      {"format": "mllmeraser-store", "version": 1,
                            "erasers": {name: {"file", "sha256", "source", "added"}, ...},   # in load order
                            "tenants": null | {api key: [name, ...]}}
    DIR/<name>.safetensors one file per served eraser, named in the manifest
    DIR/deleted/           files of withdrawn requests (and strays), moved aside, never loaded
    DIR/audit.jsonl        the audit log (audit.py)

The manifest is the truth: at start-up the server serves exactly the erasers it names, with its tenant bindings;
nothing else in the directory is read. Every change is written before the admin call that made it is
acknowledged, in an order that leaves a state a restart can read whatever instant the process dies at:

- add: the eraser file first (atomically), then the manifest naming it. Killed in between, the file is a stray:
  not in the manifest, so not served (the call was never acknowledged), and moved to deleted/ at the next start.
- delete: the manifest without it first, then its file moved to deleted/. Killed in between, the file is a
  stray as above: a withdrawn request never comes back. Files are moved, not removed, so the file whose sha256
  the audit log holds can still be shown; `rm -r DIR/deleted` at any time is safe.
- bind: the manifest only.

Each write is atomic (errors.atomic_write_bytes: temp file, fsync, rename) and followed by an fsync of the
directory, so the rename itself survives a power cut. A directory without a manifest (as `--erasers` was before
there was one) is adopted: every `*.safetensors` in it, sorted by name, then the manifest is written.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import UserInputError, atomic_write_bytes, fsync_directory
from .audit import AUDIT_FILE, AuditLog, short_digest, utc_now

MANIFEST_FILE = "manifest.json"
DELETED_DIR = "deleted"
FORMAT = "mllmeraser-store"
VERSION = 1
SOURCES = ("adopted", "added", "uploaded", "fitted")


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class Entry:
    """One served eraser as the manifest records it."""

    file: str
    sha256: str
    source: str  # how it came: adopted (a file found in a directory without manifest), added (a server-side
    added: str  # path), uploaded, fitted; `added`: when the manifest first named it (UTC ISO)

    def to_json(self) -> dict[str, str]:
        return {"file": self.file, "sha256": self.sha256, "source": self.source, "added": self.added}


@dataclass
class Store:
    """The state in `directory` (see the module docstring). Open it with `Store.open`; every change method writes
    through before it returns and is serialised by one lock, so two admin calls never interleave their writes."""

    directory: Path
    erasers: dict[str, Entry] = field(default_factory=dict)
    tenants: dict[str, list[str]] | None = None
    strays: list[str] = field(default_factory=list)  # files moved aside at open (not in the manifest)
    adopted: bool = False  # the manifest was written by this open, from a directory without one

    def __post_init__(self):
        self.directory = Path(self.directory)
        self._lock = threading.RLock()
        self.audit = AuditLog(self.directory / AUDIT_FILE)

    @property
    def manifest_path(self) -> Path:
        return self.directory / MANIFEST_FILE

    # ---- opening ------------------------------------------------------------------------------------

    @classmethod
    def open(cls, directory: str | os.PathLike, tenants_file: str | os.PathLike | None = None) -> Store:
        """The store in `directory` (created if missing). With a manifest: its erasers and bindings, each file
        checked against its sha256; files it does not name are moved to deleted/. Without one: every
        `*.safetensors` there is adopted and a manifest written. `tenants_file` (--tenants) adds the keys the
        manifest does not have yet; a key it has keeps the manifest's bindings (changed at run time since, e.g.
        a deleted eraser unbound). Nothing is written when anything is wrong."""
        directory = Path(directory)
        if directory.exists() and not directory.is_dir():
            raise UserInputError(directory, "not a directory of eraser .safetensors files")
        directory.mkdir(parents=True, exist_ok=True)
        manifest = directory / MANIFEST_FILE
        if manifest.exists():
            store = cls(directory, *_parse_manifest(manifest))
        else:
            found = sorted(path.name for path in directory.glob("*.safetensors"))
            entries = {Path(name).stem: Entry(name, file_sha256(directory / name), "adopted", utc_now())
                       for name in found}
            store = cls(directory, entries, None, adopted=True)
        had_tenants = store.tenants is not None
        fresh = store._merge_tenants(tenants_file)
        for name in store._stray_files():  # a torn add or delete: never acknowledged as served, so never served
            store._move_aside(name, "stray")
            store.strays.append(name)
        _clean_temp_files(directory)
        if store.adopted or fresh or (store.tenants is not None and not had_tenants):
            store._write_manifest()
        # audited after the manifest names them, as every change is: from here on they are enforced
        for name, entry in store.erasers.items() if store.adopted else ():
            store.audit.append("added", name, None, file=entry.file, file_sha256=entry.sha256, source="adopted")
        for key, bound in fresh.items():
            store.audit.append("bound", None, None, tenant=short_digest(key), bind=bound, unbind=[],
                               source="tenants file")
        return store

    def _merge_tenants(self, tenants_file: str | os.PathLike | None) -> dict[str, list[str]]:
        """Add the tenants file's keys the manifest lacks (their names checked against its erasers); those keys."""
        from .policy import read_tenants

        if tenants_file is None:
            return {}
        fresh = {key: bound for key, bound in read_tenants(tenants_file).items() if key not in (self.tenants or {})}
        for key, bound in fresh.items():
            unknown = [name for name in bound if name not in self.erasers]
            if unknown:
                raise UserInputError(tenants_file, f"tenant {key[:4]}... is bound to unknown eraser(s) {unknown}; "
                                     f"loaded: {sorted(self.erasers)}")
        self.tenants = {**(self.tenants or {}), **fresh}
        return fresh

    def _stray_files(self) -> list[str]:
        named = {entry.file for entry in self.erasers.values()}
        return sorted(path.name for path in self.directory.glob("*.safetensors") if path.name not in named)

    # ---- reading -------------------------------------------------------------------------------------

    def names(self) -> list[str]:
        with self._lock:
            return list(self.erasers)

    def path(self, name: str) -> Path:
        return self.directory / self.erasers[name].file

    def load_erasers(self) -> dict:
        """Every eraser the manifest names, in its order, through Eraser.load (validated; never unpickled)."""
        from ..core.eraser import Eraser
        return {name: Eraser.load(self.path(name)) for name in self.names()}

    def state(self) -> dict[str, Any]:
        """What a restart would serve: the names in order and the bindings (tests compare these)."""
        with self._lock:
            return {"erasers": list(self.erasers),
                    "tenants": None if self.tenants is None else {k: list(v) for k, v in self.tenants.items()}}

    # ---- changes -------------------------------------------------------------------------------------

    def add(self, name: str, data: bytes | Any, source: str, tenants: Iterable[str] = (), token: str | None = None,
            **audit: Any) -> Path:
        """Write `data` (the file's bytes, or an Eraser to save) as DIR/<name>.safetensors, then the manifest
        naming it (bound to `tenants`), then the audit line (event = source). The caller has checked the name
        is free and the eraser servable; a name already in the manifest is a ValueError (nothing written)."""
        if source not in SOURCES[1:]:
            raise ValueError(f"unknown source {source!r}")
        tenants = list(tenants)
        with self._lock:
            if name in self.erasers:
                raise ValueError(f"{name!r} is already in {self.manifest_path}")
            if tenants and (self.tenants is None or any(key not in self.tenants for key in tenants)):
                raise ValueError("unknown tenant key")
            path = self.directory / f"{name}.safetensors"
            if isinstance(data, (bytes, bytearray)):
                atomic_write_bytes(path, bytes(data))
            else:
                data.save(path)  # atomic, and durable once it returns (errors.atomic_write_bytes)
            entry = Entry(path.name, file_sha256(path), source, utc_now())
            self.erasers[name] = entry
            for key in tenants:
                self.tenants[key].append(name)
            try:
                self._write_manifest()
            except BaseException:  # not named, so not served: undo in memory and move the file aside
                del self.erasers[name]
                for key in tenants:
                    self.tenants[key].remove(name)
                self._move_aside(path.name, "unsaved")
                raise
            self.audit.append(source, name, token, file=entry.file, file_sha256=entry.sha256, **audit)
            return path

    def delete(self, name: str, token: str | None = None, audit: bool = True) -> None:
        """Withdraw `name`: the manifest without it (and without its bindings) first, then its file moved to
        deleted/, then the audit line (`audit=False`: an add rolled back before it was acknowledged)."""
        with self._lock:
            if name not in self.erasers:
                raise KeyError(name)
            erasers = dict(self.erasers)
            entry = self.erasers.pop(name)
            before = None if self.tenants is None else {k: list(v) for k, v in self.tenants.items()}
            for bound in (self.tenants or {}).values():
                while name in bound:
                    bound.remove(name)
            try:
                self._write_manifest()
            except BaseException:
                self.erasers, self.tenants = erasers, before

                raise
            try:
                self._move_aside(entry.file, "deleted")
            except OSError:  # withdrawn all the same (the manifest says so); the next open moves the stray
                pass
            if audit:
                when = utc_now()
                self.audit.append("deleted", name, token, file=entry.file, file_sha256=entry.sha256,
                                  added=entry.added, withdrawn=when)

    def bind(self, key: str, bind: Iterable[str] = (), unbind: Iterable[str] = (), token: str | None = None) -> None:
        """Bind `key` to the names in `bind` and from those in `unbind` (a new key is created): the manifest, then
        the audit line (the key itself never goes there, only its digest)."""
        bind, unbind = list(bind), list(unbind)
        with self._lock:
            if self.tenants is None:
                raise ValueError("no tenants")
            unknown = [name for name in bind if name not in self.erasers]
            if unknown:
                raise KeyError(unknown[0])
            before = {k: list(v) for k, v in self.tenants.items()}
            bound = self.tenants.setdefault(key, [])
            bound[:] = [name for name in bound if name not in unbind]
            bound += [name for name in dict.fromkeys(bind) if name not in bound]
            try:
                self._write_manifest()
            except BaseException:
                self.tenants = before
                raise
            self.audit.append("bound", None, token, tenant=short_digest(key), bind=bind, unbind=unbind)

    # ---- writing -------------------------------------------------------------------------------------

    def _write_manifest(self) -> None:
        manifest = {"format": FORMAT, "version": VERSION,
                    "erasers": {name: entry.to_json() for name, entry in self.erasers.items()},
                    "tenants": self.tenants}
        atomic_write_bytes(self.manifest_path, (json.dumps(manifest, indent=1) + "\n").encode())

    def _move_aside(self, file: str, why: str) -> None:
        source = self.directory / file
        if not source.exists():
            return
        aside = self.directory / DELETED_DIR
        aside.mkdir(exist_ok=True)
        stamp = utc_now().replace(":", "").replace("-", "")
        target = aside / f"{Path(file).stem}.{why}-{stamp}.safetensors"
        counter = 0
        while target.exists():  # two moves of one name in one millisecond
            counter += 1
            target = aside / f"{Path(file).stem}.{why}-{stamp}-{counter}.safetensors"
        os.replace(source, target)
        fsync_directory(aside)
        fsync_directory(self.directory)


def _clean_temp_files(directory: Path) -> None:
    """The atomic writer's temp files (".<name>.tmp..."), left only by a process killed mid-write: never read."""
    for path in directory.iterdir():
        if path.name.startswith(".") and ".tmp" in path.name and path.is_file():
            path.unlink(missing_ok=True)


def _parse_manifest(path: Path) -> tuple[dict[str, Entry], dict[str, list[str]] | None]:
    """The manifest's erasers and tenants; anything wrong is one UserInputError naming the file and the field."""
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserInputError(path, f"manifest is not valid JSON ({exc}); it is written atomically, so it was "
                             "edited or damaged by hand") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise UserInputError(path, f'not a store manifest (no "format": "{FORMAT}")')
    if manifest.get("version") != VERSION:
        raise UserInputError(path, f"manifest version {manifest.get('version')!r}, this mllmeraser reads {VERSION}")
    erasers, tenants = manifest.get("erasers"), manifest.get("tenants")
    if not isinstance(erasers, dict):
        raise UserInputError(path, '"erasers" must be an object {name: {"file", "sha256", "source", "added"}}')
    entries = {}
    for name, raw in erasers.items():
        if not isinstance(raw, dict) or not all(isinstance(raw.get(k), str) for k in ("file", "sha256", "source",
                                                                                       "added")):
            raise UserInputError(path, f'erasers[{name!r}] must be {{"file", "sha256", "source", "added"}} strings')
        entry = Entry(raw["file"], raw["sha256"], raw["source"], raw["added"])
        file = path.parent / entry.file
        if Path(entry.file).name != entry.file or not entry.file.endswith(".safetensors"):
            raise UserInputError(path, f"erasers[{name!r}].file must be a .safetensors file in the directory")
        if not file.is_file():
            raise UserInputError(path, f"erasers[{name!r}]: its file {entry.file} is missing")
        if file_sha256(file) != entry.sha256:
            raise UserInputError(path, f"erasers[{name!r}]: {entry.file} does not match its sha256 (changed since "
                                 "it was written)")
        entries[name] = entry
    if tenants is not None and not (isinstance(tenants, dict) and all(
            isinstance(key, str) and isinstance(bound, list) and all(n in entries for n in bound)
            for key, bound in tenants.items())):
        raise UserInputError(path, '"tenants" must be null or {"api key": [names in "erasers"]}')
    return entries, None if tenants is None else {key: list(bound) for key, bound in tenants.items()}
