"""A sharded IVF build shares one coarse quantizer: nprobe means the same on every shard."""

from __future__ import annotations

import io
from typing import Any

import numpy as np

from faissq import shards
from faissq.cli.progress_view import wait_with_progress
from faissq.config import IndexSettings, Settings
from faissq.index.params import ivf_of
from faissq.index.policy import nlist_for
from faissq.rpc.search_client import SearchClient
from faissq.rpc.shard_client import ShardedSearchClient
from faissq.storage.durable import DurableStore
from faissq.tasks.producer import JobClient
from faissq.tasks.sharded_tune import ShardedTune

DIM = 32
N = 20_000
S = 4
NPROBE = 4
TARGET = 0.95
TIMEOUT = 120


def clustered(n: int, seed: int) -> np.ndarray:
    """Rows around 64 fixed centres (the same centres for every seed): a corpus IVF suits."""
    centres = np.random.default_rng(0).standard_normal((64, DIM)).astype(np.float32)
    rng = np.random.default_rng(seed)
    rows = centres[rng.integers(0, 64, n)] + 0.35 * rng.standard_normal((n, DIM))
    return rows.astype(np.float32)


def unit(x: np.ndarray) -> np.ndarray:
    """Rows scaled to length 1 (cosine)."""
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def quantizer_of(settings: Settings, index: str) -> np.ndarray:
    """The coarse centroids of an index's newest snapshot on storage."""
    rec = DurableStore(settings).recover(index, quarantine=False)
    assert rec.engine is not None
    ivf = ivf_of(rec.engine.state.primary.index)
    assert ivf is not None, f"{index} is not IVF"
    return np.asarray(ivf.quantizer.reconstruct_n(0, ivf.nlist))


def recall_at_10(got: np.ndarray, truth: np.ndarray) -> float:
    """Share of the true top-10 found in the answer's top-10."""
    return float(np.mean([np.isin(t, g).mean() for g, t in zip(got, truth, strict=True)]))


def test_sharded_ivf_build_shares_one_quantizer_keeps_recall_and_autotunes_as_one(
    worker_factory: Any, index_name: str, job_settings: Settings
) -> None:
    """20k x 32 clustered, 4 IVF-Flat shards: the client trains one quantizer on a sample of
    the whole corpus and every shard builds on it (identical centroids in every snapshot);
    recall@10 at nprobe 4 is that of one IVF-Flat index with the same centroids. Autotune of
    the sharded index chooses on the merged recall, and every shard holds its profile."""
    one = f"{index_name}-one"
    names = shards.shard_names(index_name, S)
    worker_factory([one, *names]).start()
    jobs = JobClient(job_settings)
    jobs.declare_sharded(index_name, S)
    base, ids = clustered(N, 1), np.arange(N, dtype=np.int64) * 5 + 3
    report = jobs.build(index_name, base, ids, family="ivf_flat").get(timeout=TIMEOUT)
    assert report["ntotal"] == N

    quantizers = [quantizer_of(job_settings, n) for n in names]
    for name, q in zip(names[1:], quantizers[1:], strict=True):
        assert np.array_equal(q, quantizers[0]), f"{name} trained its own quantizer"
    nlist = quantizers[0].shape[0]
    assert nlist > 64 * NPROBE  # nprobe 4 visits a small share of the lists
    # sized by the whole corpus (512 lists here), not by a shard's rows (128)
    assert nlist == nlist_for(N, IndexSettings())[0] > nlist_for(N // S, IndexSettings())[0]
    centroids = quantizers[0]
    jobs.build(one, base, ids, family="ivf_flat", centroids=centroids).get(timeout=TIMEOUT)
    assert np.array_equal(quantizer_of(job_settings, one), centroids)

    queries = clustered(300, 2)
    truth = ids[np.argsort(-(unit(queries) @ unit(base).T), axis=1)[:, :10]]
    with ShardedSearchClient(job_settings, index_name) as sharded, \
            SearchClient(job_settings, one) as single:  # fmt: skip
        got = sharded.search(queries, 10, nprobe=NPROBE, min_seq=report["seqs"])
        want = single.search(queries, 10, nprobe=NPROBE)
        exact = single.search(queries, 10, nprobe=nlist)
    r_sharded, r_single = recall_at_10(got.ids, truth), recall_at_10(want.ids, truth)
    assert recall_at_10(exact.ids, truth) > 0.99
    assert r_single < 0.99, "nprobe 4 should miss some neighbours: the test would show nothing"
    assert r_sharded >= r_single - 0.01, (r_sharded, r_single)

    # autotune of the whole sharded index: recall of the merged top-k, one profile everywhere
    tune = jobs.autotune(index_name, target_recall=TARGET)
    assert isinstance(tune, ShardedTune)
    profile = wait_with_progress(tune, TIMEOUT, out=io.StringIO())  # polls ready/state/info
    installed = {k: v for k, v in profile.items() if k not in ("installed", "seconds")}
    chosen = profile["chosen"]
    assert profile["met"] and chosen["recall_lo"] >= TARGET and profile["shards"] == S
    assert profile["ntotal"] == N and set(profile["installed"]) == set(names)
    stats = jobs.stats(index_name).get(timeout=TIMEOUT)["shards"]
    assert all(stats[n]["engine"]["tuning"] == chosen for n in names)
    for name in names:  # the snapshot each shard wrote holds the same profile
        rec = DurableStore(job_settings).recover(name, quarantine=False)
        assert rec.engine is not None and rec.engine.tuning_profile == installed, name
    with ShardedSearchClient(job_settings, index_name) as sharded:
        tuned = sharded.search(queries, 10, min_seq=report["seqs"])  # no nprobe: the profile's
    assert recall_at_10(tuned.ids, truth) >= TARGET - 0.02, (recall_at_10(tuned.ids, truth), chosen)
    jobs.close()
