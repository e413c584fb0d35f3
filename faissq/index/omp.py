"""Run small FAISS calls on one OpenMP thread: their hand-off between threads costs more CPU
than the work itself on a few shared cores (benchmarks/upsert_stream.py)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import faiss


@contextmanager
def one_thread(when: bool = True) -> Iterator[None]:
    """This thread's FAISS calls inside use one OpenMP thread (libgomp keeps the setting per
    thread: other threads keep theirs); the setting is restored after. No-op when not `when`."""
    threads = faiss.omp_get_max_threads()
    if not when or threads <= 1:
        yield
        return
    faiss.omp_set_num_threads(1)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(threads)
