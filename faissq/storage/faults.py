"""A local filesystem that fails on command: the seam for storage fault tests and drills.

Storage URL ``faultfs:///abs/folder`` with the storage option ``control`` (a JSON file path, set
through ``FAISSQ_STORAGE__OPTIONS='{"control": "/tmp/faults.json"}'``) behaves like the local
folder until the control file asks for faults. The file is read at every operation, so a test or
an operator drill switches faults on and off in a running worker without restarting it::

    {"fail": ["write", "rename"], "errno": "ENOSPC", "times": 3, "truncate_after": 100}

fail: operations to break, from ``write`` (creating files; a write call raises after
``truncate_after`` bytes of the file landed: a torn write), ``fsync`` (the flush before fsync),
``rename`` (mv and link), ``read``, ``remove``, ``makedirs``; errno: the error's name (default
EIO); times: stop failing after this many injected failures (default: never stop).

A hang (storage that stops answering, e.g. a stuck NFS mount) is ``{"stall": ["rename"],
"match": "CURRENT"}``: an operation of a listed kind on a path containing ``match`` blocks until
the control file no longer asks for it, so a test can kill the worker at exactly that step.

Every injected failure appends one line to ``<control>.hits`` and every hang one line to
``<control>.stalls``, so a test waits for the n-th fault (an event) instead of a delay.
"""

from __future__ import annotations

import errno
import json
import os
import time
from typing import Any

from fsspec.implementations.local import LocalFileSystem

PROTOCOL = "faultfs"
OPS = frozenset({"write", "fsync", "rename", "read", "remove", "makedirs"})


def _lines(path: str) -> int:
    try:
        with open(path, "rb") as fh:
            return fh.read().count(b"\n")
    except FileNotFoundError:
        return 0


def hits(control: str) -> int:
    """How many failures have been injected under `control` so far."""
    return _lines(control + ".hits")


def stalls(control: str) -> int:
    """How many operations have started hanging under `control` so far."""
    return _lines(control + ".stalls")


def set_faults(control: str, fail: list[str] | None = None, **options: Any) -> None:
    """Write the control file atomically (an empty `fail` and no `stall` clear every fault)."""
    unknown = (set(fail or ()) | set(options.get("stall", ()))) - OPS
    if unknown:
        raise ValueError(f"unknown fault operations {sorted(unknown)}; known: {sorted(OPS)}")
    tmp = f"{control}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump({"fail": list(fail or ()), **options}, fh)
    os.replace(tmp, control)


class FaultFS(LocalFileSystem):  # type: ignore[misc]  # fsspec ships no type hints
    """LocalFileSystem whose operations raise OSError while the control file says so."""

    protocol = PROTOCOL
    root_marker = "/"

    def __init__(self, *args: Any, control: str | None = None, **kwargs: Any) -> None:
        """control: path of the JSON control file (None: never fail)."""
        super().__init__(*args, **kwargs)
        self.control = control

    @classmethod
    def _strip_protocol(cls, path: Any) -> Any:
        path = str(path)
        if path.startswith(PROTOCOL + "://"):
            path = path[len(PROTOCOL) + 3 :]
        return super()._strip_protocol(path)

    def _plan(self) -> dict[str, Any]:
        if not self.control:
            return {}
        try:
            with open(self.control, encoding="utf-8") as fh:
                plan = json.load(fh)
        except (FileNotFoundError, ValueError):
            return {}
        return plan if isinstance(plan, dict) else {}

    def _error(self, op: str, plan: dict[str, Any] | None = None) -> OSError | None:
        """The OSError to raise for `op` now (and count it), or None."""
        plan = self._plan() if plan is None else plan
        if op not in plan.get("fail", ()):
            return None
        times = plan.get("times")
        if isinstance(times, int) and self.control and hits(self.control) >= times:
            return None
        code = getattr(errno, str(plan.get("errno", "EIO")), errno.EIO)
        if self.control:
            with open(self.control + ".hits", "ab") as fh:
                fh.write(f"{op}\n".encode())
        return OSError(code, f"{os.strerror(code)} (injected on {op})")

    def _check(self, op: str, path: Any = "") -> None:
        self._stall(op, str(path))
        exc = self._error(op)
        if exc is not None:
            raise exc

    def _stalled(self, op: str, path: str) -> bool:
        plan = self._plan()
        return op in plan.get("stall", ()) and str(plan.get("match", "")) in path

    def _stall(self, op: str, path: str) -> None:
        """Hang while the control file asks `op` on `path` to hang (an unanswering mount)."""
        if not (self.control and self._stalled(op, path)):
            return
        with open(self.control + ".stalls", "ab") as fh:
            fh.write(f"{op} {path}\n".encode())
        while self._stalled(op, path):
            time.sleep(0.01)

    def _open(self, path: str, mode: str = "rb", *args: Any, **kwargs: Any) -> Any:
        writing = any(c in mode for c in "wxa")
        if not writing:
            self._check("read", path)
            return super()._open(path, mode, *args, **kwargs)
        self._stall("write", str(path))
        plan = self._plan()
        if "write" in plan.get("fail", ()) and plan.get("truncate_after") is None:
            self._check("write")  # the whole file is refused (read-only, quota)
        return _FaultyFile(self, super()._open(path, mode, *args, **kwargs))

    def cat_file(self, path: str, *args: Any, **kwargs: Any) -> Any:
        self._check("read", path)
        return super().cat_file(path, *args, **kwargs)

    def mv(self, path1: str, path2: str, *args: Any, **kwargs: Any) -> None:
        self._check("rename", path2)
        super().mv(path1, path2, *args, **kwargs)

    def link(self, src: str, dst: str, **kwargs: Any) -> None:
        self._check("rename", dst)
        super().link(src, dst, **kwargs)

    def rm_file(self, path: str) -> None:
        self._check("remove", path)
        super().rm_file(path)

    def rm(self, path: Any, *args: Any, **kwargs: Any) -> None:
        self._check("remove", path)
        super().rm(path, *args, **kwargs)

    def makedirs(self, path: str, exist_ok: bool = False) -> None:
        if not self.exists(path):
            self._check("makedirs", path)
        super().makedirs(path, exist_ok=exist_ok)


class _FaultyFile:
    """An open file for writing whose writes tear and whose flush fails on command."""

    def __init__(self, fs: FaultFS, f: Any) -> None:
        self._fs = fs
        self._f = f
        self._written = 0

    def write(self, data: Any) -> int:
        plan = self._fs._plan()
        limit = plan.get("truncate_after")
        view = memoryview(data).cast("B")
        if "write" in plan.get("fail", ()) and isinstance(limit, int):
            room = max(0, limit - self._written)
            if view.nbytes > room:
                exc = self._fs._error("write", plan)
                if exc is not None:
                    self._f.write(view[:room])  # a torn write: some bytes land first
                    self._written += room
                    raise exc
        self._written += view.nbytes
        return int(self._f.write(view))

    def flush(self) -> None:
        self._f.flush()
        exc = self._fs._error("fsync")
        if exc is not None:
            raise exc

    def __getattr__(self, name: str) -> Any:
        return getattr(self._f, name)

    def __enter__(self) -> _FaultyFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self._f.close()
