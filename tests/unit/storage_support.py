"""Helpers for the storage tests: a fault-injecting filesystem and a read-only folder."""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fsspec.implementations.local import LocalFileSystem

from faissq.storage.fs import Storage


class _FailingFile:
    """Wraps an open file; raises ENOSPC once the filesystem's byte budget is spent."""

    def __init__(self, fs: FaultyFS, f: Any) -> None:
        self._fs = fs
        self._f = f

    def write(self, data: Any) -> int:
        n = memoryview(data).nbytes
        if self._fs.budget is not None:
            if n > self._fs.budget:
                part = memoryview(data).cast("B")[: self._fs.budget]
                self._f.write(part)  # a torn write: some bytes land, then the disk is "full"
                self._fs.budget = 0
                raise OSError(errno.ENOSPC, "No space left on device (injected)")
            self._fs.budget -= n
        return int(self._f.write(data))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._f, name)

    def __enter__(self) -> _FailingFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self._f.close()


class FaultyFS(LocalFileSystem):
    """A local filesystem whose writes fail mid-way after `budget` bytes (None: never)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.budget: int | None = None
        self.fail_rename = False
        self.read_only = False

    def _open(self, path: str, mode: str = "rb", *args: Any, **kwargs: Any) -> Any:
        if self.read_only and ("w" in mode or "x" in mode or "a" in mode):
            raise OSError(errno.EROFS, "Read-only file system (injected)")
        f = super()._open(path, mode, *args, **kwargs)
        return _FailingFile(self, f) if ("w" in mode or "x" in mode) else f

    def makedirs(self, path: str, exist_ok: bool = False) -> None:
        if self.read_only and not self.exists(path):
            raise OSError(errno.EROFS, "Read-only file system (injected)")
        super().makedirs(path, exist_ok=exist_ok)

    def mv(self, path1: str, path2: str, *args: Any, **kwargs: Any) -> None:
        if self.fail_rename:
            raise OSError(errno.EIO, "Input/output error (injected)")
        super().mv(path1, path2, *args, **kwargs)

    def link(self, src: str, dst: str, **kwargs: Any) -> None:
        if self.fail_rename:
            raise OSError(errno.EIO, "Input/output error (injected)")
        super().link(src, dst, **kwargs)


def faulty_storage(root: Path) -> tuple[Storage, FaultyFS]:
    """A Storage on `root` whose filesystem injects faults on demand."""
    fs = FaultyFS(skip_instance_cache=True)
    return Storage(fs, str(root)), fs


def _dirs(root: Path) -> list[Path]:
    return [root, *(p for p in root.rglob("*") if p.is_dir())]


@contextlib.contextmanager
def read_only(root: Path) -> Iterator[None]:
    """Make a folder tree unwritable: chmod for users, the immutable flag for root (chmod
    does not stop root)."""
    dirs = _dirs(root)
    if os.geteuid() != 0:
        modes = {d: d.stat().st_mode for d in dirs}
        for d in dirs:
            d.chmod(stat.S_IRUSR | stat.S_IXUSR)
        try:
            yield
        finally:
            for d in reversed(dirs):
                d.chmod(modes[d])
        return
    subprocess.run(["chattr", "+i", *map(str, dirs)], check=True, capture_output=True)
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", *map(str, dirs)], check=True, capture_output=True)


def can_make_read_only(tmp: Path) -> bool:
    """Say whether `read_only` works here (root needs chattr on a filesystem supporting it)."""
    probe = tmp / "probe-ro"
    probe.mkdir()
    try:
        with read_only(probe):
            try:
                (probe / "x").touch()
            except OSError:
                return True
            return False
    except (OSError, subprocess.CalledProcessError):
        return False
