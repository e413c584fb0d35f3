"""A per-request target_recall above autotune's reachable maximum answers with target_met false."""

from __future__ import annotations

import numpy as np
from engine_support import data

from faissq.config import IndexSettings
from faissq.index.engine import Engine
from faissq.rpc import replies
from faissq.rpc.batch import search_all
from faissq.rpc.protocol import Request


def _request(rid: str, queries: np.ndarray, target: float | None) -> Request:
    return Request(id=rid, reply=f"r:{rid}", deadline=0.0, k=5, queries=queries,
                   target_recall=target)  # fmt: skip


def test_target_met_travels_from_the_engine_to_the_decoded_reply() -> None:
    eng = Engine(16, IndexSettings(family="ivf_pq", pq_bytes=2, opq=False))
    eng.build(data(6_000, 16), np.arange(6_000))
    eng.autotune(target_recall=0.5, num_queries=200)
    xq = data(4, 16, seed=2)
    reqs = [_request("a", xq[:2], 0.9999), _request("b", xq[2:], 0.9999), _request("c", xq, None)]
    outcomes = {o.request.id: o for o in search_all(eng, reqs)}
    assert outcomes["a"].target_met is False and outcomes["b"].target_met is False
    assert outcomes["c"].target_met is None
    for rid, want in (("a", False), ("c", None)):
        o = outcomes[rid]
        assert o.scores is not None and o.ids is not None
        raw = replies.encode_result(rid, o.scores, o.ids, o.version, "w", {}, o.target_met)
        assert replies.decode_reply(raw).target_met is want
