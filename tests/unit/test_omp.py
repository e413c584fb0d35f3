"""one_thread: FAISS calls inside use one OpenMP thread; the setting comes back, even on error."""

from __future__ import annotations

import faiss
import pytest

from faissq.index.omp import one_thread


def test_one_thread_sets_and_restores_this_threads_setting() -> None:
    """Inside: one thread; after, and after an exception: the setting as it was."""
    faiss.omp_set_num_threads(2)
    with one_thread():
        assert faiss.omp_get_max_threads() == 1
    assert faiss.omp_get_max_threads() == 2
    with pytest.raises(RuntimeError), one_thread():
        raise RuntimeError("boom")
    assert faiss.omp_get_max_threads() == 2
    with one_thread(False):
        assert faiss.omp_get_max_threads() == 2
