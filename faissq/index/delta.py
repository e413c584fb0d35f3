"""The delta: recent upserts held as immutable views over shared row buffers, searched exactly.

Rows are only ever appended to a buffer. A delete or a replacing upsert marks the old row dead in
the new Delta (a sorted array of row numbers) instead of copying the live rows, so it costs
O(batch + dead) and no vector is moved; once dead rows pass DEAD_FRACTION of the rows, the live
ones are compacted into a fresh buffer (each copied row paid for by at least a third of a delete).
Buffers are anonymous memory maps: pages are resident only once written, and a buffer no state
uses any more goes back to the kernel at once, where glibc would keep a freed heap block
(benchmarks/churn.py).

Under an IVF primary each row also holds its coarse list (assigned by the primary's quantizer at
upsert), and a plain search scans only the rows in the lists the primary probes for the query, so
recent rows are found as the primary would find them once merged and the scan grows with the rows
in those lists, not with the delta (a full scan of 5,000 rows doubled the CPU of a search of 100k
IVF-Flat: benchmarks/upsert_stream.py). The first such search of a Delta copies its live rows
into a small IVF-Flat on the primary's quantizer and those lists, so the delta of a whole batch
is one FAISS search, parallel over the queries as the primary's is (a scan per query cost 8x).
An IVF-Flat primary on the CPU holds the delta's rows in its own lists instead (live.py).
"""

from __future__ import annotations

import mmap
from typing import Any

import faiss
import numpy as np
import numpy.typing as npt

from faissq.index.omp import one_thread
from faissq.index.validate import F32, I64

DEAD_FRACTION = 0.25  # compact when more than this share of a delta's rows are dead
MIN_CAPACITY = 1024  # rows of the smallest buffer
_NO_ROWS: npt.NDArray[np.intp] = np.empty(0, dtype=np.intp)
_NO_IDS: I64 = np.empty(0, dtype=np.int64)
UNLISTED = -1  # the list of a row that has none (scanned by every search)
PROBED_MAX_BYTES = 64 << 20  # live rows past this are scanned whole (see _probed_index)


def _mapped(shape: tuple[int, ...], dtype: Any) -> Any:
    """A zero-filled array in its own private anonymous mapping (unmapped when unreferenced)."""
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    if nbytes == 0:
        return np.zeros(shape, dtype=dtype)
    mm = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    return np.frombuffer(mm, dtype=dtype).reshape(shape)  # the array keeps `mm` alive


class _Buffer:
    """Growable row storage shared by successive Deltas; rows past `used` are invisible to all."""

    def __init__(self, dim: int, capacity: int) -> None:
        self.ids: I64 = _mapped((capacity,), np.int64)
        self.vectors: F32 = _mapped((capacity, dim), np.float32)
        self.lists: npt.NDArray[np.int32] = _mapped((capacity,), np.int32)  # coarse list per row
        self.used = 0


