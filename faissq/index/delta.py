"""The delta: recent upserts held as immutable numpy views, searched exactly by brute force."""

from __future__ import annotations

import faiss
import numpy as np
import numpy.typing as npt

from faissq.index.validate import F32, I64


class _Buffer:
    """Growable row storage shared by successive Deltas; rows past `used` are invisible to all."""

    def __init__(self, dim: int, capacity: int) -> None:
        self.ids: I64 = np.empty(capacity, dtype=np.int64)
        self.vectors: F32 = np.empty((capacity, dim), dtype=np.float32)
        self.used = 0


class Delta:
    """An immutable set of (id, vector) rows; every change returns a new Delta."""

    __slots__ = ("_buf", "_order", "dim", "ids", "vectors")

    def __init__(self, dim: int, buf: _Buffer | None = None, n: int = 0) -> None:
        self.dim = dim
        self._buf = buf if buf is not None else _Buffer(dim, 0)
        self.ids: I64 = self._buf.ids[:n]
        self.vectors: F32 = self._buf.vectors[:n]
        # sorted view of ids for vectorised membership and row lookup
        self._order: npt.NDArray[np.intp] = np.argsort(self.ids, kind="stable")

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    @property
    def nbytes(self) -> int:
        """Bytes held by the visible rows."""
        return int(self.ids.nbytes + self.vectors.nbytes)

    def rows_of(self, ids: I64) -> npt.NDArray[np.intp]:
        """Row of each id in this delta, -1 where absent (vectorised)."""
        if len(self) == 0 or ids.size == 0:
            return np.full(ids.shape, -1, dtype=np.intp)
        sorted_ids = self.ids[self._order]
        pos = np.searchsorted(sorted_ids, ids)
        pos_c = np.minimum(pos, len(self) - 1)
        found = sorted_ids[pos_c] == ids
        return np.where(found, self._order[pos_c], -1)

    def contains(self, ids: I64) -> npt.NDArray[np.bool_]:
        """Whether each id is a row of this delta."""
        return self.rows_of(ids) >= 0

    def appended(self, ids: I64, vectors: F32) -> Delta:
        """Return a Delta with these rows added (ids must not be present already)."""
        n, b = len(self), int(ids.shape[0])
        buf = self._buf
        # append in place only when no newer Delta wrote past our rows
        if buf.used != n or n + b > buf.ids.shape[0]:
            grown = _Buffer(self.dim, max(1024, 2 * (n + b)))
            grown.ids[:n] = self.ids
            grown.vectors[:n] = self.vectors
            grown.used = n
            buf = grown
        buf.ids[n : n + b] = ids
        buf.vectors[n : n + b] = vectors
        buf.used = n + b
        return Delta(self.dim, buf, n + b)

    def without(self, ids: I64) -> Delta:
        """Return a Delta with these ids removed (a compacted copy; unchanged if none present)."""
        rows = self.rows_of(ids)
        rows = rows[rows >= 0]
        if rows.size == 0:
            return self
        keep = np.ones(len(self), dtype=bool)
        keep[rows] = False
        n = int(keep.sum())
        buf = _Buffer(self.dim, max(1024, 2 * n))
        buf.ids[:n] = self.ids[keep]
        buf.vectors[:n] = self.vectors[keep]
        buf.used = n
        return Delta(self.dim, buf, n)

    def search(
        self,
        queries: F32,
        k: int,
        metric_type: int,
        allow: I64 | None = None,
        deny: I64 | None = None,
    ) -> tuple[F32, I64]:
        """Exact top-k over the rows that pass the allow/deny filters; -1 pads missing slots."""
        ids, vectors = self.ids, self.vectors
        if len(self) and (allow is not None or deny is not None):
            mask = np.ones(len(self), dtype=bool)
            if allow is not None:
                mask &= np.isin(ids, allow)
            if deny is not None:
                mask &= ~np.isin(ids, deny)
            ids, vectors = ids[mask], vectors[mask]
        scores, rows = faiss.knn(queries, vectors, k, metric=metric_type)
        out = np.where(rows >= 0, ids[np.maximum(rows, 0)] if ids.size else -1, -1)
        return scores.astype(np.float32, copy=False), out.astype(np.int64, copy=False)
