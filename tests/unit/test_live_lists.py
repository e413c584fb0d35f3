"""IVF-Flat lists changed in place by upserts and deletes (faissq/index/live.py)."""

from __future__ import annotations

import threading
from dataclasses import replace

import faiss
import numpy as np
import pytest

from faissq.config import IndexSettings
from faissq.index.engine import Engine
from faissq.index.live import CHUNK

DIM = 16


def _corpus(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """n rows around 20 centres, and the centres."""
    centers = rng.standard_normal((20, DIM)).astype(np.float32) * 4
    x = centers[rng.integers(0, 20, n)] + rng.standard_normal((n, DIM))
    return x.astype(np.float32), centers


def _engine(metric: str = "l2", **kw: object) -> Engine:
    return Engine(DIM, IndexSettings(metric=metric, merge_delta_max=10**6, **kw), "live")


def _exact(eng: Engine, xq: np.ndarray, k: int) -> np.ndarray:
    """Exact top-k scores over the live rows as the state records them (raw store + delta)."""
    _, vecs = eng.state.live_vectors()
    metric = faiss.METRIC_L2
    if eng.metric == "cosine":  # the stored rows are normalised; so is a query searched
        xq, metric = xq / np.linalg.norm(xq, axis=1, keepdims=True), faiss.METRIC_INNER_PRODUCT
    return faiss.knn(xq, np.ascontiguousarray(vecs), k, metric=metric)[0]


def _check_lists_hold_the_live_rows(eng: Engine, xq: np.ndarray) -> None:
    """The lists hold exactly the live rows: as many, each id's stored vector, and a search of
    every list is the exact top-k over the live rows."""
    st = eng.state
    assert st.primary is not None and st.primary.live is not None
    ivf = st.primary.live.ivf
    assert ivf.ntotal == st.ntotal
    live_ids = st.live_ids()
    sample = live_ids[:: max(1, live_ids.size // 50)]
    _, stored = st.vectors_of(sample)
    for i, v in zip(sample.tolist(), stored, strict=True):
        np.testing.assert_allclose(ivf.reconstruct(i), v, rtol=1e-6, atol=1e-6)
    nlist = st.primary.shape.nlist
    got = eng.search(xq, 10, nprobe=nlist)
    np.testing.assert_allclose(got.scores, _exact(eng, xq, 10), rtol=1e-4, atol=1e-3)
    for row in got.ids:
        found = row[row != -1]
        assert found.size == np.unique(found).size
        assert st.contains(found).all()


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_upserts_and_deletes_change_the_lists_in_place(metric: str) -> None:
    """Under an IVF-Flat primary every upsert and delete goes into its lists at once (the
    delta and tombstones are only recorded beside them), through replacements of one id
    several times, deletes of absent ids, new ids and merges: the lists then hold exactly the
    live rows, so a search under writes is one FAISS call answering as the merged index."""
    rng = np.random.default_rng(21)
    x, centers = _corpus(rng, 3000)
    eng = _engine(metric)
    eng.build(x, np.arange(3000), family="ivf_flat")
    xq = np.concatenate([x[:8], centers[:4]]).astype(np.float32)
    for step in range(30):
        ids = rng.choice(3400, size=int(rng.integers(1, 60)), replace=False).astype(np.int64)
        new = centers[rng.integers(0, 20, ids.size)] + rng.standard_normal((ids.size, DIM))
        eng.upsert(ids, new.astype(np.float32))
        eng.upsert(ids[:3], new[:3].astype(np.float32) + 1)  # the same ids again
        eng.delete(rng.choice(3600, size=20, replace=False))  # some absent, some in the delta
        if step % 10 == 4:
            before = eng.state.primary
            eng.merge()  # the raw store is rewritten; the lists are the same object
            after = eng.state.primary
            assert before is not None and after is not None and after.live is before.live
            assert len(eng.state.delta) == 0 and eng.state.tombstones.size == 0
        _check_lists_hold_the_live_rows(eng, xq)
    assert len(eng.state.delta) and eng.state.tombstones.size  # recorded beside the lists


def test_batches_past_one_chunk_of_the_lock_go_in_whole() -> None:
    """An upsert or delete of more rows than one hold of the lock changes (CHUNK) goes in
    chunk by chunk, and in the end the lists hold the live rows as after a small batch."""
    rng = np.random.default_rng(26)
    x, centers = _corpus(rng, 3000)
    eng = _engine()
    eng.build(x, np.arange(3000), family="ivf_flat")
    n = 2 * CHUNK + 17
    ids = np.arange(1000, 1000 + n)  # 2,000 replaced, the rest new
    eng.upsert(ids, (centers[rng.integers(0, 20, n)] + rng.standard_normal((n, DIM))).astype("f4"))
    _check_lists_hold_the_live_rows(eng, x[:5])
    gone = np.arange(0, n + 3000, 2)  # past one chunk too
    eng.delete(gone)
    assert not eng.contains(gone).any()
    _check_lists_hold_the_live_rows(eng, x[1:6])


def test_a_search_beside_the_writer_sees_each_id_once() -> None:
    """A thread searching while another upserts and deletes (the worker's RPC thread and its
    task thread): the lists only change under their lock, so no search fails or returns an id
    twice (a replaced row's old and new copy) or one never upserted, and the lists end as the
    live rows (ids upserted and deleted again meanwhile gone)."""
    rng = np.random.default_rng(22)
    x, centers = _corpus(rng, 4000)
    eng = _engine()
    eng.build(x, np.arange(4000), family="ivf_flat")
    done = threading.Event()
    problems: list[str] = []
    searches = 0

    def search() -> None:
        nonlocal searches
        q = np.random.default_rng(1)
        while not done.is_set():
            xq = x[q.integers(0, 4000, size=int(q.integers(1, 5)))]
            try:
                got = eng.search(xq, 20, nprobe=4)
            except Exception as exc:
                problems.append(repr(exc))
                return
            for row in got.ids:
                found = row[row != -1]
                if found.size != np.unique(found).size:
                    problems.append(f"an id twice: {row.tolist()}")
                if (found >= 10_005).any():
                    problems.append(f"an id never upserted: {row.tolist()}")
            searches += 1

    reader = threading.Thread(target=search)
    reader.start()
    try:
        for _ in range(200):
            ids = rng.choice(4000, 50, replace=False).astype(np.int64)
            new = centers[rng.integers(0, 20, 50)] + rng.standard_normal((50, DIM))
            eng.upsert(ids, new.astype(np.float32))
            eng.upsert(np.arange(10_000, 10_005), x[:5])  # always deleted again at once
            eng.delete(np.arange(10_000, 10_005))
    finally:
        done.set()
        reader.join()
    assert not problems, problems[:3]
    assert searches > 0
    _check_lists_hold_the_live_rows(eng, x[:6])


def test_a_range_and_a_filtered_search_read_the_lists_alone() -> None:
    """Range and filtered searches of live lists do not add the delta again (its rows are in
    the lists) nor return a deleted id: each equals the exact answer over the live rows."""
    rng = np.random.default_rng(23)
    x, _ = _corpus(rng, 2000)
    eng = _engine()
    eng.build(x, np.arange(2000), family="ivf_flat")
    eng.upsert(np.arange(0, 200), x[1000:1200] + 0.01)
    eng.upsert(np.arange(5000, 5100), x[:100] + 0.02)
    eng.delete(np.arange(1000, 1100))
    nlist = eng.state.primary.shape.nlist  # type: ignore[union-attr]
    query = x[1000:1001]
    ids, vecs = eng.state.live_vectors()
    dist = ((vecs - query) ** 2).sum(1)
    radius = float(np.sort(dist)[30])
    _, got = eng.range_search(query, radius, nprobe=nlist)
    assert sorted(got[0].tolist()) == sorted(ids[dist < radius].tolist())
    allow = np.arange(0, 6000, 3)
    res = eng.search(query, 10, nprobe=nlist, allow_ids=allow, deny_ids=np.arange(0, 60))
    keep = np.isin(ids, allow) & (ids >= 60)
    best = ids[keep][np.argsort(dist[keep], kind="stable")[:10]]
    np.testing.assert_allclose(np.sort(res.scores[0]), np.sort(dist[np.isin(ids, best)]), rtol=1e-4)


def test_a_snapshot_merges_first_and_a_restored_engine_answers_the_same() -> None:
    """Exporting live lists merges first (a saved index holds its raw store's rows alone); the
    index's bytes read back (with its id hash) make an engine that answers the same and keeps
    changing its lists in place. A snapshot written without live lists holds its delta and
    tombstones apart: they are put into the lists at load."""
    rng = np.random.default_rng(24)
    x, centers = _corpus(rng, 2000)
    xq = x[:10]
    for live_before in (True, False):
        eng = _engine(live_lists=live_before)
        eng.build(x, np.arange(2000), family="ivf_flat")
        eng.upsert(np.arange(100, 300), (centers[rng.integers(0, 20, 200)] + 0.5).astype("f4"))
        eng.delete(np.arange(300, 400))
        want = eng.search(xq, 10, nprobe=3)
        exp = eng.export()
        assert (len(exp.delta_ids) == 0) == live_before
        assert exp.index.ntotal == exp.primary_ids.size
        exp = replace(exp, index=faiss.deserialize_index(faiss.serialize_index(exp.index)))
        back = Engine.from_export(exp, IndexSettings(merge_delta_max=10**6), "live", version=9)
        got = back.search(xq, 10, nprobe=3)
        np.testing.assert_allclose(got.scores, want.scores, rtol=1e-4, atol=1e-4)
        _check_lists_hold_the_live_rows(back, xq)
        back.upsert(np.array([7000]), x[:1] + 0.001)
        assert back.search(x[:1] + 0.001, 1, nprobe=1).ids[0, 0] == 7000


def test_only_ivf_flat_on_the_cpu_changes_its_lists_in_place() -> None:
    """An HNSW primary, or live_lists off, keeps the delta and tombstones apart."""
    rng = np.random.default_rng(25)
    x, _ = _corpus(rng, 1000)
    hnsw = _engine()
    hnsw.build(x, np.arange(1000), family="hnsw")
    off = _engine(live_lists=False)
    off.build(x, np.arange(1000), family="ivf_flat")
    for eng in (hnsw, off):
        assert eng.state.primary is not None and eng.state.primary.live is None
        eng.upsert(np.arange(5), x[5:10])
        assert eng.state.primary.index.ntotal == 1000  # the delta stays apart
