"""Per-call FAISS SearchParameters and id selectors: a search never mutates the shared index."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import faiss
import numpy as np

from faissq.index.validate import I64


@dataclass
class CallParams:
    """A SearchParameters tree plus the Python objects that must outlive the call."""

    params: Any
    keep: list[Any] = field(default_factory=list)


def batch_selector(ids: I64) -> tuple[Any, list[Any]]:
    """Return an IDSelectorBatch over ids and the arrays it borrows from."""
    arr = np.ascontiguousarray(ids, dtype=np.int64)
    sel = faiss.IDSelectorBatch(int(arr.size), faiss.swig_ptr(arr))
    return sel, [arr, sel]


def not_selector(ids: I64) -> tuple[Any, list[Any]]:
    """Return a selector that rejects exactly these ids."""
    inner, keep = batch_selector(ids)
    sel = faiss.IDSelectorNot(inner)
    return sel, [*keep, sel]


def combine(selectors: list[tuple[Any, list[Any]]]) -> tuple[Any, list[Any]]:
    """AND together selectors (None when the list is empty)."""
    if not selectors:
        return None, []
    sel, keep = selectors[0]
    keep = list(keep)
    for other, other_keep in selectors[1:]:
        sel = faiss.IDSelectorAnd(sel, other)
        keep.extend([*other_keep, sel])
    return sel, keep


def make_params(
    index: Any, *, nprobe: int | None, ef_search: int | None, sel: Any, keep: list[Any]
) -> CallParams:
    """Build the SearchParameters tree matching index's structure (pre-transform, id map, IVF)."""
    idx = faiss.downcast_index(index)
    if isinstance(idx, faiss.IndexPreTransform):
        inner = make_params(idx.index, nprobe=nprobe, ef_search=ef_search, sel=sel, keep=keep)
        outer = faiss.SearchParametersPreTransform()
        outer.index_params = inner.params
        return CallParams(outer, [*inner.keep, inner.params])
    if isinstance(idx, faiss.IndexIDMap | faiss.IndexIDMap2):
        # IndexIDMap translates the selector onto internal ids itself
        return make_params(idx.index, nprobe=nprobe, ef_search=ef_search, sel=sel, keep=keep)
    if isinstance(idx, faiss.IndexIVF):
        p = faiss.SearchParametersIVF()
        if nprobe is not None:
            p.nprobe = min(nprobe, int(idx.nlist))
        else:
            p.nprobe = int(idx.nprobe)
    elif isinstance(idx, faiss.IndexHNSW):
        p = faiss.SearchParametersHNSW()
        p.efSearch = ef_search if ef_search is not None else int(idx.hnsw.efSearch)
    else:
        p = faiss.SearchParameters()
    if sel is not None:
        p.sel = sel
    return CallParams(p, keep)


def ivf_of(index: Any) -> Any | None:
    """Return the IndexIVF inside index, or None when it has no inverted lists."""
    try:
        return faiss.extract_index_ivf(index)
    except RuntimeError:
        return None


def hnsw_of(index: Any) -> Any | None:
    """Return the IndexHNSW inside an id map, or None."""
    idx = faiss.downcast_index(index)
    if isinstance(idx, faiss.IndexIDMap | faiss.IndexIDMap2):
        idx = faiss.downcast_index(idx.index)
    return idx if isinstance(idx, faiss.IndexHNSW) else None
