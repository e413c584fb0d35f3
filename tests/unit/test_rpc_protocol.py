"""The RPC wire format without Redis: encode/decode, malformed fields, error codes, batching."""

from __future__ import annotations

import os
import time
from typing import Any

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from redis.connection import Connection

from faissq import errors
from faissq.config import IndexSettings, RpcSettings
from faissq.index.engine import Engine
from faissq.rpc import protocol, replies, resp
from faissq.rpc.batch import search_all
from faissq.rpc.search_client import RequestBuilder, as_queries, remote_error

PREFIX = "faissq:idx:reply:"
LIMITS = protocol.Limits(reply_prefix=PREFIX, max_bytes=1 << 20, max_k=100, max_filter_ids=50)


def frame(a: np.ndarray) -> dict[str, Any]:
    """A frame written by hand, as a client in another language would."""
    return {"dtype": a.dtype.str, "shape": list(a.shape), "data": a.tobytes()}


def request(**overrides: Any) -> dict[str, Any]:
    """A valid request map, with fields replaced or removed (value ...) as asked."""
    msg: dict[str, Any] = {
        "v": 1,
        "id": "r1",
        "reply": PREFIX + "r1",
        "deadline": time.time() + 5,
        "k": 3,
        "queries": frame(np.ones((2, 4), dtype="<f4")),
    }
    msg.update(overrides)
    return {k: v for k, v in msg.items() if v is not ...}


def decode(msg: Any) -> protocol.Request:
    """Decode a map the way the worker does."""
    return protocol.decode_request(msgpack.packb(msg, use_bin_type=True), LIMITS)


def test_request_round_trip_keeps_every_field() -> None:
    q = np.arange(12, dtype=np.float32).reshape(3, 4)
    raw = protocol.encode_request(
        "abc", PREFIX + "abc", 123.5, 7, q, nprobe=4, ef_search=9, k_factor=2,
        target_recall=0.9, allow_ids=np.array([1, 2]), deny_ids=np.array([3]), sent=120.0,
    )  # fmt: skip
    req = protocol.decode_request(raw, LIMITS)
    assert (req.id, req.reply, req.deadline, req.k) == ("abc", PREFIX + "abc", 123.5, 7)
    np.testing.assert_array_equal(req.queries, q)
    assert (req.nprobe, req.ef_search, req.k_factor, req.target_recall) == (4, 9, 2, 0.9)
    assert req.allow_ids is not None and req.allow_ids.tolist() == [1, 2]
    assert req.deny_ids is not None and req.deny_ids.tolist() == [3]
    assert req.sent == 120.0


def test_queries_travel_as_raw_little_endian_float32() -> None:
    q = np.array([[1.5, -2.0]], dtype=">f8")  # big-endian float64 in, <f4 bytes out
    msg = msgpack.unpackb(
        protocol.encode_request("a", PREFIX + "a", 1.0, 1, as_queries(q)), raw=False
    )
    assert msg["queries"] == {
        "dtype": "<f4",
        "shape": [1, 2],
        "data": np.array([1.5, -2.0], "<f4").tobytes(),
    }


@pytest.mark.parametrize(
    "raw",
    [
        b"\xc1",  # never valid msgpack
        msgpack.packb([1, 2, 3]),
        msgpack.packb({"v": 1}),
        msgpack.packb(request(reply="other:key")),
        msgpack.packb(request(reply=PREFIX)),
        msgpack.packb(request(reply=b"faissq:idx:reply:x")),
        msgpack.packb({1: 2}),
        b"\x00" * (2 << 20),  # over the byte cap
    ],
    # explicit ids: request() draws a fresh request id, and parallel runs need equal ids
    ids=[
        "not-msgpack",
        "a-list",
        "no-reply",
        "foreign-reply",
        "bare-prefix",
        "bytes-reply",
        "int-keys",
        "over-cap",
    ],
)
def test_requests_without_a_usable_reply_key_are_unreadable(raw: bytes) -> None:
    with pytest.raises(protocol.Unreadable):
        protocol.decode_request(raw, LIMITS)


