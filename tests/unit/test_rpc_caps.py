"""Request caps, hostile shapes, oversized and cut-short messages, and parameter fallbacks."""

from __future__ import annotations

import time
from typing import Any

import msgpack
import numpy as np
import pytest
from pydantic import ValidationError

from faissq.config import IndexSettings, Settings
from faissq.index import tuning
from faissq.index.engine import Engine
from faissq.rpc import protocol
from faissq.rpc.batch import search_all

PREFIX = "faissq:idx:reply:"
LIMITS = protocol.Limits(
    reply_prefix=PREFIX,
    max_bytes=1 << 20,
    max_k=1024,
    max_filter_ids=50,
    max_nprobe=10,
    max_ef_search=20,
    max_k_factor=8,
    max_candidates=4096,
    default_k_factor=4,
)


def request(**fields: Any) -> dict[str, Any]:
    """A valid request map of two 4-D query rows, with fields replaced."""
    q = np.ones((2, 4), "<f4")
    msg: dict[str, Any] = {
        "v": 1,
        "id": "r1",
        "reply": PREFIX + "r1",
        "deadline": time.time() + 5,
        "k": 3,
        "queries": {"dtype": "<f4", "shape": [2, 4], "data": q.tobytes()},
    }
    msg.update(fields)
    return msg


def outcome(raw: bytes) -> tuple[str, str]:
    """("ok", id), ("bad", code) or ("unreadable", "") for a raw message."""
    try:
        req = protocol.decode_request(raw, LIMITS)
    except protocol.BadRequest as bad:
        assert bad.reply == PREFIX + "r1"
        return "bad", bad.error.code
    except protocol.Unreadable:
        return "unreadable", ""
    return "ok", req.id


@pytest.mark.parametrize(
    ("fields", "want"),
    [
        ({"nprobe": 10, "ef_search": 20, "k_factor": 8, "k": 256}, ("ok", "r1")),  # at every cap
        ({"nprobe": 11}, ("bad", "invalid_parameter")),
        ({"ef_search": 21}, ("bad", "invalid_parameter")),
        ({"k_factor": 9}, ("bad", "invalid_parameter")),
        ({"k_factor": 2**64 - 1}, ("bad", "invalid_parameter")),
        ({"k": 513}, ("bad", "payload_too_large")),  # 2 rows x 513 x the default 4 > 4096
        ({"k": 1024, "k_factor": 3}, ("bad", "payload_too_large")),
        ({"k": 1024, "k_factor": 2}, ("ok", "r1")),  # exactly the cap
        ({"k": 1024, "k_factor": 1}, ("ok", "r1")),
    ],
)
def test_knobs_and_work_are_capped(fields: dict[str, Any], want: tuple[str, str]) -> None:
    assert outcome(msgpack.packb(request(**fields))) == want


@pytest.mark.parametrize(
    "shape", [[2**62, 0], [0, 2**62], [2**64 - 1, 0], [2**40, 2**40, 0], [2**49, 1]]
)
def test_shapes_no_array_can_take_are_invalid_vectors(shape: list[int]) -> None:
    msg = request(queries={"dtype": "<f4", "shape": shape, "data": b""})
    assert outcome(msgpack.packb(msg)) == ("bad", "invalid_vectors")


@pytest.mark.parametrize("where", ["first", "last"])
def test_an_oversized_message_is_answered_on_its_reply_key(where: str) -> None:
    msg = request()
    pad = {"pad": b"\0" * (LIMITS.max_bytes + 1)}
    ordered = {**msg, **pad} if where == "first" else {**pad, **msg}
    assert outcome(msgpack.packb(ordered)) == ("bad", "payload_too_large")
    with pytest.raises(protocol.BadRequest) as info:
        protocol.decode_request(msgpack.packb(ordered), LIMITS)
    assert info.value.request_id == "r1"


def test_an_oversized_message_without_a_readable_reply_key_is_unreadable() -> None:
    big = b"\0" * (LIMITS.max_bytes + 1)
    filler = {f"f{i}": 0 for i in range(protocol.PEEK_ENTRIES)}
    for raw in (
        msgpack.packb({"id": "r1", "pad": big}),
        msgpack.packb({**filler, "pad": big, "reply": PREFIX + "r1"}),  # past the entries read
        msgpack.packb([PREFIX + "r1", big]),
        b"\xc1" + big,
    ):
        assert outcome(raw) == ("unreadable", "")


def test_a_message_cut_short_after_its_reply_key_is_answered() -> None:
    msg = request()
    raw = msgpack.packb({"reply": msg.pop("reply"), **msg})
    for cut in (1, 5, 20):
        assert outcome(raw[:-cut]) == ("bad", "invalid_parameter")


def _req(rows: int, k: int = 64, k_factor: int | None = None) -> protocol.Request:
    q = np.random.default_rng(rows).standard_normal((rows, 8)).astype(np.float32)
    return protocol.Request(
        id="x", reply=PREFIX + "x", deadline=0.0, k=k, queries=q, k_factor=k_factor
    )


