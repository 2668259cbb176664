"""The audit log of deletion requests: `DIR/audit.jsonl` next to the store's manifest, one JSON object a line,
append-only, each line fsynced before the admin call that caused it is acknowledged.

A line says what happened to which request and when, never what was forgotten: the asking token, the forget set
and the model appear only as sha256 digests. Fields: `time` (UTC, ISO 8601), `event` (added, uploaded, fitted,
deleted, bound), `name`, `token` (a 12-hex digest of the bearer token that asked, or null), and per event `file`
(the eraser file's name) and `file_sha256`, `forget_sha256` (fitted: `forget_digest`), `model` (a digest of the
served model's fingerprint), `withdrawn` (deleted: the time the request stopped being applied), `tenant`,
`bind` / `unbind` (bound: a digest of the tenant key and the names). `jq` reads it as it is; `mllmeraser
serve-log DIR` prints it as a table. Standard library only: the CLI reads it without the serve extra.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from ..errors import UserInputError, json_lines

AUDIT_FILE = "audit.jsonl"
EVENTS = ("added", "uploaded", "fitted", "deleted", "bound")


def utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def short_digest(text: str | bytes | None, length: int = 12) -> str | None:
    """A short sha256 of a secret (a bearer token, a tenant key): enough to tell two apart, not to recover one."""
    if text is None:
        return None
    return hashlib.sha256(text.encode() if isinstance(text, str) else text).hexdigest()[:length]


def canonical_digest(value: Any) -> str:
    """sha256 of the canonical JSON of `value` (sorted keys, no spaces): the same value, the same digest."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
                          .encode()).hexdigest()


def forget_digest(items: Sequence[Any]) -> str:
    """sha256 over the canonical JSON of a forget set's questions, answers and each image's pixel digest (mode,
    size and raw bytes of the decoded image): identifies the set without storing a fact or a photo."""
    entries = []
    for item in items:
        image = item.image
        pixels = None
        if image is not None:
            digest = hashlib.sha256(f"{image.mode}:{image.size[0]}x{image.size[1]}:".encode())
            digest.update(image.tobytes())
            pixels = digest.hexdigest()
        # A benchmark's item is named by its question as written (before its benchmark's instruction), a plain
        # prompt by its text: the question it was given as, so digests recorded before prompts were neutral hold.
        question = item.question if hasattr(item, "question") else item.text
        entries.append({"question": question, "answer": item.answer, "image_sha256": pixels})
    return canonical_digest(entries)


class AuditLog:
    """Appends events to `path`; each append is one write of one line, flushed and fsynced before it returns."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._repair()

    def _repair(self) -> None:
        """A line cut short by a crash (no final newline) was never acknowledged: drop it, so every line parses
        (jq stops at a torn line) and the next append starts a line of its own."""
        if not self.path.exists():
            return
        data = self.path.read_bytes()
        if data and not data.endswith(b"\n"):
            with open(self.path, "r+b") as fh:
                fh.truncate(data.rfind(b"\n") + 1)
                fh.flush()
                os.fsync(fh.fileno())

    def append(self, event: str, name: str | None, token: str | None = None, **fields: Any) -> dict[str, Any]:
        if event not in EVENTS:
            raise ValueError(f"unknown audit event {event!r}")
        record = {"time": utc_now(), "event": event, "name": name, "token": short_digest(token), **fields}
        line = (json.dumps(record, sort_keys=False, allow_nan=False) + "\n").encode()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line)  # O_APPEND: one write lands whole at the end, even with another writer
            os.fsync(fd)
        finally:
            os.close(fd)
        return record


def read_audit(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Every event in the log, oldest first; a line that does not parse is an error naming the file and line."""
    path = Path(path)
    if path.is_dir():
        path = path / AUDIT_FILE
    if not path.is_file():
        raise UserInputError(path, "no audit log here (the server writes it into its --erasers directory)")
    return [record for _, record in json_lines(path)]


COLUMNS = (("time", "time"), ("event", "event"), ("name", "name"), ("token", "token"),
           ("forget", "forget_sha256"), ("file", "file_sha256"), ("model", "model"), ("detail", None))


def _detail(record: dict[str, Any]) -> str:
    if record.get("event") == "bound":
        parts = [f"tenant {record.get('tenant')}"]
        parts += [f"+{n}" for n in record.get("bind") or []] + [f"-{n}" for n in record.get("unbind") or []]
        return " ".join(parts)
    if record.get("event") == "deleted":
        return f"withdrawn {record.get('withdrawn')}"
    return ""


def format_table(records: Iterable[dict[str, Any]]) -> str:
    """The events as an aligned text table; digests shortened to 12 hex characters."""
    rows = [[name for name, _ in COLUMNS]]
    for record in records:
        row = []
        for _, key in COLUMNS:
            value = _detail(record) if key is None else record.get(key)
            text = "-" if value in (None, "") else str(value)
            row.append(text[:12] if key is not None and key.endswith(("sha256", "model")) and value else text)
        rows.append(row)
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows)
