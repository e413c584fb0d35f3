"""The raw store: streamed to an unlinked file and memory-mapped; builds never copy ready input."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from engine_support import data

from faissq.config import IndexSettings
from faissq.errors import InvalidVectors
from faissq.index import builder, drift
from faissq.index.builder import _noop, merge_primary
from faissq.index.engine import Engine
from faissq.index.validate import as_vectors


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_build_streams_the_raw_store_to_an_unlinked_mapped_file(tmp_path: Path) -> None:
    xb = data(3_500, 16)
    ids = np.random.default_rng(0).permutation(3_500).astype(np.int64) * 5
    cfg = IndexSettings(family="ivf_flat", raw_dir=str(tmp_path), add_chunk=1_000)
    eng = Engine(16, cfg)
    phases: list[tuple[str, int, int]] = []
    eng.build(xb, ids, progress=lambda p, d, t: phases.append((p, d, t)))
    p = eng.state.primary
    assert p is not None and isinstance(p.vectors, np.memmap)
    assert list(tmp_path.iterdir()) == []  # nothing named on disk: a crash leaves nothing
    order = np.argsort(ids)
    assert np.array_equal(p.ids, ids[order])
    np.testing.assert_allclose(p.vectors, _unit(xb[order]), rtol=1e-6, atol=1e-6)
    adds = [d for ph, d, _ in phases if ph == "add"]
    assert adds == [0, 1_000, 2_000, 3_000, 3_500]
    assert eng.search(xb[:3], 1).ids[:, 0].tolist() == ids[:3].tolist()


class _Watched(np.ndarray):
    """A raw store that counts the rows read out of it."""

    rows_read = 0
    largest = 0  # rows of the largest single read

    def __getitem__(self, key: Any) -> Any:
        """The rows asked for, counted."""
        out = super().__getitem__(key)
        if isinstance(out, np.ndarray) and out.size:
            _Watched.rows_read += out.size // self.shape[-1]
            _Watched.largest = max(_Watched.largest, out.size // self.shape[-1])
        return out


def test_a_build_reads_nothing_back_from_its_mapped_store(monkeypatch: pytest.MonkeyPatch) -> None:
    """Gathering rows of the mapping (the drift baseline once did) makes the whole store
    resident: the build's peak memory then doubles. Everything comes from the caller's rows."""
    finish = builder.RawStore.finish
    monkeypatch.setattr(builder.RawStore, "finish", lambda self: finish(self).view(_Watched))
    _Watched.rows_read = 0
    xb = data(6_000, 16)
    eng = Engine(16, IndexSettings(family="ivf_flat", add_chunk=1_000))
    eng.build(xb, np.arange(6_000))
    p = eng.state.primary
    assert p is not None and isinstance(p.vectors, _Watched)
    assert _Watched.rows_read == 0
    # the baseline from the caller's rows equals one over the stored rows (the same vectors)
    whole = drift.baseline(p.index, np.asarray(p.vectors).copy(), 1)
    assert p.plan.centroid_dist == pytest.approx(whole, rel=0.03) and whole > 0
    # and it gathers its sample a bounded batch at a time: the index is at its largest then
    _Watched.rows_read = _Watched.largest = 0
    assert drift.baseline(p.index, xb.view(_Watched), 0) > 0
    assert _Watched.rows_read == drift.SAMPLE and 0 < _Watched.largest <= drift.BATCH


def test_merge_rewrites_the_mapped_store_in_id_order(tmp_path: Path) -> None:
    xb = data(2_000, 16)
    eng = Engine(16, IndexSettings(family="ivf_flat", raw_dir=str(tmp_path)))
    eng.build(xb, np.arange(2_000) * 2)
    new = data(10, 16, seed=8)
    eng.upsert(np.arange(10) * 2 + 1, new)
    eng.delete([0, 2])
    eng.merge()
    p = eng.state.primary
    assert p is not None and isinstance(p.vectors, np.memmap)
    assert p.ids.size == 2_008 and bool(np.all(np.diff(p.ids) > 0))
    row = int(np.searchsorted(p.ids, 5))  # id 5: the third upserted vector
    np.testing.assert_allclose(p.vectors[row], _unit(new[2:3])[0], rtol=1e-6)
    row = int(np.searchsorted(p.ids, 8))  # id 8: stored row 4
    np.testing.assert_allclose(p.vectors[row], _unit(xb[4:5])[0], rtol=1e-6)


def test_a_bad_row_in_a_late_chunk_fails_the_build_before_training() -> None:
    xb = data(2_000, 16)
    xb[1_700, 3] = np.nan
    eng = Engine(16, IndexSettings(family="ivf_flat", add_chunk=500))
    phases: list[str] = []
    with pytest.raises(InvalidVectors, match="NaN"):
        eng.build(xb, np.arange(2_000), progress=lambda p, d, t: phases.append(p))
    assert "store" in phases and "train" not in phases and eng.state.primary is None


def test_ready_input_is_used_as_it_is_and_anything_else_copied() -> None:
    ready = np.ascontiguousarray(_unit(data(100, 8)), dtype=np.float32)
    assert as_vectors(ready, 8, "cosine", copy=False) is ready
    assert as_vectors(ready, 8, "cosine") is not ready
    raw = data(100, 8)
    out = as_vectors(raw, 8, "cosine", copy=False)
    assert out is not raw and np.allclose(np.linalg.norm(out, axis=1), 1)
    assert as_vectors(raw, 8, "l2", copy=False) is raw
    raw[0, 0] = np.inf
    with pytest.raises(InvalidVectors):
        as_vectors(raw, 8, "l2", copy=False)


@pytest.mark.parametrize("chunk", [7, 65_536])
def test_merged_store_holds_every_live_row_in_id_order(chunk: int) -> None:
    """Replaced, new and deleted ids across chunk edges: each stored row is the live vector."""
    rng = np.random.default_rng(3)
    eng = Engine(8, IndexSettings(family="ivf_flat"))
    ids = rng.permutation(600).astype(np.int64) * 3
    eng.build(data(600, 8), ids)
    model = dict(zip(ids.tolist(), as_vectors(data(600, 8), 8, "cosine"), strict=True))
    st = eng.state
    up = np.concatenate([rng.choice(ids, 50, replace=False), rng.choice(2_000, 40) * 3 + 1])
    up = np.unique(up)[rng.permutation(np.unique(up).size)]
    gone = rng.choice(ids, 30, replace=False)
    eng.upsert(up, data(up.size, 8, seed=5))
    eng.delete(gone)
    model.update(zip(up.tolist(), as_vectors(data(up.size, 8, seed=5), 8, "cosine"), strict=True))
    for i in gone.tolist():
        model.pop(i, None)
    st = eng.state
    assert st.primary is not None
    p = merge_primary(st.primary, st.tombstones, st.delta.ids, st.delta.vectors, _noop,
                      chunk=chunk)  # fmt: skip
    want = np.array(sorted(model), dtype=np.int64)
    assert np.array_equal(p.ids, want)
    np.testing.assert_array_equal(np.asarray(p.vectors), np.stack([model[i] for i in want]))


def test_a_merge_after_every_primary_row_is_deleted_keeps_the_delta_alone() -> None:
    """All primary ids deleted, then new ids: the merged store holds the new rows only."""
    eng = Engine(8, IndexSettings(family="ivf_flat"))
    eng.build(data(300, 8), np.arange(300))
    eng.delete(np.arange(300))
    eng.merge()
    eng.upsert([1_000, 7], data(2, 8, seed=2))
    eng.merge()
    p = eng.state.primary
    assert p is not None and p.ids.tolist() == [7, 1_000]
    want = as_vectors(data(2, 8, seed=2), 8, "cosine")[::-1]
    np.testing.assert_array_equal(np.asarray(p.vectors), want)