def test_batched_calls_stay_under_the_candidates_cap() -> None:
    eng = Engine(8, IndexSettings(family="flat"))
    eng.build(np.random.default_rng(0).standard_normal((500, 8)).astype(np.float32), np.arange(500))
    reqs = [_req(n) for n in (4, 4, 8, 1, 16, 2)]  # 35 rows x 64 x 4 candidates in all
    calls: list[int] = []
    outs = search_all(eng, reqs, calls, max_candidates=16 * 64 * 4, default_k_factor=4)
    assert calls == [3, 1, 1, 1]  # in order, 16 rows at most: [4, 4, 8], [1], [16], [2]
    for out in outs:
        want = eng.search(out.request.queries, 64)
        assert out.ids is not None
        np.testing.assert_array_equal(out.ids, want.ids)


@pytest.mark.parametrize("named", [{"k_factor": 4}, {"k_factor": 1}, {"ef_search": 32}])
def test_naming_one_parameter_leaves_the_others_at_their_defaults(named: dict[str, Any]) -> None:
    rng = np.random.default_rng(1)
    eng = Engine(16, IndexSettings(family="ivf_flat", default_nprobe=16))
    eng.build(rng.standard_normal((4000, 16)).astype(np.float32), np.arange(4000))
    q = rng.standard_normal((20, 16)).astype(np.float32)
    np.testing.assert_array_equal(eng.search(q, 10, **named).ids, eng.search(q, 10).ids)
    assert not np.array_equal(eng.search(q, 10, nprobe=1).ids, eng.search(q, 10).ids)


def _tuned(family: str, setting: dict[str, int], **cfg: Any) -> Engine:
    """An engine over 4000 x 8 vectors whose installed autotune profile chose `setting`."""
    rng = np.random.default_rng(1)
    eng = Engine(8, IndexSettings(family=family, **cfg))
    eng.build(rng.standard_normal((4000, 8)).astype(np.float32), np.arange(4000))
    table = [{**setting, "recall": 0.99, "recall_lo": 0.98, "ms_per_query": 0.01}]
    eng.set_tuning(tuning.profile(table, 0.95, 10, "nprobe"))
    return eng


def test_the_tuned_k_factor_counts_against_the_candidates_cap() -> None:
    eng = _tuned("ivf_pq_refine", {"nprobe": 4, "k_factor": 8}, pq_bytes=4, opq=False, k_factor=4)
    cap = 4 * 64 * 4  # 4 rows x k 64 at the index's k_factor: what the decoder lets through
    (out,) = search_all(eng, [_req(4)], max_candidates=cap, default_k_factor=4)
    assert out.error is not None and out.error[0] == "payload_too_large"
    assert "k_factor 8" in out.error[1]
    (out,) = search_all(eng, [_req(4)], max_candidates=2 * cap, default_k_factor=4)
    assert out.error is None and out.ids is not None
    np.testing.assert_array_equal(out.ids, eng.search(out.request.queries, 64).ids)
    named = search_all(eng, [_req(4, k_factor=4)], max_candidates=cap, default_k_factor=4)
    assert named[0].error is None  # a named k_factor is the one counted


def test_batched_calls_count_the_tuned_k_factor() -> None:
    eng = _tuned("ivf_pq_refine", {"nprobe": 4, "k_factor": 8}, pq_bytes=4, opq=False, k_factor=4)
    reqs = [_req(n) for n in (4, 4, 8, 1, 16, 2)]
    calls: list[int] = []
    outs = search_all(eng, reqs, calls, max_candidates=16 * 64 * 8, default_k_factor=4)
    assert calls == [3, 1, 1, 1]  # 16 rows at most at k_factor 8, not 32 at the index's 4
    assert all(o.error is None for o in outs)


def test_index_k_factor_is_bounded_by_the_requests_cap() -> None:
    with pytest.raises(ValidationError, match="max_k_factor"):
        Settings(index={"k_factor": 33})
    with pytest.raises(ValidationError, match="max_k_factor"):
        Settings(index={"k_factor": 9}, rpc={"max_k_factor": 8})
    assert Settings(index={"k_factor": 8}, rpc={"max_k_factor": 8}).index.k_factor == 8


@pytest.mark.parametrize("named", [{"k_factor": 4}, {"k_factor": 1}])
def test_naming_one_parameter_keeps_the_tuned_others(named: dict[str, Any]) -> None:
    eng = _tuned("ivf_flat", {"nprobe": 3, "k_factor": 1}, default_nprobe=16)
    q = np.random.default_rng(2).standard_normal((20, 8)).astype(np.float32)
    req = protocol.Request(id="x", reply=PREFIX + "x", deadline=0.0, k=10, queries=q, **named)
    (out,) = search_all(eng, [req])
    tuned = eng.search(q, 10, nprobe=3).ids
    np.testing.assert_array_equal(out.ids, tuned)
    np.testing.assert_array_equal(eng.search(q, 10, **named).ids, tuned)
    assert not np.array_equal(tuned, eng.search(q, 10, nprobe=16).ids)  # not the default
    assert not np.array_equal(tuned, eng.search(q, 10, nprobe=1).ids)  # nor FAISS's 1
