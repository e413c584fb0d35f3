"""Attribute filters on the RPC without Redis: decoding and caps, batching by filter, merge keys,
the fetch reply's attributes."""

from __future__ import annotations

import time
from typing import Any

import msgpack
import numpy as np
import pytest
from engine_support import data

from faissq.config import IndexSettings
from faissq.errors import InvalidFilter, InvalidParameter
from faissq.index.engine import Engine
from faissq.rpc import protocol, replies
from faissq.rpc.batch import search_all
from faissq.rpc.coalesce import merge_key
from faissq.rpc.query_client import filter_value, search_options
from faissq.rpc.shard_plan import ShardPlan, resolve_map

PREFIX = "faissq:f:reply:"
LIMITS = protocol.Limits(reply_prefix=PREFIX, max_bytes=1 << 20, max_k=100, max_filter_ids=50,
                         max_filter_bytes=200)  # fmt: skip
TENANT_7 = {"field": "tenant", "eq": 7}


def request(rid: str = "r1", q: Any = None, **fields: Any) -> dict[str, Any]:
    """A top-k request map; fields override, and None drops one."""
    q = np.ones((1, 16), "<f4") if q is None else np.asarray(q, "<f4")
    msg: dict[str, Any] = {"v": 1, "id": rid, "reply": PREFIX + rid, "deadline": time.time() + 5,
                           "k": 5, "queries": {"dtype": "<f4", "shape": list(q.shape),
                                               "data": q.tobytes()}}  # fmt: skip
    msg.update(fields)
    return {name: value for name, value in msg.items() if value is not None}


def decode(msg: dict[str, Any]) -> protocol.Request:
    """Decode a request map the way the worker does."""
    return protocol.decode_request(msgpack.packb(msg, use_bin_type=True), LIMITS)


def code_of(msg: dict[str, Any]) -> str:
    """The error code a request map is answered with."""
    with pytest.raises(protocol.BadRequest) as bad:
        decode(msg)
    return bad.value.error.code


def test_a_filter_rides_on_top_k_and_range_requests_and_is_capped() -> None:
    assert decode(request(filter=TENANT_7)).filter == TENANT_7
    assert decode(request(k=None, radius=0.5, filter=TENANT_7)).filter == TENANT_7
    assert decode(request(filter=None)).filter is None
    assert code_of(request(filter=[TENANT_7])) == "invalid_filter"
    assert code_of(request(filter="tenant = 7")) == "invalid_filter"
    big = {"field": "lang", "in": ["x" * 50] * 4}  # 200+ bytes as msgpack: over this cap
    assert code_of(request(filter=big)) == "invalid_filter"
    assert code_of(request(k=None, radius=0.5, filter=big)) == "invalid_filter"
    one = {"dtype": "<i8", "shape": [1], "data": np.ones(1, "<i8").tobytes()}
    fetch = {"op": "fetch", "k": None, "queries": None, "filter": TENANT_7, "ids": one}
    assert code_of(request(**fetch)) == "invalid_parameter"


def engine() -> tuple[Engine, dict[str, Any]]:
    """An exact index of 2000 rows with a tenant and a lang field."""
    attrs = {"tenant": [i % 10 for i in range(2000)],
             "lang": [("en", "de", None)[i % 3] for i in range(2000)]}  # fmt: skip
    eng = Engine(16, IndexSettings(metric="l2", attributes={"tenant": "int64", "lang": "keyword"}))
    eng.build(data(2000, 16), np.arange(2000, dtype=np.int64), family="flat", attributes=attrs)
    return eng, attrs


