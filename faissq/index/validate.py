"""Input checks for the engine: every bad array becomes a named permanent error, never an assert."""

from __future__ import annotations

import math
from typing import Any

import faiss
import numpy as np
import numpy.typing as npt

from faissq.errors import DimensionMismatch, InvalidIds, InvalidParameter, InvalidVectors

F32 = npt.NDArray[np.float32]
I64 = npt.NDArray[np.int64]


def as_vectors(x: Any, dim: int | None, metric: str, *, copy: bool = True) -> F32:
    """Return a new float32 (n, d) C-array, normalised for cosine; the input is untouched.

    copy=False returns the input itself when it is already such an array (float32, C order,
    finite, unit rows under cosine): a build then never holds a second copy of the corpus.
    """
    if (
        metric == "cosine"
        and type(x) is np.ndarray
        and x.dtype == np.float32
        and x.shape[0] == 1
        and x.ndim == 2
        and x.shape[1] == dim
    ):
        # a lone float32 query (the RPC's usual case) in three FAISS calls: the general path's
        # numpy calls cost a visible part of a sub-millisecond search
        one = x.copy()
        sq1 = float(faiss.fvec_norm_L2sqr(faiss.swig_ptr(one), one.shape[1]))
        if math.isfinite(sq1) and sq1 > 0:
            faiss.fvec_renorm_L2(one.shape[1], 1, faiss.swig_ptr(one))
            return one
    arr = np.asarray(x)
    if not copy and _ready(arr, dim, metric):
        return arr
    if arr.ndim != 2:
        raise InvalidVectors(f"vectors must be a 2-D array (n, d), got {arr.ndim}-D {arr.shape}")
    if arr.dtype.kind not in "fiu" or arr.dtype == np.bool_:
        raise InvalidVectors(f"vectors must be floats, got dtype {arr.dtype}")
    if arr.dtype.kind == "f" and arr.dtype.itemsize > 4:
        finite64 = np.isfinite(arr)
        if not finite64.all():
            raise InvalidVectors(_bad_rows_message(finite64))
        if np.abs(arr).max(initial=0.0) > np.finfo(np.float32).max:
            raise InvalidVectors("vectors overflow float32")
    if dim is not None and arr.shape[1] != dim:
        raise DimensionMismatch(f"vectors have dimension {arr.shape[1]}, the index has {dim}")
    if arr.shape[1] == 0:
        raise InvalidVectors("vectors must have at least one dimension")
    out = np.array(arr, dtype=np.float32, order="C", copy=True)
    if metric == "cosine" and out.shape[0]:
        # one pass for both checks: a NaN/Inf anywhere makes its row's squared norm non-finite
        sq = np.einsum("ij,ij->i", out, out)  # no temporary, no overflow warning
        if math.isfinite(sq.max()) and np.count_nonzero(sq) == sq.size:  # the usual case
            out /= np.sqrt(sq)[:, None]
            return out
        if not np.isfinite(sq).all():
            finite = np.isfinite(out)
            if not finite.all():
                raise InvalidVectors(_bad_rows_message(finite))
            # huge but finite rows: scale by their largest component before squaring
            big = ~np.isfinite(sq)
            out[big] /= np.abs(out[big]).max(axis=1, keepdims=True)
            sq[big] = np.einsum("ij,ij->i", out[big], out[big])
        if not sq.all():
            zero = np.flatnonzero(sq == 0)
            raise InvalidVectors(
                f"{zero.size} zero vector(s) under cosine (first at row {int(zero[0])})"
            )
        out /= np.sqrt(sq)[:, None]
        return out
    finite = np.isfinite(out)
    if not finite.all():
        raise InvalidVectors(_bad_rows_message(finite))
    return out


def _ready(arr: Any, dim: int | None, metric: str) -> bool:
    """Whether arr can be used as it is: float32 C-array of dim columns, finite, unit rows."""
    if arr.dtype != np.float32 or arr.ndim != 2 or not arr.flags.c_contiguous:
        return False
    if arr.shape[1] == 0 or (dim is not None and arr.shape[1] != dim) or arr.shape[0] == 0:
        return False
    sq = np.einsum("ij,ij->i", arr, arr)
    if metric == "cosine":
        # float32 rounding leaves unit rows within ~1e-6 of 1; anything else is renormalised
        return bool(np.all(np.abs(sq - 1) <= 1e-4))
    return math.isfinite(float(sq.max()))  # a NaN or Inf anywhere makes its row's sum non-finite


def _bad_rows_message(finite: npt.NDArray[np.bool_]) -> str:
    """Describe which rows hold NaN or Inf."""
    rows = np.flatnonzero(~finite.all(axis=1))
    return f"{rows.size} vector(s) hold NaN or Inf (first at row {int(rows[0])})"


def as_ids(ids: Any, n: int | None = None, *, unique: bool = True) -> I64:
    """Return ids as a fresh int64 1-D array, checking length and uniqueness within the batch."""
    arr = np.asarray(ids)
    if arr.ndim != 1:
        raise InvalidIds(f"ids must be a 1-D array, got shape {arr.shape}")
    if arr.size and arr.dtype.kind not in "iu":
        raise InvalidIds(f"ids must be integers, got dtype {arr.dtype}")
    if arr.dtype == np.uint64 and arr.size and int(arr.max()) > np.iinfo(np.int64).max:
        raise InvalidIds("ids must fit in int64")
    out = np.array(arr, dtype=np.int64, copy=True)
    if n is not None and out.size != n:
        raise InvalidIds(f"got {out.size} ids for {n} vectors")
    if out.size and (out < 0).any():
        raise InvalidIds("ids must be >= 0 (-1 marks empty result slots)")
    if unique and out.size > 1:
        s = np.sort(out)
        dup = s[1:][s[1:] == s[:-1]]
        if dup.size:
            raise InvalidIds(f"{dup.size} duplicate id(s) in the batch, e.g. {int(dup[0])}")
    return out


def check_k(k: Any, max_k: int) -> int:
    """Return k as an int in [1, max_k]."""
    if isinstance(k, bool) or not isinstance(k, int | np.integer):
        raise InvalidParameter(f"k must be an integer, got {type(k).__name__}")
    if not 1 <= int(k) <= max_k:
        raise InvalidParameter(f"k must be in [1, {max_k}], got {k}")
    return int(k)


def check_positive(name: str, value: Any) -> int | None:
    """Return an optional positive integer parameter (nprobe, ef_search, k_factor)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise InvalidParameter(f"{name} must be an integer, got {type(value).__name__}")
    if int(value) <= 0:
        raise InvalidParameter(f"{name} must be > 0, got {value}")
    return int(value)


def check_recall(value: Any) -> float | None:
    """Return an optional target recall in (0, 1]."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, float | int):
        raise InvalidParameter(f"target_recall must be a number, got {type(value).__name__}")
    if not 0 < float(value) <= 1:
        raise InvalidParameter(f"target_recall must be in (0, 1], got {value}")
    return float(value)