class Delta:
    """An immutable set of (id, vector) rows; every change returns a new Delta."""

    __slots__ = (
        "_buf",
        "_dead",
        "_ivf",
        "_keys",
        "_live",
        "_n",
        "_rows",
        "_sel",
        "coarse",
        "dim",
    )

    def __init__(self, dim: int) -> None:
        """An empty delta of dimension `dim`."""
        self.dim = dim
        self._buf = _Buffer(dim, 0)
        self._n = 0  # rows visible to this delta, dead ones included
        self._dead: npt.NDArray[np.intp] = _NO_ROWS  # sorted rows deleted or replaced
        self._keys: I64 = _NO_IDS  # sorted live ids ...
        self._rows: npt.NDArray[np.intp] = _NO_ROWS  # ... and the row holding each
        self._live: tuple[I64, F32] | None = None  # live ids/vectors in row order, made on use
        self._sel: tuple[Any, Any] | None = None  # selector of live rows (+ its bitmap), on use
        self._ivf: tuple[Any, Any] | None = None  # the probed index and its primary, on use
        self.coarse: int | None = None  # serial of the primary whose quantizer gave the lists

    @classmethod
    def _make(
        cls,
        buf: _Buffer,
        n: int,
        dead: npt.NDArray[np.intp],
        keys: I64,
        rows: npt.NDArray[np.intp],
        coarse: int | None,
    ) -> Delta:
        out = cls.__new__(cls)
        out.dim = buf.vectors.shape[1]
        out._buf, out._n, out._dead, out._keys, out._rows = buf, n, dead, keys, rows
        out._live = None
        out._sel = None
        out._ivf = None
        out.coarse = coarse
        return out

    def __len__(self) -> int:
        """Live rows."""
        return int(self._keys.size)

    @property
    def dead(self) -> int:
        """Rows deleted or replaced but still held until the next compaction or merge."""
        return int(self._dead.size)

    @property
    def nbytes(self) -> int:
        """Bytes held by the rows this delta sees, dead ones included."""
        return self._n * (8 + 4 * self.dim)

    @property
    def ids(self) -> I64:
        """Live ids in insertion order (a view when no row is dead, else a copy made once)."""
        return self._live_rows()[0]

    @property
    def vectors(self) -> F32:
        """Live vectors, aligned with `ids`."""
        return self._live_rows()[1]

    def _live_rows(self) -> tuple[I64, F32]:
        if self._live is None:
            buf, n = self._buf, self._n
            if not self._dead.size:
                self._live = (buf.ids[:n], buf.vectors[:n])
            else:
                order = np.sort(self._rows)
                self._live = (buf.ids[order], buf.vectors[order])
        return self._live

    def rows_of(self, ids: I64) -> npt.NDArray[np.intp]:
        """Row of each id in this delta, -1 where absent (vectorised)."""
        keys = self._keys
        if keys.size == 0 or ids.size == 0:
            return np.full(ids.shape, -1, dtype=np.intp)
        pos = np.minimum(np.searchsorted(keys, ids), keys.size - 1)
        return np.where(keys[pos] == ids, self._rows[pos], -1)

    def contains(self, ids: I64) -> npt.NDArray[np.bool_]:
        """Whether each id is a live row of this delta."""
        return self.rows_of(ids) >= 0

    def vectors_of(self, ids: I64) -> tuple[npt.NDArray[np.bool_], F32]:
        """Whether each id is a live row here, and its vector (zeros where it is not)."""
        rows = self.rows_of(ids)
        found = rows >= 0
        out = np.zeros((ids.size, self.dim), dtype=np.float32)
        out[found] = self._buf.vectors[rows[found]]
        return found, out

    def appended(
        self, ids: I64, vectors: F32, lists: Any = None, coarse: int | None = None
    ) -> Delta:
        """Return a Delta with these rows added (ids must not be live already).

        lists: each row's coarse list under the primary whose serial is `coarse` (None: the
        rows have none and every search scans them)."""
        n, b = self._n, int(ids.shape[0])
        if b == 0:
            return self
        buf, keys, rows = self._buf, self._keys, self._rows
        # lists from another primary's quantizer no longer say where a row would be probed
        stale = lists is not None and n > 0 and self.coarse not in (None, coarse)
        # append in place only when no newer Delta wrote past our rows
        if stale or buf.used != n or n + b > buf.ids.shape[0]:
            buf, keys, rows = self._compacted(extra=b, unlist=stale)
            n = buf.used
        buf.ids[n : n + b] = ids
        buf.vectors[n : n + b] = vectors
        buf.lists[n : n + b] = UNLISTED if lists is None else np.asarray(lists).reshape(-1)
        buf.used = n + b
        coarse_now = coarse if lists is not None else self.coarse
        order = np.argsort(ids, kind="stable")
        new_keys = np.ascontiguousarray(ids[order], dtype=np.int64)
        pos = np.searchsorted(keys, new_keys)
        keys = np.insert(keys, pos, new_keys)
        rows = np.insert(rows, pos, (n + order).astype(np.intp))
        dead = self._dead if buf is self._buf else _NO_ROWS
        return Delta._make(buf, n + b, dead, keys, rows, coarse_now)

    def without(self, ids: I64) -> Delta:
        """Return a Delta with these ids removed: their rows are marked dead, not copied."""
        keys = self._keys
        if keys.size == 0 or ids.size == 0:
            return self
        pos = np.minimum(np.searchsorted(keys, ids), keys.size - 1)
        hit = np.unique(pos[keys[pos] == ids])
        if hit.size == 0:
            return self
        dead = np.union1d(self._dead, self._rows[hit]).astype(np.intp, copy=False)
        keys, rows = np.delete(keys, hit), np.delete(self._rows, hit)
        out = Delta._make(self._buf, self._n, dead, keys, rows, self.coarse)
        if dead.size > DEAD_FRACTION * self._n:
            buf, keys2, rows2 = out._compacted(extra=0)
            return Delta._make(buf, buf.used, _NO_ROWS, keys2, rows2, self.coarse)
        return out

    def _compacted(
        self, extra: int, unlist: bool = False
    ) -> tuple[_Buffer, I64, npt.NDArray[np.intp]]:
        """The live rows copied, in order, into a fresh buffer with room for `extra` more
        (unlist: their coarse lists dropped)."""
        live = len(self)
        buf = _Buffer(self.dim, max(MIN_CAPACITY, 2 * (live + extra)))
        order = np.sort(self._rows)
        np.take(self._buf.ids, order, out=buf.ids[:live])
        np.take(self._buf.vectors, order, axis=0, out=buf.vectors[:live])
        if unlist:
            buf.lists[:live] = UNLISTED
        else:
            np.take(self._buf.lists, order, out=buf.lists[:live])
        buf.used = live
        # the new row of each sorted key is the rank of its old row among the live rows
        return buf, self._keys, np.searchsorted(order, self._rows).astype(np.intp)

    def search(
        self,
        queries: F32,
        k: int,
        metric_type: int,
        allow: I64 | None = None,
        deny: I64 | None = None,
    ) -> tuple[F32, I64]:
        """Exact top-k over the live rows that pass the allow/deny filters; -1 pads."""
        if allow is not None or deny is not None:
            ids, vectors = self.ids, self.vectors
            if len(self):
                mask = np.ones(len(self), dtype=bool)
                if allow is not None:
                    mask &= np.isin(ids, allow)
                if deny is not None:
                    mask &= ~np.isin(ids, deny)
                ids, vectors = ids[mask], vectors[mask]
            return exact_knn(queries, ids, vectors, k, metric_type)
        ids, vectors = self._buf.ids[: self._n], self._buf.vectors[: self._n]
        return exact_knn(queries, ids, vectors, k, metric_type, self._live_selector())

    def search_probed(
        self,
        queries: F32,
        k: int,
        metric_type: int,
        primary: Any,
        params: Any,
    ) -> tuple[F32, I64] | None:
        """Exact top-k of each query over the live rows in the lists the primary probes for it;
        None when none of those lists holds a row (the primary's answer stands).

        primary: the state.Primary whose serial is this delta's `coarse` (its quantizer placed
        the rows); params: its SearchParameters for the call, without a selector, so both
        search the same lists. A delta with rows placed by no quantizer, or past
        PROBED_MAX_BYTES, is scanned whole."""
        index = self._probed_index(primary, metric_type)
        if index is None:
            return self.search(queries, k, metric_type)
        scores, ids = index.search(queries, k, params=params)
        return None if int(ids[:, 0].max()) < 0 else (scores, ids)

    def _probed_index(self, primary: Any, metric_type: int) -> Any:
        """The live rows as an IVF-Flat on the primary's quantizer and their lists, so a batch
        is one FAISS call that probes as the primary does; made once per Delta, on its first
        probed search. None when some row has no list or the rows pass PROBED_MAX_BYTES (a
        copy per Delta would then cost too much)."""
        if self._ivf is not None:  # a Delta's rows and `coarse` never change
            return self._ivf[0]
        live = len(self)
        if live * (8 + 4 * self.dim) > PROBED_MAX_BYTES:
            self._ivf = (None, None)
            return None
        rows = np.sort(self._rows) if self._dead.size else np.arange(self._n)
        lists = self._buf.lists[rows].astype(np.int64)
        if live and lists.min() == UNLISTED:
            self._ivf = (None, None)
            return None
        ids = np.ascontiguousarray(self._buf.ids[rows])
        vectors = np.ascontiguousarray(self._buf.vectors[rows])
        nlist = int(primary.coarse.nlist)
        ivf = faiss.IndexIVFFlat(primary.quantizer, self.dim, nlist, metric_type)
        ptr = faiss.swig_ptr
        with one_thread():
            ivf.add_core(live, ptr(vectors), ptr(ids), ptr(lists))
        ivf.parallel_mode = 3  # lists given beforehand: still parallel over the queries
        # the primary's index owns the quantizer: held as long as this index may be searched
        self._ivf = (ivf, primary)  # two searches may both make it: the same index
        return ivf

    def _live_selector(self) -> Any:
        """A FAISS row selector passing the live rows (None when no row is dead), made once per
        Delta: the scan skips dead rows itself, so a search costs one FAISS call."""
        if not self._dead.size:
            return None
        if self._sel is None:  # two searches may both build it: same result, no harm
            live = np.ones(self._n, dtype=bool)
            live[self._dead] = False
            bitmap = np.packbits(live, bitorder="little")
            self._sel = (faiss.IDSelectorBitmap(bitmap.size, faiss.swig_ptr(bitmap)), bitmap)
        return self._sel[0]


