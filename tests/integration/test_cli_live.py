"""The operator commands as real `python -m faissq` processes against a real worker and Redis."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

from faissq.config import Settings
from faissq.rpc.search_client import SearchClient
from faissq.tasks.producer import JobClient

REPO = Path(__file__).resolve().parents[2]
DIM = 32
N = 30_000  # IVF-Flat: training takes long enough for PROGRESS states to be seen
# a finished bar of a phase that counts vectors: full, and its count at its total
FULL_BAR = re.compile(r"^  (store|train|add)\s+\[#{30}\] (\d+)/\2$", re.M)


def cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """Run `python -m faissq ARGS` to the end and return its exit code and output."""
    return subprocess.run([sys.executable, "-m", "faissq", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=60)  # fmt: skip


def ok(env: dict[str, str], *args: str) -> str:
    """Run a command that must succeed; return its stdout."""
    done = cli(env, *args)
    assert done.returncode == 0, f"{args}: {done.returncode}\n{done.stdout}\n{done.stderr}"
    return done.stdout


def field(out: str, name: str) -> str:
    """The value of an indented `name  value` result line."""
    match = re.search(rf"^  {name}\s+(.*)$", out, re.M)
    assert match, f"no {name!r} line in:\n{out}"
    return match.group(1).strip()


def save(path: Path, arr: np.ndarray) -> str:
    """Write a .npy and return its path as a string."""
    np.save(path, arr)
    return str(path)


def test_jobs_search_status_and_snapshots_through_the_cli(
    worker_factory: Any, index_name: str, job_settings: Settings, tmp_path: Path
) -> None:
    """build (progress bar) / upsert / delete / search / status / save / snapshot, bad input."""
    worker = worker_factory([index_name], env={"FAISSQ_WORKER__PROGRESS_INTERVAL_S": "0"})
    env = worker.start().env()
    rng = np.random.default_rng(7)
    xb = save(tmp_path / "xb.npy", rng.standard_normal((N, DIM)).astype(np.float32))

    # an explicit family: auto would calibrate and may well pick Flat for 30k x 32
    out = ok(env, "build", "--index", index_name, xb, "--family", "ivf_flat")
    assert FULL_BAR.search(out), out
    assert field(out, "family") == "ivf_flat" and field(out, "ntotal") == str(N)
    assert field(out, "factory").startswith("IVF") and field(out, "reason")

    ids = save(tmp_path / "ids.npy", np.arange(100_000, 100_020))
    extra = save(tmp_path / "extra.npy", rng.standard_normal((20, DIM)).astype(np.float32))
    out = ok(env, "upsert", "--index", index_name, "--ids", ids, "--vectors", extra,
             "--batch-id", "cli-1")  # fmt: skip
    assert field(out, "applied") == "20" and field(out, "ntotal") == str(N + 20)
    out = ok(env, "delete", "--index", index_name, "--ids", "1,2,3")
    assert field(out, "applied") == "3" and field(out, "ntotal") == str(N + 17)

    queries = save(tmp_path / "q.npy", np.load(extra)[:2])
    out = ok(env, "search", "--index", index_name, "--vector", queries, "-k", "3", "--nprobe", "64")
    lines = out.splitlines()
    assert lines[0].split() == ["query", "rank", "id", "score"]
    rows = [ln.split() for ln in lines[1:7]]
    assert [r[:2] for r in rows] == [[q, k] for q in "01" for k in "123"]
    assert rows[0][2] == "100000" and rows[3][2] == "100001"  # each query finds itself first
    assert re.search(r"^index \S+ version \d+, answered by \S+, [\d.]+ ms round trip", out, re.M)
    out = ok(env, "search", "--index", index_name, "--random", "--queries", "2", "-k", "5")
    assert len([ln for ln in out.splitlines() if re.match(r"^\s+[01]\s+[1-5]\s", ln)]) == 10

    out = ok(env, "status", "--index", index_name)
    assert "readiness   ready: 1 worker(s) alive" in out
    assert f"ntotal {N + 17} (primary {N}, delta 20, tombstones 3), dim {DIM}" in out
    assert "rpc 0, jobs 0" in out and "device      CPU" in out
    status = json.loads(ok(env, "status", "--index", index_name, "--json"))["indexes"][0]
    jobs = JobClient(job_settings)
    try:
        stats = jobs.stats(index_name).get(timeout=30)
    finally:
        jobs.close()
    assert status["ready"] and status["stats"]["engine"] == stats["engine"]

    saved = field(ok(env, "save", "--index", index_name), "snapshot").split()[0]
    listing = ok(env, "snapshot", "ls", "--index", index_name)
    # seq 1 is the build, 2 the upsert, 3 the delete; an IVF-Flat index whose lists hold the
    # delta is merged before it is saved (faissq/index/live.py)
    assert re.search(rf"^{saved}\s+3\s+{N + 17}\s+\d+\s+\S+\s+CURRENT$", listing, re.M), listing
    assert f"{saved}  ok" in ok(env, "snapshot", "verify", "--index", index_name)

    bad = save(tmp_path / "bad.npy", rng.standard_normal((20, DIM // 2)).astype(np.float32))
    done = cli(env, "upsert", "--index", index_name, "--ids", ids, "--vectors", bad)
    assert done.returncode == 1
    assert done.stderr.splitlines() == [
        f"faissq: dimension_mismatch: vectors have dimension {DIM // 2}, the index has {DIM}"
    ]


def test_build_and_upsert_carry_attributes_from_a_json_file(
    worker_factory: Any, index_name: str, job_settings: Settings, tmp_path: Path
) -> None:
    """--attributes FILE: the rows' values reach the index; a bad file is one typed line."""
    env = (
        worker_factory(
            [index_name], env={"FAISSQ_INDEX__ATTRIBUTES": '{"tenant": "int64", "lang": "keyword"}'}
        )
        .start()
        .env()
    )
    rng = np.random.default_rng(3)
    xb = rng.standard_normal((200, DIM)).astype(np.float32)
    columns = tmp_path / "attrs.json"
    columns.write_text(json.dumps({"tenant": [i % 4 for i in range(200)], "lang": ["en"] * 200}))
    ok(env, "build", "--index", index_name, save(tmp_path / "xb.npy", xb), "--family", "flat",
       "--attributes", str(columns))  # fmt: skip
    extra = rng.standard_normal((2, DIM)).astype(np.float32)
    columns.write_text(json.dumps({"tenant": [9, None], "lang": ["de", None]}))
    out = ok(env, "upsert", "--index", index_name, "--ids", "500,501", "--vectors",
             save(tmp_path / "extra.npy", extra), "--attributes", str(columns))  # fmt: skip
    assert field(out, "applied") == "2"

    with SearchClient(job_settings, index=index_name) as client:
        nine = client.search(extra, 3, filter={"field": "tenant", "eq": 9})
        assert nine.ids[:, 0].tolist() == [500, 500] and (nine.ids[:, 1:] == -1).all()
        two = client.search(xb[:1], 60, filter={"field": "tenant", "eq": 2}).ids[0]
        assert sorted(two[two >= 0].tolist()) == [i for i in range(200) if i % 4 == 2]
        fetched = client.fetch([7, 501])
        assert fetched.attributes == {"tenant": [3, None], "lang": ["en", None]}

    columns.write_text(json.dumps({"tenant": [1]}))  # one value for two rows
    done = cli(env, "upsert", "--index", index_name, "--ids", "600,601", "--vectors",
               save(tmp_path / "two.npy", extra))  # fmt: skip
    assert done.returncode == 0
    done = cli(env, "upsert", "--index", index_name, "--ids", "700,701", "--vectors",
               str(tmp_path / "two.npy"), "--attributes", str(columns))  # fmt: skip
    assert done.returncode == 1 and done.stderr.startswith("faissq: invalid_attributes: "), done
    (tmp_path / "not.json").write_text("[1, 2]")
    done = cli(env, "upsert", "--index", index_name, "--ids", "700,701", "--vectors",
               str(tmp_path / "two.npy"), "--attributes", str(tmp_path / "not.json"))  # fmt: skip
    assert done.returncode == 1 and done.stderr.startswith("faissq: invalid_attributes: "), done


def test_status_without_a_worker_and_without_a_redis_url(
    redis_url: str, storage_root: Path, index_name: str
) -> None:
    """No heartbeat: status says so and exits 1; no FAISSQ_REDIS__URL: one line, exit 1."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FAISSQ_")}
    env.update({"FAISSQ_REDIS__URL": redis_url, "FAISSQ_STORAGE__URL": str(storage_root)})
    done = cli(env, "status", "--index", index_name)
    assert done.returncode == 1, done.stderr
    assert f"index {index_name}" in done.stdout and "no worker alive" in done.stdout
    del env["FAISSQ_REDIS__URL"]
    done = cli(env, "search", "--index", index_name, "--random")
    assert done.returncode == 1 and done.stdout == ""
    assert len(done.stderr.splitlines()) == 1
    assert done.stderr.startswith("faissq: invalid_parameter: FAISSQ_REDIS__URL is unset")
