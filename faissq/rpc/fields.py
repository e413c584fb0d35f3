"""Checks of single request fields (docs/protocol.md, Request): typed errors, never `internal`.

Shared by the request decoders of every kind (protocol.py: top-k; kinds.py: range and fetch).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import numpy.typing as npt

from faissq import codec
from faissq.errors import (
    InvalidFilter,
    InvalidIds,
    InvalidParameter,
    InvalidVectors,
    PayloadTooLarge,
)

F32 = frozenset({"<f4"})
I64 = frozenset({"<i8"})
MAX_SEQ = (1 << 63) - 1  # update-log seqs are int64


def number(name: str, value: Any) -> float:
    """A finite int or float field."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise InvalidParameter(f"{name} must be a finite number, got {value!r:.40}")
    return float(value)


def integer(name: str, value: Any) -> int | None:
    """An optional integer field (bool is not an integer here)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidParameter(f"{name} must be an integer, got {value!r:.40}")
    return value


def capped(name: str, value: Any, cap: int, low: int = 1) -> int | None:
    """An optional integer field in [low, cap]."""
    out = integer(name, value)
    if out is not None and not low <= out <= cap:
        raise InvalidParameter(f"{name} must be in [{low}, {cap}], got {out}")
    return out


def min_seq(value: Any) -> int | None:
    """The optional `min_seq`: an update-log seq in [0, 2^63 - 1]."""
    return capped("min_seq", value, MAX_SEQ, low=0)


def queries(value: Any, max_bytes: int) -> npt.NDArray[np.float32]:
    """The `queries` frame: a 2-D <f4 matrix of at least one row and column."""
    arr = codec.unpack_array(
        value, field="queries", dtypes=F32, ndim=2, max_bytes=max_bytes, error=InvalidVectors
    )
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise InvalidVectors(f"queries must hold at least one row and column, got {arr.shape}")
    # NaN and Inf are the engine's check (as_vectors, invalid_vectors): not scanned twice here
    return arr


def check_work(rows: int, k: int, k_factor: int, max_candidates: int) -> None:
    """PayloadTooLarge when rows x k x k_factor (the candidates one search holds) is over cap."""
    candidates = rows * k * k_factor
    if candidates > max_candidates:
        raise PayloadTooLarge(
            f"{rows} rows x k {k} x k_factor {k_factor} = {candidates} candidates, "
            f"cap {max_candidates}"
        )


def id_frame(name: str, value: Any, cap: int) -> npt.NDArray[np.int64] | None:
    """An optional 1-D int64 id frame no longer than `cap`, every id >= 0."""
    if value is None:
        return None
    arr = codec.unpack_array(
        value, field=name, dtypes=I64, ndim=1, max_bytes=max(8 * cap, 8), error=InvalidIds
    )
    if arr.size > cap:
        raise PayloadTooLarge(f"{name} holds {arr.size} ids, cap {cap}")
    if arr.size and int(arr.min()) < 0:
        raise InvalidIds(f"{name} must hold ids >= 0")
    return arr


def filter_expr(value: Any, cap: int) -> dict[str, Any] | None:
    """The optional `filter`: a map of at most `cap` bytes as msgpack. Its terms are checked
    against the index's fields before it is searched (batch.py, faissq.index.filters)."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise InvalidFilter(f"filter must be a map, got {type(value).__name__}")
    size = len(codec.dumps(value))  # msgpack unpacks less nesting than it packs: this packs
    if size > cap:
        raise InvalidFilter(f"filter holds {size} bytes as msgpack, cap {cap}")
    return value