def exact_knn(
    queries: F32, ids: I64, vectors: F32, k: int, metric_type: int, rows: Any = None
) -> tuple[F32, I64]:
    """Exact top-k of queries over (ids, vectors), only rows `rows` passes (a FAISS selector;
    None: all); -1 pads missing slots."""
    nq, d = queries.shape
    scores = np.empty((nq, k), dtype=np.float32)
    found = np.empty((nq, k), dtype=np.int64)
    if vectors.shape[0] == 0:
        scores.fill(_pad(metric_type))
        found.fill(-1)
        return scores, found
    x = np.ascontiguousarray(queries, dtype=np.float32)
    y = np.ascontiguousarray(vectors, dtype=np.float32)
    ptr = faiss.swig_ptr
    # fewer queries than threads: FAISS would split the rows across OpenMP threads, whose
    # hand-off costs more than the scan itself (one query over 10,000 rows: 2 ms CPU instead
    # of 0.14 on 2 shared cores)
    with one_thread(nq < faiss.omp_get_max_threads()):
        if metric_type == faiss.METRIC_INNER_PRODUCT:
            faiss.knn_inner_product(
                ptr(x), ptr(y), d, nq, y.shape[0], k, ptr(scores), ptr(found), rows
            )
        else:
            faiss.knn_L2sqr(
                ptr(x), ptr(y), d, nq, y.shape[0], k, ptr(scores), ptr(found), None, rows
            )
    hit = found >= 0
    return scores, np.where(hit, ids[np.maximum(found, 0)], -1) if ids.size else found


def _pad(metric_type: int) -> np.float32:
    """The score FAISS leaves in an empty slot for this metric."""
    big = np.finfo(np.float32).max
    return np.float32(-big if metric_type == faiss.METRIC_INNER_PRODUCT else big)
