"""The numpy <-> msgpack frame: exact round trips, and every malformed frame a named error."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from faissq import codec
from faissq.errors import InvalidParameter, InvalidVectors, PayloadTooLarge


@pytest.mark.parametrize("dtype", ["<f4", "<f8", "<i8", "<i4", "|u1", "|b1", ">f4"])
def test_round_trip_keeps_values_dtype_and_shape(dtype: str) -> None:
    """An array survives pack -> msgpack -> unpack bit for bit (big-endian comes back little)."""
    a = (np.arange(24).reshape(4, 6) % 3).astype(np.dtype(dtype))
    frame = codec.loads(codec.dumps(codec.pack_array(a)))
    b = codec.unpack_array(frame)
    assert b.shape == (4, 6) and b.dtype.byteorder in "<|="
    np.testing.assert_array_equal(a, b)
    assert isinstance(frame["data"], bytes) and len(frame["data"]) == a.nbytes


def test_frame_is_raw_little_endian_bytes() -> None:
    """The data field is the C-order buffer, readable without numpy."""
    frame = codec.pack_array(np.array([[1.0, 2.0]], dtype=np.float32))
    assert frame == {"dtype": "<f4", "shape": [1, 2], "data": b"\x00\x00\x80?\x00\x00\x00@"}


def test_pack_refuses_object_arrays() -> None:
    """Only plain numeric dtypes travel; objects would need pickle."""
    with pytest.raises(InvalidParameter):
        codec.pack_array(np.array([object()]))


GOOD = codec.pack_array(np.zeros((2, 3), np.float32))


@pytest.mark.parametrize(
    ("frame", "message"),
    [
        ([1, 2], "must be a map"),
        ({"dtype": "<f4", "shape": [2, 3]}, "lacks data"),
        ({**GOOD, "dtype": "O"}, "dtype must be one of"),
        ({**GOOD, "dtype": 5}, "dtype must be one of"),
        ({**GOOD, "shape": [2, -3]}, "non-negative"),
        ({**GOOD, "shape": "2x3"}, "shape must be a list"),
        ({**GOOD, "shape": [True, 3]}, "non-negative"),
        ({**GOOD, "shape": [1, 1, 1, 1, 1]}, "shape must be a list"),
        ({**GOOD, "shape": [3, 3]}, "needs 36"),
        ({**GOOD, "data": "text"}, "raw bytes"),
    ],
)
def test_malformed_frames_raise_the_given_error(frame: Any, message: str) -> None:
    """Each broken field is named in the error, of the class the caller asked for."""
    with pytest.raises(InvalidVectors, match=message):
        codec.unpack_array(frame, field="vectors", error=InvalidVectors)


def test_dtype_and_ndim_constraints() -> None:
    """Callers can pin the dtype and the number of dimensions."""
    with pytest.raises(InvalidParameter, match="must be one of"):
        codec.unpack_array(GOOD, dtypes=frozenset({"<i8"}))
    with pytest.raises(InvalidParameter, match="must be 1-D"):
        codec.unpack_array(GOOD, ndim=1)


def test_size_cap_is_payload_too_large_even_when_the_shape_lies() -> None:
    """The cap applies to the announced size and to the bytes actually sent."""
    with pytest.raises(PayloadTooLarge):
        codec.unpack_array(GOOD, max_bytes=23)
    with pytest.raises(PayloadTooLarge):
        codec.unpack_array({**GOOD, "shape": [1, 1], "data": b"\0" * 100}, max_bytes=50)


def test_loads_rejects_garbage_and_oversized_messages() -> None:
    """Not-msgpack is InvalidParameter; above the cap is PayloadTooLarge."""
    with pytest.raises(InvalidParameter):
        codec.loads(b"\xc1")
    with pytest.raises(PayloadTooLarge):
        codec.loads(codec.dumps({"a": b"x" * 100}), max_bytes=10)


@given(st.binary(max_size=64))
def test_loads_never_raises_anything_but_named_errors(data: bytes) -> None:
    """Arbitrary bytes fail with InvalidParameter only; what decodes re-encodes stably."""
    try:
        obj = codec.loads(data)
    except InvalidParameter:
        return
    assert codec.dumps(codec.loads(codec.dumps(obj))) == codec.dumps(obj)
