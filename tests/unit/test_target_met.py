"""A per-request target_recall above autotune's reachable maximum answers with target_met false."""

from __future__ import annotations

import numpy as np
import pytest
from engine_support import data

from faissq.config import IndexSettings
from faissq.index import tuning
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


@pytest.mark.parametrize(
    ("named", "target", "want"),
    [
        ({}, 0.9, True),
        ({"nprobe": 3}, 0.9, True),  # the row's own value: the row is what ran
        ({"nprobe": 1}, 0.9, None),  # another nprobe: the row's verdict does not apply
        ({"k_factor": 2}, 0.9, None),
        ({"ef_search": 8}, 0.9, True),  # IVF reads no efSearch: the row still ran
        ({}, 0.9999, False),  # unreachable: the best row ran and misses it
        ({"nprobe": 64}, 0.9999, None),
        ({"nprobe": 1}, None, None),
    ],
)
def test_target_met_is_told_only_when_the_tuned_row_ran(
    named: dict[str, int], target: float | None, want: bool | None
) -> None:
    eng = Engine(16, IndexSettings(family="ivf_flat"))
    eng.build(data(2_000, 16), np.arange(2_000))
    table = [
        {"nprobe": 1, "k_factor": 1, "recall": 0.7, "recall_lo": 0.65, "ms_per_query": 0.01},
        {"nprobe": 3, "k_factor": 1, "recall": 0.95, "recall_lo": 0.93, "ms_per_query": 0.02},
    ]
    eng.set_tuning(tuning.profile(table, 0.9, 5, "nprobe"))
    assert eng.search(data(3, 16, seed=3), 5, target_recall=target, **named).target_met is want
    req = _request("a", data(3, 16, seed=3), target)
    for name, value in named.items():
        setattr(req, name, value)
    (out,) = search_all(eng, [req])
    assert out.target_met is want