@pytest.mark.parametrize(
    ("overrides", "code"),
    [
        ({"v": 2}, "invalid_parameter"),
        ({"v": ...}, "invalid_parameter"),
        ({"id": 5}, "invalid_parameter"),
        ({"id": "x" * 200}, "invalid_parameter"),
        ({"deadline": "soon"}, "invalid_parameter"),
        ({"deadline": float("nan")}, "invalid_parameter"),
        ({"k": 0}, "invalid_parameter"),
        ({"k": 101}, "invalid_parameter"),
        ({"k": True}, "invalid_parameter"),
        ({"k": 2.0}, "invalid_parameter"),
        ({"queries": ...}, "invalid_parameter"),
        ({"extra": 1}, "invalid_parameter"),
        ({"nprobe": 0}, "invalid_parameter"),
        ({"ef_search": "x"}, "invalid_parameter"),
        ({"k_factor": -1}, "invalid_parameter"),
        ({"target_recall": 1.5}, "invalid_parameter"),
        ({"target_recall": None}, None),
        ({"sent": "x"}, "invalid_parameter"),
        ({"queries": frame(np.ones((2, 4), "<f8"))}, "invalid_vectors"),
        ({"queries": frame(np.ones(4, "<f4"))}, "invalid_vectors"),
        ({"queries": frame(np.ones((0, 4), "<f4"))}, "invalid_vectors"),
        ({"queries": {"dtype": "<f4", "shape": [2, 4], "data": b"\0" * 31}}, "invalid_vectors"),
        ({"queries": {"dtype": "<f4", "shape": [2, 4], "data": "text"}}, "invalid_vectors"),
        ({"queries": {"dtype": "<f4", "shape": [1 << 30, 8], "data": b""}}, "payload_too_large"),
        ({"allow_ids": frame(np.arange(51, dtype="<i8"))}, "payload_too_large"),
        ({"allow_ids": frame(np.array([-1], "<i8"))}, "invalid_ids"),
        ({"deny_ids": frame(np.array([1], "<i4"))}, "invalid_ids"),
        ({"deny_ids": [1, 2]}, "invalid_ids"),
    ],
)  # fmt: skip
def test_malformed_fields_get_a_stable_code(overrides: dict[str, Any], code: str | None) -> None:
    if code is None:
        assert decode(request(**overrides)).target_recall is None
        return
    with pytest.raises(protocol.BadRequest) as info:
        decode(request(**overrides))
    assert info.value.error.code == code
    assert info.value.reply == PREFIX + "r1"


def test_a_bad_id_still_gets_an_answer_on_the_reply_key() -> None:
    with pytest.raises(protocol.BadRequest) as info:
        decode(request(id=None))
    assert (info.value.request_id, info.value.reply) == ("", PREFIX + "r1")


MSGPACK_INTS = st.integers(-(2**63), 2**64 - 1)
scalars = st.none() | st.booleans() | MSGPACK_INTS | st.floats() | st.text(max_size=8)
values = st.recursive(
    scalars | st.binary(max_size=16),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=12,
)
FIELDS = sorted(protocol.REQUIRED | protocol.OPTIONAL | {"bogus"})


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.one_of(
        st.binary(max_size=64).map(lambda b: ("raw", b)),
        st.dictionaries(st.sampled_from(FIELDS), values, max_size=8).map(lambda d: ("map", d)),
        st.tuples(st.sampled_from(FIELDS), values).map(lambda kv: ("field", kv)),
    )
)
def test_decode_never_raises_anything_but_its_two_outcomes(case: tuple[str, Any]) -> None:
    kind, value = case
    if kind == "raw":
        raw = value
    elif kind == "map":
        raw = msgpack.packb(value, use_bin_type=True)
    else:
        name, v = value
        raw = msgpack.packb(request(**{name: v}), use_bin_type=True)
    try:
        req = protocol.decode_request(raw, LIMITS)
    except protocol.Unreadable:
        return
    except protocol.BadRequest as bad:
        assert isinstance(bad.error, errors.PermanentError)
        assert bad.reply.startswith(PREFIX)
        return
    assert req.queries.dtype == np.float32 and req.queries.ndim == 2
    assert 1 <= req.k <= LIMITS.max_k


def test_reply_round_trips() -> None:
    scores = np.array([[0.5, 0.25]], np.float32)
    ids = np.array([[7, -1]], np.int64)
    raw = replies.encode_result("r", scores, ids, 3, "w1", {"search_ms": 0.1})
    reply = replies.decode_reply(raw)
    assert reply.ok and reply.version == 3 and reply.worker == "w1" and reply.id == "r"
    assert reply.scores is not None and reply.ids is not None
    np.testing.assert_array_equal(reply.scores, scores)
    np.testing.assert_array_equal(reply.ids, ids)
    err = replies.decode_reply(replies.encode_error("r", "busy", "full", "w1"))
    assert (err.ok, err.code, err.message) == (False, "busy", "full")
    with pytest.raises(errors.InvalidParameter):
        replies.decode_reply(b"\xc1")


@pytest.mark.parametrize(
    ("code", "cls"),
    [
        ("timeout", errors.SearchTimeout),
        ("busy", errors.IndexBusy),
        ("no_worker", errors.NoWorkerAlive),
        ("dimension_mismatch", errors.DimensionMismatch),
        ("invalid_parameter", errors.InvalidParameter),
        ("index_not_ready", errors.IndexNotReady),
        ("internal", errors.RemoteSearchError),
        ("something_new", errors.RemoteSearchError),
    ],
)
def test_wire_codes_map_to_the_error_tree(code: str, cls: type[Exception]) -> None:
    err = remote_error(code, "msg")
    assert type(err) is cls
    if isinstance(err, errors.RemoteSearchError):
        assert err.remote_code == code


