"""errors.atomic_write_bytes: threads writing one path never fail, never tear the file, never leave a temporary;
the data and the rename are fsynced."""

from __future__ import annotations

import hashlib
import os
import stat
import threading

import pytest

from mllmeraser import errors
from mllmeraser.errors import atomic_write_bytes

WRITERS, ROUNDS, SIZE = 8, 40, 64 * 1024


def payload(writer: int, round_: int) -> bytes:
    """SIZE bytes that say who wrote them and carry their own digest: a torn or mixed file fails `whole`."""
    body = hashlib.sha256(f"{writer}:{round_}".encode()).digest() * (SIZE // 32 - 2)
    return f"{writer:04d}:{round_:04d}".encode().ljust(32, b".") + body + hashlib.sha256(body).digest()


def whole(data: bytes) -> tuple[int, int] | None:
    """(writer, round) of a complete payload, or None."""
    if len(data) != SIZE or hashlib.sha256(data[32:-32]).digest() != data[-32:]:
        return None
    writer, round_ = (int(x) for x in data[:9].decode().split(":"))
    return (writer, round_) if data == payload(writer, round_) else None


def test_threads_writing_one_path_never_fail_tear_or_leave_a_temporary(tmp_path):
    target = tmp_path / "state.json"
    atomic_write_bytes(target, payload(9999, 0))
    failures, torn_reads, reads = [], [], []
    start, writing = threading.Barrier(WRITERS + 1), threading.Event()
    writing.set()

    def writer(index: int) -> None:
        start.wait()
        for round_ in range(ROUNDS):
            try:
                atomic_write_bytes(target, payload(index, round_))
            except Exception as error:  # the old pid-named temporary: FileNotFoundError from a rival's rename
                failures.append(repr(error))

    def reader() -> None:
        while writing.is_set():
            found = whole(target.read_bytes())
            reads.append(found)
            if found is None:
                torn_reads.append(True)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(WRITERS)]
    watcher = threading.Thread(target=reader)
    for thread in [*threads, watcher]:
        thread.start()
    start.wait()
    for thread in threads:
        thread.join()
    writing.clear()
    watcher.join()

    assert failures == []
    assert torn_reads == [] and len(reads) > 0
    final = whole(target.read_bytes())
    assert final is not None and final[1] == ROUNDS - 1  # some writer's last write, whole
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]  # no temporary left behind


def test_the_data_then_the_directory_are_fsynced_and_the_mode_is_what_open_gives(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync

    def recording_fsync(fd: int) -> None:
        synced.append("directory" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file")
        real_fsync(fd)

    monkeypatch.setattr(errors.os, "fsync", recording_fsync)
    path = atomic_write_bytes(tmp_path / "sub" / "eraser.safetensors", b"data")
    assert synced == ["file", "directory"]
    assert path.read_bytes() == b"data"
    plain = tmp_path / "plain"
    plain.write_bytes(b"x")  # what open() gives a new file under this umask
    assert stat.S_IMODE(path.stat().st_mode) == stat.S_IMODE(plain.stat().st_mode)


def test_a_failed_write_removes_its_temporary_and_keeps_the_old_file(tmp_path, monkeypatch):
    target = atomic_write_bytes(tmp_path / "results.json", b"old")

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(errors.os, "replace", broken_replace)
    for _ in range(3):
        with pytest.raises(OSError, match="disk full"):
            atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]