def test_requests_share_an_engine_call_only_with_an_equal_filter_and_a_bad_one_fails_alone() -> (
    None
):
    eng, attrs = engine()
    q = data(6, 16, seed=3)
    same_a = {"and": [TENANT_7, {"field": "lang", "in": ["en", "de"]}]}
    same_b = {"and": [{"eq": 7, "field": "tenant"}, {"in": ["de", "en", "de"], "field": "lang"}]}
    flts: list[Any] = [same_a, same_b, TENANT_7, None, {"field": "colour", "eq": 1},
                       {"field": "tenant", "eq": "7"}]  # fmt: skip
    reqs = [decode(request(f"r{i}", q[i : i + 1], filter=f)) for i, f in enumerate(flts)]
    reqs.append(decode(request("allow", q[:1], filter=TENANT_7, allow_ids=frame([7, 17, 8]))))
    calls: list[int] = []
    out = {o.request.id: o for o in search_all(eng, reqs, calls)}
    assert sorted(calls) == [1, 1, 1, 2]  # same_a with same_b; TENANT_7; unfiltered; allow
    assert out["r4"].error is not None and out["r4"].error[0] == "invalid_filter"
    assert out["r5"].error is not None and out["r5"].error[0] == "invalid_filter"
    for i in range(4):
        want = eng.search(q[i : i + 1], 5, filter=flts[i]).ids
        assert out[f"r{i}"].ids.tolist() == want.tolist()
    tenant = np.asarray(attrs["tenant"])
    assert all(tenant[i] == 7 and attrs["lang"][i] for i in out["r0"].ids[0])
    assert sorted(out["allow"].ids[0].tolist()) == [-1, -1, -1, 7, 17]  # 8 is no tenant 7


def frame(ids: list[int]) -> dict[str, Any]:
    """An <i8 id frame written by hand."""
    a = np.asarray(ids, "<i8")
    return {"dtype": "<i8", "shape": [a.size], "data": a.tobytes()}


def test_merge_keys_are_equal_exactly_for_equal_filters() -> None:
    def key(flt: Any) -> Any:
        return merge_key(5, 16, {"nprobe": 4, "filter": filter_value(flt)})

    assert key({"field": "a", "eq": 1}) == key({"eq": 1, "field": "a"})
    assert key({"field": "a", "in": (1, 2)}) == key({"field": "a", "in": np.array([1, 2])})
    assert key({"field": "a", "eq": np.int64(1)}) == key({"field": "a", "eq": 1})
    assert key({"field": "a", "eq": 1}) != key({"field": "a", "eq": True})
    assert key({"field": "a", "eq": 1}) != key({"field": "a", "eq": 1.0})
    assert key({"field": "a", "eq": 1}) != key({"field": "a", "eq": "1"})
    assert key({"field": "a", "in": [1, 2]}) != key({"field": "a", "in": [[1, 2]]})
    assert key({"field": "a", "eq": 1}) != key(None) == merge_key(5, 16, {"nprobe": 4})
    for bad in ({1: 2}, {"field": "a", "eq": object()}, {"field": "a", "eq": b"x"}):
        with pytest.raises(InvalidFilter):
            filter_value(bad)


def test_fetch_replies_carry_attributes_per_found_id() -> None:
    ids = np.array([4, 9], np.int64)
    extra = {"vectors": np.zeros((2, 3), np.float32), "missing": np.array([1], np.int64),
             "attributes": {"tenant": [4, None], "lang": ["en", None]}}  # fmt: skip
    got = replies.decode_reply(replies.encode_result("r", None, ids, 3, "w", {}, extra=extra))
    assert got.attributes == {"tenant": [4, None], "lang": ["en", None]}
    del extra["attributes"]
    plain = replies.decode_reply(replies.encode_result("r", None, ids, 3, "w", {}, extra=extra))
    assert plain.attributes == {}
    extra["attributes"] = {"tenant": [4]}  # one value for two ids
    with pytest.raises(InvalidParameter):
        replies.decode_reply(replies.encode_result("r", None, ids, 3, "w", {}, extra=extra))


def test_the_sharded_clients_send_the_same_filter_to_every_shard() -> None:
    plan = ShardPlan("redis://127.0.0.1:1", resolve_map("s", None, 3, "l2"), False)
    flt = {"field": "tenant", "in": (np.int64(3), 4)}
    options = search_options(nprobe=None, ef_search=None, k_factor=None, target_recall=None,
                             allow_ids=None, deny_ids=None, filter=flt)  # fmt: skip
    fan = plan.prepare(data(2, 16), 5, 2, None, 1.0, options)
    sent = [msgpack.unpackb(p.commands[0][6], raw=False) for p in fan.prepared]
    assert [m["filter"] for m in sent] == [{"field": "tenant", "in": [3, 4]}] * 3
    assert {m["reply"].split("}")[0] for m in sent} == {f"faissq:{{s.s{i}of3" for i in range(3)}
