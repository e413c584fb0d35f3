"""Sustained load on one real `faissq worker`: threads sharing a client, separate client
processes, and upserts and deletes streaming through jobs meanwhile."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis
from conftest import REPO, WorkerProcess, make_settings
from rpc_load_client import DIM, K, foreign, table
from rpc_support import TIMEOUT

from faissq import IndexBusy, SearchClient, SearchTimeout, keys
from faissq.errors import FaissqError
from faissq.tasks.producer import JobClient

BUILT = 4000  # ids 0..BUILT-1 at the start; upserts add ids above
THREADS, PER_THREAD = 8, 150
PROCESSES, PER_PROCESS = 2, 300


def test_sustained_load_answers_every_search_with_its_own_results(
    redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    root = tmp_path_factory.mktemp("load-storage")
    index = f"load{uuid.uuid4().hex[:6]}"
    # a list bound below the callers in flight: overload answers busy instead of queueing
    env = {"FAISSQ_RPC__QUEUE_MAX": "3"}
    worker = WorkerProcess(redis_url, root, [index], tmp_path_factory.mktemp("logs"), env)
    worker.start()
    settings = make_settings(redis_url, root, [index])
    jobs = JobClient(settings)
    unit = table()
    jobs.build(index, unit[:BUILT], ids=np.arange(BUILT), family="ivf_flat").get(timeout=TIMEOUT)
    stop = threading.Event()
    writes = {"upserted": 0, "deleted": 0}

    def stream_writes() -> None:
        rng = np.random.default_rng(3)
        next_id = BUILT
        while not stop.is_set() and next_id + 50 <= len(unit):
            ids = np.arange(next_id, next_id + 50)
            jobs.upsert(index, ids, unit[ids]).get(timeout=TIMEOUT)
            gone = rng.choice(next_id, size=20, replace=False)
            jobs.delete(index, gone).get(timeout=TIMEOUT)
            next_id += 50
            writes["upserted"] += 50
            writes["deleted"] += 20

    procs = [
        subprocess.Popen(
            [
                sys.executable,
                str(Path(__file__).with_name("rpc_load_client.py")),
                redis_url,
                index,
                str(100 + i),
                str(PER_PROCESS),
            ],
            cwd=REPO,
            stdout=subprocess.PIPE,
            text=True,
        )
        for i in range(PROCESSES)
    ]
    writer = threading.Thread(target=stream_writes)
    writer.start()
    settings.rpc.coalesce = False  # every thread's search its own request: more than the bound
    client = SearchClient(settings, index)

    def searches(seed: int) -> dict[str, Any]:
        rng = np.random.default_rng(seed)
        out: dict[str, Any] = {"searches": 0, "foreign": 0, "errors": {}}
        for _ in range(PER_THREAD):
            q = rng.standard_normal(DIM).astype(np.float32)
            try:
                got = client.search(q, K, timeout=10)
            except FaissqError as exc:
                name = type(exc).__name__
                out["errors"][name] = out["errors"].get(name, 0) + 1
                continue
            out["searches"] += 1
            out["foreign"] += int(foreign(q, got.scores[0], got.ids[0], unit))
        return out

    try:
        with ThreadPoolExecutor(THREADS) as pool:
            results = list(pool.map(searches, range(THREADS)))
        for p in procs:
            stdout, _ = p.communicate(timeout=300)
            assert p.returncode == 0, stdout
            results.append(json.loads(stdout.strip().splitlines()[-1]))
    finally:
        stop.set()
        writer.join(TIMEOUT)
        client.close()
        for p in procs:
            if p.poll() is None:
                p.kill()
    errors: dict[str, int] = {}
    for res in results:
        for name, n in res["errors"].items():
            errors[name] = errors.get(name, 0) + n
    total = sum(res["searches"] for res in results)
    print(f"load: {total} searches answered, errors {errors}, writes {writes}")
    assert sum(res["foreign"] for res in results) == 0
    assert set(errors) <= {IndexBusy.__name__, SearchTimeout.__name__}, errors
    assert total + sum(errors.values()) == THREADS * PER_THREAD + PROCESSES * PER_PROCESS
    assert writes["upserted"] > 0 and total >= (THREADS * PER_THREAD + PROCESSES * PER_PROCESS) // 4
    r = redis.Redis.from_url(redis_url)
    left = list(r.scan_iter(match=keys.reply_prefix(index) + "*"))
    # a reply that came after its search gave up waits out its TTL; nothing else may stay
    assert len(left) <= errors.get(SearchTimeout.__name__, 0), left
    assert all(r.ttl(key) > 0 for key in left)
    r.close()
    jobs.close()
    worker.stop(timeout_s=10)
    worker.app.close()
