"""numpy <-> msgpack framing shared by Celery tasks and the search RPC; never pickle.

An array travels as a map ``{"dtype": "<f4", "shape": [n, d], "data": <raw little-endian bytes>}``
so any language can read it with no per-element encoding: the bytes are the C-order buffer.
"""

from __future__ import annotations

import math
from typing import Any

import msgpack
import numpy as np
import numpy.typing as npt

from faissq.errors import InvalidParameter, PayloadTooLarge, PermanentError

# dtypes allowed on the wire: explicit little-endian, nothing that needs an object decoder
WIRE_DTYPES = frozenset({"<f4", "<f8", "<f2", "<i8", "<i4", "<u8", "<u4", "|u1", "|b1"})

MAX_NDIM = 4  # vectors are 2-D, ids 1-D; anything deeper is a malformed message
# elements of an array, zero-length axes counted as one: numpy refuses shapes whose byte size
# overflows its index type even when the array is empty ([2**62, 0]), so they never reach it
MAX_ELEMENTS = 1 << 48
ITEMSIZE = {d: np.dtype(d).itemsize for d in WIRE_DTYPES}


def pack_array(arr: npt.ArrayLike) -> dict[str, Any]:
    """Frame an array as dtype + shape + raw little-endian C-order bytes."""
    if type(arr) is np.ndarray and arr.dtype.str in WIRE_DTYPES:  # the usual case, checked once
        return {"dtype": arr.dtype.str, "shape": list(arr.shape), "data": arr.tobytes()}
    a = np.asarray(arr)
    if a.dtype.byteorder == ">" or (a.dtype.byteorder == "=" and np.little_endian is False):
        a = a.astype(a.dtype.newbyteorder("<"))
    dtype = a.dtype.str
    if dtype not in WIRE_DTYPES:
        raise InvalidParameter(f"dtype {a.dtype} cannot travel on the wire")
    data = np.ascontiguousarray(a).tobytes()
    return {"dtype": dtype, "shape": [int(s) for s in a.shape], "data": data}


def unpack_array(
    obj: Any,
    *,
    field: str = "array",
    dtypes: frozenset[str] | None = None,
    ndim: int | None = None,
    max_bytes: int | None = None,
    error: type[PermanentError] = InvalidParameter,
) -> npt.NDArray[Any]:
    """Rebuild a read-only array from its frame, checking every field; bad frames raise `error`."""
    if not isinstance(obj, dict):
        raise error(f"{field} must be a map with dtype, shape and data, got {type(obj).__name__}")
    try:
        dtype, shape, data = obj["dtype"], obj["shape"], obj["data"]
    except KeyError:
        missing = {"dtype", "shape", "data"} - obj.keys()
        raise error(f"{field} lacks {', '.join(sorted(missing))}") from None
    if not isinstance(dtype, str) or dtype not in WIRE_DTYPES:
        raise error(f"{field}.dtype must be one of {sorted(WIRE_DTYPES)}, got {dtype!r}")
    if dtypes is not None and dtype not in dtypes:
        raise error(f"{field}.dtype must be one of {sorted(dtypes)}, got {dtype!r}")
    shape_t = check_shape(shape, field=field, ndim=ndim, error=error)
    if not isinstance(data, bytes | bytearray | memoryview):
        raise error(f"{field}.data must be raw bytes, got {type(data).__name__}")
    expected = math.prod(shape_t) * ITEMSIZE[dtype]
    if max_bytes is not None and max(expected, len(data)) > max_bytes:
        raise PayloadTooLarge(f"{field} holds {max(expected, len(data))} bytes, cap {max_bytes}")
    if len(data) != expected:
        raise error(f"{field}.data has {len(data)} bytes, shape {list(shape_t)} needs {expected}")
    try:
        return np.frombuffer(data, dtype=dtype).reshape(shape_t)
    except ValueError as exc:  # a shape numpy cannot hold: the frame is malformed
        raise error(f"{field}.shape {list(shape_t)} cannot be built: {exc}") from None


def check_shape(
    shape: Any,
    *,
    field: str = "array",
    ndim: int | None = None,
    error: type[PermanentError] = InvalidParameter,
) -> tuple[int, ...]:
    """Return a shape as a tuple of non-negative ints, or raise `error` naming the field."""
    if not isinstance(shape, list | tuple) or not 0 < len(shape) <= MAX_NDIM:
        raise error(f"{field}.shape must be a list of 1..{MAX_NDIM} integers, got {shape!r}")
    for s in shape:
        if isinstance(s, bool) or not isinstance(s, int) or s < 0:
            raise error(f"{field}.shape must hold non-negative integers, got {shape!r}")
    if ndim is not None and len(shape) != ndim:
        raise error(f"{field} must be {ndim}-D, got shape {list(shape)}")
    if math.prod(max(int(s), 1) for s in shape) > MAX_ELEMENTS:
        raise error(f"{field}.shape {list(shape)} exceeds {MAX_ELEMENTS} elements")
    return tuple(map(int, shape))


def dumps(obj: Any) -> bytes:
    """Encode a message with msgpack (bytes stay bin, strings stay str)."""
    return bytes(msgpack.packb(obj, use_bin_type=True))


def loads(data: bytes, *, max_bytes: int | None = None) -> Any:
    """Decode a msgpack message; anything malformed or too large raises InvalidParameter."""
    if max_bytes is not None and len(data) > max_bytes:
        raise PayloadTooLarge(f"message holds {len(data)} bytes, cap {max_bytes}")
    try:
        return msgpack.unpackb(data, raw=False, strict_map_key=True)
    except (ValueError, TypeError) as exc:  # msgpack's FormatError/ExtraData are ValueErrors
        raise InvalidParameter(f"message is not valid msgpack: {exc}") from exc
