"""Decoding limits of range, fetch, offset and min_seq requests, and of their replies."""

from __future__ import annotations

import math
import time
from typing import Any

import msgpack
import numpy as np
import pytest

from faissq.errors import InvalidParameter
from faissq.rpc import protocol, replies

PREFIX = "faissq:t:reply:"
LIMITS = protocol.Limits(reply_prefix=PREFIX, max_bytes=1 << 20, max_k=100, max_filter_ids=50,
                         max_candidates=1000, max_fetch_ids=10)  # fmt: skip


def frame(a: np.ndarray) -> dict[str, Any]:
    """A frame written by hand."""
    return {"dtype": a.dtype.str, "shape": list(a.shape), "data": a.tobytes()}


def request(**fields: Any) -> dict[str, Any]:
    """A top-k request map; fields override, and None drops one."""
    msg: dict[str, Any] = {"v": 1, "id": "r1", "reply": PREFIX + "r1", "deadline": time.time() + 5,
                           "k": 5, "queries": frame(np.ones((2, 4), "<f4"))}  # fmt: skip
    msg.update(fields)
    return {name: value for name, value in msg.items() if value is not None}


def decode(msg: dict[str, Any]) -> protocol.Request:
    """Decode a request map."""
    return protocol.decode_request(msgpack.packb(msg, use_bin_type=True), LIMITS)


def code_of(msg: dict[str, Any]) -> str:
    """The error code a request map is answered with."""
    with pytest.raises(protocol.BadRequest) as bad:
        decode(msg)
    return bad.value.error.code


OVER_ROWS = frame(np.ones((1001, 1), "<f4"))  # one row more than max_candidates


def test_a_range_request_decodes() -> None:
    req = decode(request(k=None, radius=0.25, nprobe=3, min_seq=7))
    assert (req.kind, req.radius, req.nprobe, req.min_seq, req.k) == ("range", 0.25, 3, 7, 0)


@pytest.mark.parametrize(
    ("fields", "code"),
    [
        ({"radius": 0.5}, "invalid_parameter"),
        ({"k": None, "radius": math.nan}, "invalid_parameter"),
        ({"k": None, "radius": -math.inf}, "invalid_parameter"),
        ({"k": None, "radius": b"1"}, "invalid_parameter"),
        ({"k": None, "radius": 1, "k_factor": 2}, "invalid_parameter"),
        ({"k": None, "radius": 1, "nprobe": 0}, "invalid_parameter"),
        ({"k": None, "radius": 1, "queries": None}, "invalid_parameter"),
        (
            {"k": None, "radius": 1, "queries": frame(np.ones((1001, 1), "<f4"))},
            "payload_too_large",
        ),
        ({"k": None, "radius": 1, "queries": frame(np.ones((0, 4), "<f4"))}, "invalid_vectors"),
    ],
)
def test_range_request_limits(fields: dict[str, Any], code: str) -> None:
    assert code_of(request(**fields)) == code


def test_offset_decodes_and_is_bounded_by_max_k_and_the_candidates_cap() -> None:
    assert decode(request(k=5, offset=95)).offset == 95
    assert code_of(request(k=5, offset=96)) == "invalid_parameter"
    assert code_of(request(k=5, offset=-1)) == "invalid_parameter"
    assert code_of(request(k=5, offset=2**64 - 1)) == "invalid_parameter"
    # 2 rows x (95 + 5) x k_factor 4 = 800 fits; x k_factor 6 = 1200 does not
    assert decode(request(k=5, offset=95, k_factor=4)).k_factor == 4
    assert code_of(request(k=5, offset=95, k_factor=6)) == "payload_too_large"


def test_requests_with_different_offsets_never_share_a_batch() -> None:
    a, b = decode(request(k=10, offset=0)), decode(request(k=5, offset=5))
    assert a.params() != b.params()


@pytest.mark.parametrize("value", [-1, 2**63, 2**64 - 1, 1.0, "1", True, [1]])
def test_min_seq_limits(value: Any) -> None:
    assert code_of(request(min_seq=value)) == "invalid_parameter"
    assert decode(request(min_seq=2**63 - 1)).min_seq == 2**63 - 1


def fetch(**fields: Any) -> dict[str, Any]:
    """A fetch request map; fields override, and None drops one."""
    base: dict[str, Any] = {"k": None, "queries": None, "op": "fetch",
                            "ids": frame(np.arange(3, dtype="<i8"))}  # fmt: skip
    return request(**{**base, **fields})


def test_a_fetch_request_decodes() -> None:
    req = decode(fetch(min_seq=2))
    assert req.kind == "fetch" and req.fetch_ids is not None and req.fetch_ids.tolist() == [0, 1, 2]


@pytest.mark.parametrize(
    ("fields", "code"),
    [
        ({"ids": frame(np.arange(11, dtype="<i8"))}, "payload_too_large"),
        ({"ids": frame(np.array([-1], "<i8"))}, "invalid_ids"),
        ({"ids": frame(np.zeros(0, "<i8"))}, "invalid_ids"),
        ({"ids": frame(np.zeros(2, "<f4"))}, "invalid_ids"),
        ({"ids": {"dtype": "<i8", "shape": [2**40], "data": b""}}, "payload_too_large"),
        ({"ids": None}, "invalid_parameter"),
        ({"k": 3}, "invalid_parameter"),
        ({"op": "scan"}, "invalid_parameter"),
        ({"op": 1}, "invalid_parameter"),
    ],
)
def test_fetch_request_limits(fields: dict[str, Any], code: str) -> None:
    assert code_of(fetch(**fields)) == code


def test_range_and_fetch_replies_round_trip() -> None:
    lims = np.array([0, 2, 2, 3], np.int64)
    raw = replies.encode_result("r", np.arange(3, dtype=np.float32), np.arange(3, dtype=np.int64),
                                4, "w", {}, extra={"lims": lims, "truncated": True})  # fmt: skip
    got = replies.decode_reply(raw)
    assert got.lims is not None and got.lims.tolist() == [0, 2, 2, 3] and got.truncated
    raw = replies.encode_result("r", None, np.array([5], np.int64), 4, "w", {},
                                extra={"vectors": np.ones((1, 4), np.float32),
                                       "missing": np.array([6], np.int64)})  # fmt: skip
    got = replies.decode_reply(raw)
    assert got.vectors is not None and got.vectors.shape == (1, 4) and got.scores is None
    assert got.missing is not None and got.missing.tolist() == [6]


@pytest.mark.parametrize("lims", [[1, 3], [0, 2], [0, 3, 2, 3], []])
def test_a_range_reply_whose_lims_do_not_cut_its_results_is_refused(lims: list[int]) -> None:
    raw = replies.encode_result("r", np.arange(3, dtype=np.float32), np.arange(3, dtype=np.int64),
                                4, "w", {}, extra={"lims": np.array(lims, np.int64)})  # fmt: skip
    with pytest.raises(InvalidParameter):
        replies.decode_reply(raw)