def test_client_refuses_non_matrix_queries() -> None:
    assert as_queries([1.0, 2.0]).shape == (1, 2)
    with pytest.raises(errors.InvalidVectors):
        as_queries(np.ones((2, 2, 2)))
    with pytest.raises(errors.InvalidVectors):
        as_queries(np.array([["a"]]))


def _req(q: np.ndarray, k: int = 5, **kw: Any) -> protocol.Request:
    return protocol.Request(id="x", reply=PREFIX + "x", deadline=0.0, k=k, queries=q, **kw)


def test_batched_search_equals_one_search_per_request() -> None:
    rng = np.random.default_rng(0)
    eng = Engine(8, IndexSettings(family="flat"))
    eng.build(rng.standard_normal((500, 8)).astype(np.float32), np.arange(500))
    qs = [rng.standard_normal((n, 8)).astype(np.float32) for n in (1, 3, 1, 2)]
    reqs = [_req(q) for q in qs] + [_req(qs[0], k=2), _req(qs[1], allow_ids=np.arange(50))]
    calls: list[int] = []
    outs = search_all(eng, reqs, calls)
    assert sorted(calls) == [1, 1, 4]  # four requests with the same k share one call
    for out in outs:
        r = out.request
        want = eng.search(r.queries, r.k, allow_ids=r.allow_ids)
        assert out.error is None and out.ids is not None and out.scores is not None
        np.testing.assert_array_equal(out.ids, want.ids)
        np.testing.assert_allclose(out.scores, want.scores, rtol=1e-5, atol=1e-6)


def test_one_bad_request_never_fails_its_batch() -> None:
    eng = Engine(4, IndexSettings(family="flat", metric="l2"))
    eng.build(np.eye(4, dtype=np.float32), np.arange(4))
    good = np.ones((1, 4), np.float32)
    reqs = [_req(good, k=2), _req(np.ones((1, 3), np.float32), k=2), _req(good, k=2)]
    outs = {id(o.request): o for o in search_all(eng, reqs)}
    assert outs[id(reqs[1])].error is not None
    assert outs[id(reqs[1])].error[0] == "dimension_mismatch"  # type: ignore[index]
    assert all(outs[id(reqs[i])].error is None for i in (0, 2))


@pytest.mark.parametrize("metric", ["cosine", "l2"])
def test_nan_or_inf_queries_get_invalid_vectors_and_spare_their_batch(metric: str) -> None:
    # the engine owns this check (decode does not scan the floats twice)
    eng = Engine(4, IndexSettings(family="flat", metric=metric))
    eng.build(np.eye(4, dtype=np.float32), np.arange(4))
    good = np.ones((1, 4), np.float32)
    nan = np.array([[np.nan, 1, 1, 1]], np.float32)
    inf = np.array([[np.inf, 1, 1, 1]], np.float32)
    reqs = [_req(good, k=2), _req(nan, k=2), _req(good, k=2), _req(inf, k=2)]
    outs = {id(o.request): o for o in search_all(eng, reqs)}
    assert [outs[id(r)].error and outs[id(r)].error[0] for r in reqs] == [
        None, "invalid_vectors", None, "invalid_vectors"
    ]  # fmt: skip
    assert outs[id(reqs[0])].ids is not None and outs[id(reqs[0])].ids.shape == (1, 2)


def test_resp_pack_writes_the_bytes_redis_py_writes() -> None:
    commands = [
        ("EVAL", "return 1", 3, "q", "alive", "reply:ab", b"\x00\xff" * 5000, 30, "ab"),
        ("BRPOP", "reply:ab", 1.5),
        ("LPUSH", "k\u00e9y", b""),
        ("EXPIRE", "k\u00e9y", 30),
    ]
    want = b"".join(Connection().pack_commands(commands))
    assert resp.pack(commands) == [want]


def test_request_ids_are_unique_and_a_forked_child_draws_its_own() -> None:
    builder = RequestBuilder("ids", RpcSettings())
    ids = [builder.request_id() for _ in range(10_000)]
    assert len(set(ids)) == len(ids)
    assert all(0 < len(rid) <= protocol.MAX_ID_CHARS for rid in ids)
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: one id from the builder it inherited, then out
        os.write(write_end, builder.request_id().encode())
        os._exit(0)
    os.waitpid(pid, 0)
    child = os.read(read_end, 256).decode()
    os.close(read_end)
    os.close(write_end)
    assert child not in ids
    assert child[:20] != ids[0][:20]  # a fresh random prefix, not the parent's count going on
    assert RequestBuilder("ids", RpcSettings()).request_id()[:20] != ids[0][:20]
