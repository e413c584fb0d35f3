"""The one seam to shared storage: an fsspec filesystem plus the atomic-write rules faissq needs.

Two write disciplines, both valid on a local folder, NFS and object stores:

* ``write_atomic`` replaces a small object (a pointer, a manifest) so readers see old or new bytes,
  never a mix: temp file + fsync + rename + fsync of the folder locally, one PUT on object stores.
* ``write_exclusive`` creates an object only if it does not exist yet (log entries): locally a
  hard link of a fsync'd temp file, which fails when the name is taken; elsewhere ``mode="xb"``
  (conditional PUT) where the backend supports it.

Every write-side OSError becomes ``StorageUnavailable`` (retryable); nothing here creates folders
on the read side, so a reader works on a read-only mount.
"""

from __future__ import annotations

import contextlib
import errno
import os
import uuid
from collections.abc import Callable, Iterator
from typing import IO, Any, Protocol

import fsspec
from fsspec.implementations.local import LocalFileSystem

from faissq.errors import StorageUnavailable

TMP_PREFIX = ".tmp-"  # names starting with this are unfinished writes; every lister skips them


class Writable(Protocol):
    """A binary sink that ``Storage.open_new`` hands out."""

    def write(self, data: Any, /) -> int | None:
        """Write bytes (or any buffer) and return how many were written."""


@contextlib.contextmanager
def storage_errors(action: str, path: str) -> Iterator[None]:
    """Turn OS-level failures into StorageUnavailable naming the action and the path."""
    try:
        yield
    except StorageUnavailable:
        raise
    except (FileNotFoundError, FileExistsError):
        raise  # callers give these a meaning (absent pointer, name already taken)
    except OSError as exc:
        reason = errno.errorcode.get(getattr(exc, "errno", None) or 0, type(exc).__name__)
        raise StorageUnavailable(f"cannot {action} {path}: {reason}: {exc}") from exc


