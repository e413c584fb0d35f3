"""Property-based invariants of search and merge over hypothesis-drawn mutation sequences."""

from __future__ import annotations

import numpy as np
from engine_support import exact
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from faissq.config import IndexSettings
from faissq.index.engine import Engine

DIM = 8
ops = st.lists(
    st.one_of(
        st.tuples(
            st.just("upsert"), st.lists(st.integers(0, 60), min_size=1, max_size=12, unique=True)
        ),
        st.tuples(st.just("delete"), st.lists(st.integers(0, 60), min_size=1, max_size=12)),
        st.tuples(st.just("merge"), st.just([])),
    ),
    min_size=1,
    max_size=12,
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    ops=ops,
    seed=st.integers(0, 2**16),
    k=st.integers(1, 12),
    metric=st.sampled_from(["cosine", "l2"]),
)
def test_flat_search_matches_a_model_after_any_mutation_sequence(
    ops: list[tuple[str, list[int]]], seed: int, k: int, metric: str
) -> None:
    rng = np.random.default_rng(seed)
    eng = Engine(DIM, IndexSettings(family="flat", metric=metric))  # type: ignore[arg-type]
    base_ids = np.arange(20, dtype=np.int64)
    base = rng.standard_normal((20, DIM)).astype(np.float32) + 0.1
    eng.build(base, base_ids)
    model = {int(i): base[n] for n, i in enumerate(base_ids)}
    deleted: set[int] = set()
    for op, ids in ops:
        if op == "upsert":
            vecs = rng.standard_normal((len(ids), DIM)).astype(np.float32) + 0.1
            eng.upsert(ids, vecs)
            model.update({i: vecs[n] for n, i in enumerate(ids)})
            deleted -= set(ids)
        elif op == "delete":
            eng.delete(ids)
            for i in ids:
                model.pop(i, None)
            deleted |= set(ids)
        else:
            if eng.ntotal:
                eng.merge()
    assert eng.ntotal == len(model)
    probe = np.array(sorted(set(range(61))), dtype=np.int64)
    assert eng.contains(probe).tolist() == [int(i) in model for i in probe]
    xq = rng.standard_normal((5, DIM)).astype(np.float32) + 0.1
    res = eng.search(xq, k)
    for row_ids, row_scores in zip(res.ids, res.scores, strict=True):
        found = row_ids[row_ids >= 0]
        assert len(set(found.tolist())) == found.size  # unique ids
        assert not (set(found.tolist()) & deleted - set(model))  # no tombstoned id
        assert found.size == min(k, len(model))
        valid = row_scores[row_ids >= 0]
        d = np.diff(valid)
        assert (d <= 1e-5).all() if metric == "cosine" else (d >= -1e-4).all()  # sorted
    if model:
        keys = np.array(sorted(model), dtype=np.int64)
        vecs = np.stack([model[int(i)] for i in keys])
        truth = exact(vecs, keys, xq, min(k, len(model)), metric)
        for row, t in zip(res.ids, truth, strict=True):
            assert np.intersect1d(row, t).size == t.size  # Flat recall is 1
