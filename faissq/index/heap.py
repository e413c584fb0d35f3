"""Give freed heap memory back to the kernel: after an index was swapped out, and at once for
large blocks.

glibc keeps freed blocks in its arenas for reuse: after a merge frees the previous FAISS index
(thousands of inverted-list blocks, each under the mmap threshold) the process keeps its pages,
and RSS grows well past the stored bytes under upsert/delete churn. `release_freed`
(malloc_trim) returns them after such a job; `mmap_large_blocks` fixes glibc's mmap threshold,
which otherwise rises to the size of every large block freed, so that the per-batch temporaries
of an upsert stay mmapped and go back on free instead of fragmenting the heap
(docs/benchmarks.md, Churn). Elsewhere than glibc both are no-ops.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import threading
from typing import Any

_LIBC: list[Any] = []
_LOCK = threading.Lock()


M_MMAP_THRESHOLD = -3  # mallopt parameter number (malloc.h)


def _libc() -> Any:
    """The C library when it is glibc (has malloc_trim), else None."""
    with _LOCK:
        if not _LIBC:
            name = ctypes.util.find_library("c")
            try:
                libc = ctypes.CDLL(name) if name else None
            except OSError:
                libc = None
            _LIBC.append(libc if hasattr(libc, "malloc_trim") else None)
        return _LIBC[0]


def release_freed() -> None:
    """Return the free pages of every malloc arena to the kernel (glibc's malloc_trim(0))."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


def mmap_large_blocks(threshold_bytes: int) -> bool:
    """Serve allocations of at least `threshold_bytes` by mmap from now on (0: keep glibc's
    adaptive default); whether the setting took."""
    libc = _libc()
    if libc is None or threshold_bytes <= 0:
        return False
    return bool(libc.mallopt(M_MMAP_THRESHOLD, int(threshold_bytes)))
