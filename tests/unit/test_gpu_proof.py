"""scripts/gpu-proof runs end to end without a GPU (--cpu-dry-run) and writes its table."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _proof_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gpu_proof", ROOT / "benchmarks/gpu_proof.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _run(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    # one OpenMP thread: faiss's OPQ training spins badly on a busy 2-core machine
    env = {
        **os.environ,
        "OUT": str(tmp_path / "out"),
        "PYTHON": sys.executable,
        "OMP_NUM_THREADS": "1",
    }
    return subprocess.run(
        [str(ROOT / "scripts/gpu-proof"), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )


@pytest.mark.slow
def test_cpu_dry_run_runs_every_step_and_says_which_were_skipped(tmp_path: Path) -> None:
    run = _run(tmp_path, "--cpu-dry-run", "--small")
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "--cpu-dry-run: GPU build not unpacked" in run.stdout
    rows = json.loads((tmp_path / "out/gpu-proof.json").read_text())
    checks = {r["check"]: r for r in rows["checks"]}
    table = (tmp_path / "out/gpu-proof.md").read_text()
    for family in ("flat [IDMap,Flat]", "ivf_flat [IVF", "ivf_pq [OPQ"):
        mine = [c for name, c in checks.items() if name.startswith(family)]
        assert len(mine) >= 3, family
        assert all(c["result"].startswith("skipped (--cpu-dry-run") for c in mine), mine
        assert family in table
    assert any("per-request nprobe" in name for name in checks)
    assert checks["hnsw: stays on the CPU"]["result"] == "pass"
    assert checks["probe"]["result"].startswith("skipped")
    assert any(n.startswith("pytest -m gpu") for n in checks)
    qps = [r for r in rows["bench"] if r["metric"].startswith("search QPS")]
    assert [r["gpu"] for r in qps] == ["n/a (no GPU)"] * 2
    assert all(float(r["cpu"].replace(",", "")) > 0 for r in qps)


def test_without_the_gpu_build_the_proof_stops_and_says_how_to_make_it(tmp_path: Path) -> None:
    run = _run(tmp_path, "--artifact", str(tmp_path / "missing"))
    assert run.returncode == 2
    assert "run scripts/gpu-build first" in run.stdout


def test_a_failed_check_outside_a_dry_run_is_reported() -> None:
    mod = _proof_module()
    real, dry = mod.Proof(dry_run=False), mod.Proof(dry_run=True)
    for p in (real, dry):
        p.check("clone", "on the GPU", "CPU fallback", False, True)
        p.check("hnsw", "on the CPU", "CPU", True, False)
    assert real.failed() == ["clone"]
    assert dry.failed() == [] and dry.checks[0]["result"].startswith("skipped")


def test_recall_counts_each_true_neighbour_once() -> None:
    import numpy as np

    mod = _proof_module()
    truth = np.array([[1, 2, 3, 4], [5, 6, 7, 8]])
    found = np.array([[4, 3, -1, -1], [5, 6, 7, 9]])
    assert mod.recall_at_k(found, truth) == pytest.approx(5 / 8)