class Storage:
    """A storage root (local folder or any fsspec URL) with atomic and exclusive writes."""

    def __init__(self, fs: Any, root: str, *, fsync: bool = True) -> None:
        """Wrap `fs` rooted at `root`; `fsync` makes local writes durable before they return."""
        self.fs = fs
        self.root = root.rstrip("/") or "/"
        self.fsync = fsync
        self.is_local = isinstance(fs, LocalFileSystem)

    @classmethod
    def from_url(cls, url: str, *, fsync: bool = True, **options: Any) -> Storage:
        """Open the storage named by an fsspec URL or a local path (nothing is created)."""
        fs, root = fsspec.core.url_to_fs(url, **options)
        return cls(fs, root, fsync=fsync)

    def path(self, *parts: str) -> str:
        """Join `parts` under the root with '/', the separator of every fsspec backend."""
        return "/".join([self.root, *parts])

    # -- reading (never writes, never creates) ---------------------------------------------

    def exists(self, path: str) -> bool:
        """Say whether a file or folder exists."""
        with storage_errors("stat", path):
            return bool(self.fs.exists(path))

    def listdir(self, path: str) -> list[str]:
        """Return the base names in a folder, sorted, without unfinished temp files."""
        with storage_errors("list", path):
            try:
                entries = self.fs.ls(path, detail=False)
            except FileNotFoundError:
                return []
        names = (str(e).rstrip("/").rsplit("/", 1)[-1] for e in entries)
        return sorted(n for n in names if n and not n.startswith(TMP_PREFIX))

    def files_modified(self, path: str) -> list[tuple[str, float | None]]:
        """Every file in a folder (temp files too) with its last modification as a Unix time,
        from one listing; None where the listing does not say (see `modified`)."""
        with storage_errors("list", path):
            try:
                entries = self.fs.ls(path, detail=True)
            except FileNotFoundError:
                return []
        out = []
        for e in entries:
            if e.get("type") != "file":
                continue
            when = e.get("mtime", e.get("LastModified"))
            stamp = when.timestamp() if hasattr(when, "timestamp") else when
            name = str(e["name"]).rstrip("/").rsplit("/", 1)[-1]
            out.append((name, float(stamp) if isinstance(stamp, int | float) else None))
        return sorted(out)

    def read_bytes(self, path: str) -> bytes:
        """Read a whole (small) file; FileNotFoundError passes through unchanged."""
        with storage_errors("read", path):
            return bytes(self.fs.cat_file(path))

    def modified(self, path: str) -> float | None:
        """A file's last modification as a Unix time; None when it is gone or the backend
        cannot say."""
        with storage_errors("stat", path):
            try:
                return float(self.fs.modified(path).timestamp())
            except (FileNotFoundError, NotImplementedError, AttributeError):
                return None

    def size(self, path: str) -> int:
        """Return a file's size in bytes."""
        with storage_errors("stat", path):
            return int(self.fs.size(path))

    @contextlib.contextmanager
    def open_read(self, path: str) -> Iterator[IO[bytes]]:
        """Open a file for streaming reads."""
        with storage_errors("open", path):
            f = self.fs.open(path, "rb")
        try:
            yield f
        finally:
            f.close()

    def local_path(self, path: str) -> str | None:
        """Return an OS path usable by numpy's mmap when storage is local, else None."""
        return path if self.is_local else None

    # -- writing -----------------------------------------------------------------------------

    def makedirs(self, path: str) -> None:
        """Create a folder and its parents (writers only)."""
        with storage_errors("create folder", path):
            self.fs.makedirs(path, exist_ok=True)

    def _tmp_name(self, path: str) -> str:
        parent, _, name = path.rpartition("/")
        return f"{parent}/{TMP_PREFIX}{name}.{os.getpid()}.{uuid.uuid4().hex[:8]}"

    def _sync_file(self, f: Any) -> None:
        if not (self.fsync and self.is_local):
            return
        f.flush()
        os.fsync(f.fileno())

    def sync_dir(self, path: str) -> None:
        """Make renames and creations inside a local folder durable (no-op elsewhere)."""
        if not (self.fsync and self.is_local):
            return
        with storage_errors("sync folder", path):
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def _write_tmp(self, tmp: str, produce: Callable[[Writable], None]) -> None:
        with storage_errors("write", tmp), self.fs.open(tmp, "wb") as f:
            produce(f)
            self._sync_file(f)

    def _discard(self, tmp: str) -> None:
        with contextlib.suppress(OSError):
            self.fs.rm_file(tmp)

    def write_atomic(self, path: str, data: bytes) -> None:
        """Replace `path` with `data` so that readers see either the old or the new bytes."""
        self.write_atomic_stream(path, lambda f: f.write(data))

    def write_atomic_stream(self, path: str, produce: Callable[[Writable], Any]) -> None:
        """Like write_atomic, with the bytes written by `produce(file)` (streamed, not held)."""
        if not self.is_local:
            # an object PUT is atomic: readers see the old object until the upload completes
            with storage_errors("write", path), self.fs.open(path, "wb") as f:
                produce(f)
            return
        tmp = self._tmp_name(path)
        try:
            self._write_tmp(tmp, produce)
            with storage_errors("rename", path):
                self.fs.mv(tmp, path)
        except BaseException:
            self._discard(tmp)
            raise
        self.sync_dir(path.rpartition("/")[0])

    def write_exclusive(self, path: str, data: Any) -> bool:
        """Create `path` holding `data` unless it exists; return False when it already did."""
        return self.write_exclusive_stream(path, lambda f: f.write(data))

    def write_exclusive_stream(self, path: str, produce: Callable[[Writable], Any]) -> bool:
        """Like write_exclusive, with the bytes written by `produce(file)`."""
        if not self.is_local:
            return self._put_if_absent(path, produce)
        tmp = self._tmp_name(path)
        try:
            self._write_tmp(tmp, produce)
            with storage_errors("link", path):
                try:
                    self.fs.link(tmp, path)  # atomic, fails when the name is taken
                except FileExistsError:
                    return False
        finally:
            self._discard(tmp)
        self.sync_dir(path.rpartition("/")[0])
        return True

    def _put_if_absent(self, path: str, produce: Callable[[Writable], Any]) -> bool:
        try:
            with storage_errors("write", path), self.fs.open(path, "xb") as f:
                produce(f)
            return True
        except FileExistsError:
            return False
        except (NotImplementedError, TypeError):
            # backend without conditional writes: check then put (single-writer deployments only)
            if self.exists(path):
                return False
            with storage_errors("write", path), self.fs.open(path, "wb") as f:
                produce(f)
            return True

    @contextlib.contextmanager
    def open_new(self, path: str) -> Iterator[Writable]:
        """Stream a new file that nothing points to yet; durable (fsync'd) when the block exits."""
        with storage_errors("write", path):
            f = self.fs.open(path, "wb")
        try:
            with storage_errors("write", path):
                yield f
                self._sync_file(f)
        except BaseException:
            with contextlib.suppress(Exception):
                f.close()
            raise
        with storage_errors("write", path):
            f.close()

    def remove(self, path: str) -> None:
        """Delete one file; a missing file is fine."""
        with storage_errors("delete", path), contextlib.suppress(FileNotFoundError):
            self.fs.rm_file(path)

    def remove_tree(self, path: str) -> None:
        """Delete a folder and everything below it; a missing folder is fine."""
        with storage_errors("delete", path), contextlib.suppress(FileNotFoundError):
            self.fs.rm(path, recursive=True)
