"""A sharded index tuned as a whole: the shards' sweeps merge to the recall a fan-out gets."""

from __future__ import annotations

import numpy as np
import pytest
from engine_support import exact, recall

from faissq import shards
from faissq.cli.demo_data import clustered, queries_like
from faissq.config import IndexSettings
from faissq.errors import InvalidParameter
from faissq.index.builder import train_centroids
from faissq.index.engine import Engine
from faissq.index.merged_tuning import at, merge_sweeps, pack_sweep, unpack_sweep
from faissq.index.results import merge_topk

N, DIM, S, CLUSTERS, SPREAD = 8000, 32, 4, 90, 1.4
TARGET = 0.95


@pytest.fixture(scope="module")
def sharded() -> tuple[list[Engine], np.ndarray, np.ndarray]:
    """4 IVF-Flat shards on one coarse quantizer (as JobClient builds them), ids routed by
    the shard hash; the whole corpus and its ids."""
    xb = clustered(N, DIM, clusters=CLUSTERS, spread=SPREAD, seed=1)
    ids = np.arange(N, dtype=np.int64) * 3 + 5
    cfg = IndexSettings(family="ivf_flat")
    cents = train_centroids(xb, cfg, "cosine")
    engines = []
    for s, rows in enumerate(shards.split_rows(ids, S)):
        eng = Engine(DIM, cfg, name=shards.shard_name("t", s, S))
        eng.build(xb[rows], ids[rows], centroids=cents)
        engines.append(eng)
    return engines, xb, ids


def fan_out(engines: list[Engine], xq: np.ndarray, **params: int) -> np.ndarray:
    """What ShardedSearchClient answers: every shard's top-10 merged by score."""
    parts = [(r.scores, r.ids) for r in (e.search(xq, 10, **params) for e in engines)]
    return merge_topk(parts, 10, True)[1]


def test_the_merged_profile_meets_the_target_on_the_results_a_fan_out_returns(
    sharded: tuple[list[Engine], np.ndarray, np.ndarray],
) -> None:
    """Each shard sweeps the same held-out queries; the merged table's recall at a setting is
    exactly the fan-out's recall against brute force over the whole corpus, the chosen setting
    meets the target with confidence and the one before it does not; installed on every
    shard, default searches reach the target on queries never seen."""
    engines, xb, ids = sharded
    both = queries_like(N, DIM, clusters=CLUSTERS, spread=SPREAD, seed=1, nq=1200)
    xq, unseen = both[:600], both[600:]
    parts = {e.name: unpack_sweep(pack_sweep(e.sweep(xq, 10, TARGET))) for e in engines}
    profile = merge_sweeps(parts, True, "given")
    chosen, table = profile["chosen"], profile["table"]
    assert profile["met"] and chosen["recall_lo"] >= TARGET
    assert profile["ntotal"] == N and profile["shards"] == S and profile["param"] == "nprobe"
    truth = exact(xb, ids, xq, 10)
    for row in [*table[:4], chosen]:
        got = recall(fan_out(engines, xq, nprobe=row["nprobe"]), truth)
        assert got == pytest.approx(row["recall"], abs=1e-4), row
    before = table[table.index(chosen) - 1]
    assert before["nprobe"] < chosen["nprobe"] and before["recall_lo"] < TARGET
    for eng in engines:
        eng.set_tuning(profile)
    assert recall(fan_out(engines, unseen), exact(xb, ids, unseen, 10)) >= TARGET - 0.02


def test_a_setting_a_shard_skipped_takes_its_last_result_at_that_k_factor() -> None:
    """Past its curve top a shard stops; the merge reuses its last measured lists there."""
    first, second = {"ids": np.zeros((1, 1))}, {"ids": np.ones((1, 1))}
    grid = [{"nprobe": 1, "k_factor": 1}, {"nprobe": 2, "k_factor": 1},
            {"nprobe": 1, "k_factor": 2}, {"nprobe": 2, "k_factor": 2}]  # fmt: skip
    part = {"grid": grid, "found": [first, None, second, None]}
    assert at(part, grid[0]) == (first, True)
    assert at(part, grid[1]) == (first, False)
    assert at(part, grid[3]) == (second, False)


def test_shards_of_different_families_or_queries_cannot_be_merged(
    sharded: tuple[list[Engine], np.ndarray, np.ndarray],
) -> None:
    engines, xb, ids = sharded
    xq = queries_like(N, DIM, clusters=CLUSTERS, spread=SPREAD, seed=3, nq=50)
    flat = Engine(DIM, IndexSettings(family="flat"), name="t.s3of4")
    flat.build(xb[:100], ids[:100])
    ivf = engines[0].sweep(xq, 10, TARGET)
    with pytest.raises(InvalidParameter, match="swept"):
        merge_sweeps({"a": ivf, "b": flat.sweep(xq, 10, TARGET)}, True, "given")
    with pytest.raises(InvalidParameter, match="other queries"):
        merge_sweeps({"a": ivf, "b": engines[1].sweep(xq[:20], 10, TARGET)}, True, "given")
    with pytest.raises(InvalidParameter):
        merge_sweeps({}, True, "given")
