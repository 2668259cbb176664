"""User-facing errors: one line, naming the file and the problem; the CLI turns them into exit status 2."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path


class UserInputError(Exception):
    """Bad input from the user (a file, a flag, a model directory). Never a bug in mllmeraser."""

    def __init__(self, path: str | os.PathLike | None, problem: str):
        self.path = None if path is None else str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}" if self.path else problem)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write `data` to `path` so a reader sees either the old file or the whole new one, never a torn one, and
    so the new file survives a crash once this returns.

    The temporary file is unique per call (mkstemp in the same directory: os.replace is atomic within one
    filesystem), so two threads or processes writing one path never touch each other's temporary; the last
    os.replace wins whole. The data is fsynced before the rename, and the directory after it (the rename itself
    is only durable once the directory entry is on disk). On any failure the temporary is removed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; the file gets what open() would have given it
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_directory(path.parent)
    return path


def _read_umask() -> int:
    mask = os.umask(0)  # reading the umask means setting it: put it straight back
    os.umask(mask)
    return mask


_UMASK = _read_umask()  # read once, at import: setting it per write would race with other threads' files


def fsync_directory(directory: str | os.PathLike) -> None:
    """Make a rename in `directory` durable (where the platform lets a directory be opened: not on Windows)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def json_lines(path: str | os.PathLike) -> Iterator[tuple[int, dict]]:
    """(line number, object) for each non-blank line of a JSON-lines file; a line that is not a JSON object is a
    UserInputError naming the file and the line."""
    path = Path(path)
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserInputError(path, f"line {number}: not JSON ({exc.msg})") from None
        if not isinstance(row, dict):
            raise UserInputError(path, f"line {number}: not a JSON object")
        yield number, row
