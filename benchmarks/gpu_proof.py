"""GPU proof: the worker's GPU path checked against its CPU path on the same data, one table.

    scripts/gpu-proof                                 # on a GPU host (unpacks the GPU build)
    python benchmarks/gpu_proof.py --cpu-dry-run --small   # same code path, GPU steps skipped

Checks (a row each: expected, measured, pass / FAIL / skipped):
- probe: faiss has GPU symbols and sees a device;
- the GPU-marked tests (pytest -m gpu over the files that carry the marker);
- flat, ivf_flat and ivf_pq (with OPQ): one CPU build, cloned to the GPU through
  Engine.from_export (the worker's restore path); recall@10 against exact faiss.knn of the GPU
  copy and of the CPU copy at a low and a high per-request nprobe, |difference| <= 0.01, and the
  GPU's recall must rise with nprobe (the per-request value reaches the device);
- hnsw stays on the CPU: the clone is refused and the reason says so;
- fallback: k above the device's top-k limit (gpu.max_k raised past it) makes the real GPU index
  raise; the engine must answer exactly from the CPU copy and count the failure;
- fallback: a GPU memory budget smaller than the index keeps it on the CPU with a reason.
Benchmark (IVF-Flat, --bench-n x --dim): engine build (CPU train + add), clone to the GPU, faiss's
own train + add on the device for reference, and search QPS through Engine.search at batch 1
and 256 on both copies. Writes OUT/gpu-proof.md (the tables) and OUT/gpu-proof.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from faissq.cli.demo_data import clustered, queries_like
from faissq.config import GpuSettings, IndexSettings
from faissq.index.builder import metric_type, train_sample
from faissq.index.engine import Engine
from faissq.index.gpu import probe

K = 10
MAX_RECALL_GAP = 0.01
FAMILIES = ("flat", "ivf_flat", "ivf_pq")
OVER_LIMIT_K = 3000  # above faiss's GPU top-k limit (2048), below the CPU's
PASS, FAIL, SKIP = "pass", "FAIL", "skipped"

Row = dict[str, str]


class Proof:
    """Collects check rows and benchmark rows; a skipped GPU step says why."""

    def __init__(self, dry_run: bool) -> None:
        """dry_run: no GPU expected; GPU-only results are recorded as skipped."""
        self.dry_run = dry_run
        self.checks: list[Row] = []
        self.bench: list[Row] = []

    def check(self, name: str, expected: str, measured: str, ok: bool, gpu_step: bool) -> None:
        """Record one check; a GPU step in a dry run is skipped whatever it measured."""
        if gpu_step and self.dry_run:
            result = f"{SKIP} (--cpu-dry-run: no GPU)"
        else:
            result = PASS if ok else FAIL
        self.checks.append(
            {"check": name, "expected": expected, "measured": measured, "result": result}
        )
        print(f"[{result}] {name}: {measured}", flush=True)

    def failed(self) -> list[str]:
        """Names of the checks that failed."""
        return [r["check"] for r in self.checks if r["result"] == FAIL]


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean share of each query's true top-k found in its returned top-k."""
    hits = sum(
        len(set(f[f >= 0].tolist()) & set(t.tolist())) for f, t in zip(found, truth, strict=True)
    )
    return hits / truth.size


def exact_ids(xb: np.ndarray, ids: np.ndarray, xq: np.ndarray, k: int) -> np.ndarray:
    """Exact top-k ids under the engine's default cosine metric."""
    xb_n, xq_n = xb.copy(), xq.copy()
    faiss.normalize_L2(xb_n)
    faiss.normalize_L2(xq_n)
    _, rows = faiss.knn(xq_n, xb_n, k, metric=faiss.METRIC_INNER_PRODUCT)
    return ids[rows]  # type: ignore[no-any-return]


def gpu_engine(cpu: Engine, cfg: IndexSettings, gpu: GpuSettings) -> tuple[Engine, float]:
    """Clone a built CPU engine's primary to the GPU the way a restoring worker does."""
    t0 = time.perf_counter()
    eng = Engine.from_export(cpu.export(), cfg, gpu=gpu)
    return eng, time.perf_counter() - t0


def check_probe(p: Proof) -> bool:
    """Probe row; returns whether a GPU is usable."""
    found = probe()
    p.check("probe", "GPU symbols and >= 1 device", found.reason, found.available, True)
    return found.available


def check_gpu_tests(p: Proof, root: Path) -> None:
    """Run pytest -m gpu over the test files that carry the marker."""
    files = sorted(
        str(f) for f in (root / "tests").rglob("test_*.py") if "pytest.mark.gpu" in f.read_text()
    )
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", *files]
    run = subprocess.run(cmd, cwd=root, capture_output=True, text=True, check=False)
    tail = (run.stdout.strip().splitlines() or ["no output"])[-1]
    ran = "passed" in tail and "skipped" not in tail and run.returncode == 0
    p.check(f"pytest -m gpu ({len(files)} file(s))", "all pass, none skipped", tail, ran, True)
    if run.returncode not in (0, 5):
        print(run.stdout[-4000:], run.stderr[-2000:], sep="\n", flush=True)


def check_family(p: Proof, family: str, xb: np.ndarray, xq: np.ndarray, gpu: GpuSettings) -> None:
    """Clone one family and compare its recall@10 with the CPU copy's at two nprobe values."""
    ids = np.arange(xb.shape[0], dtype=np.int64)
    truth = exact_ids(xb, ids, xq, K)
    cfg = IndexSettings(family=family)
    cpu = Engine(xb.shape[1], cfg)
    cpu.build(xb, ids)
    plan = cpu.state.primary.plan  # type: ignore[union-attr]
    dev, _ = gpu_engine(cpu, cfg, gpu)
    stats = dev.stats()
    label = f"{family} [{plan.factory}]"
    p.check(
        f"{label}: clone", "answers from a GPU copy", str(stats["device"]), bool(stats["gpu"]), True
    )
    probes = [1, max(2, plan.nlist // 4)] if plan.is_ivf else [None]
    gpu_recalls: list[float] = []
    for nprobe in probes:
        r_gpu = recall_at_k(dev.search(xq, K, nprobe=nprobe).ids, truth)
        r_cpu = recall_at_k(cpu.search(xq, K, nprobe=nprobe).ids, truth)
        gpu_recalls.append(r_gpu)
        gap = abs(r_gpu - r_cpu)
        at = "" if nprobe is None else f" nprobe={nprobe}"
        p.check(
            f"{label}: recall@10{at}",
            f"GPU within {MAX_RECALL_GAP} of CPU",
            f"GPU {r_gpu:.4f}, CPU {r_cpu:.4f}, diff {gap:.4f}",
            gap <= MAX_RECALL_GAP and bool(dev.stats()["gpu"]),
            True,
        )
    if plan.is_ivf:
        rises = gpu_recalls[-1] > gpu_recalls[0] + 0.02
        p.check(
            f"{label}: per-request nprobe",
            "GPU recall rises with nprobe",
            " -> ".join(f"{r:.4f}" for r in gpu_recalls),
            rises,
            True,
        )
    failures = int(dev.stats()["gpu_failures"])
    p.check(f"{label}: device errors", "0 GPU search failures", str(failures), failures == 0, True)


def check_hnsw(p: Proof, xb: np.ndarray, xq: np.ndarray, gpu: GpuSettings) -> None:
    """HNSW has no GPU clone: the engine keeps it on the CPU, says why, and still answers."""
    ids = np.arange(xb.shape[0], dtype=np.int64)
    cfg = IndexSettings(family="hnsw")
    cpu = Engine(xb.shape[1], cfg)
    cpu.build(xb, ids)
    dev, _ = gpu_engine(cpu, cfg, gpu)
    stats = dev.stats()
    same = np.array_equal(dev.search(xq, K).ids, cpu.search(xq, K).ids)
    # with a GPU, the reason must be the refused clone, not a missing device
    refused = p.dry_run or "GPU clone failed" in str(stats["device"])
    p.check(
        "hnsw: stays on the CPU",
        "clone refused with a reason, CPU answers",
        f"{stats['device']}; same answers: {same}"[:200],
        not stats["gpu"] and same and refused,
        False,
    )


def check_fallbacks(p: Proof, xb: np.ndarray, xq: np.ndarray, gpu: GpuSettings) -> None:
    """A real device error and a too-small GPU budget both end on the CPU copy."""
    ids = np.arange(xb.shape[0], dtype=np.int64)
    k = min(OVER_LIMIT_K, xb.shape[0])
    cfg = IndexSettings(family="flat", max_k=max(k, 1024))
    cpu = Engine(xb.shape[1], cfg)
    cpu.build(xb, ids)
    dev, _ = gpu_engine(cpu, cfg, gpu.model_copy(update={"max_k": 4096}))
    on_gpu = bool(dev.stats()["gpu"])
    got = dev.search(xq[:4], k).ids
    exact = np.array_equal(got[:, :K], exact_ids(xb, ids, xq[:4], K))
    stats = dev.stats()
    p.check(
        f"fallback: GPU search fails (k={k})",
        "CPU copy answers exactly, 1 failure counted",
        f"failures {stats['gpu_failures']}, exact {exact}; "
        f"{dev.state.primary.gpu.last_error if on_gpu else 'no GPU copy'}"[:160],  # type: ignore[union-attr]
        on_gpu and exact and stats["gpu_failures"] == 1,
        True,
    )
    small, _ = gpu_engine(cpu, cfg, gpu.model_copy(update={"memory_fraction": 1e-6}))
    st = small.stats()
    kept = not st["gpu"] and "GPU budget" in str(st["device"])
    p.check(
        "fallback: GPU budget too small",
        "stays on the CPU with the budget as reason",
        str(st["device"])[:160],
        kept,
        True,
    )


def qps(
    search: Callable[[np.ndarray], object], xq: np.ndarray, batch: int, seconds: float
) -> float:
    """Queries per second of search over xq in batches, for at least `seconds`."""
    batches = [xq[i : i + batch] for i in range(0, xq.shape[0] - batch + 1, batch)]
    search(batches[0])  # first call pays one-off allocations on either device
    done, t0 = 0, time.perf_counter()
    while True:
        for b in batches:
            search(b)
            done += b.shape[0]
        elapsed = time.perf_counter() - t0
        if elapsed >= seconds:
            return done / elapsed


def benchmark(p: Proof, n: int, dim: int, nq: int, seconds: float, gpu: GpuSettings) -> None:
    """IVF-Flat n x dim: build and clone times, native GPU build, QPS at batch 1 and 256."""
    xb = clustered(n, dim, seed=7)
    xq = queries_like(n, dim, clusters=max(8, int(np.sqrt(n))), seed=7, nq=max(nq, 256))
    ids = np.arange(n, dtype=np.int64)
    cfg = IndexSettings(family="ivf_flat")
    cpu = Engine(xb.shape[1], cfg)
    t0 = time.perf_counter()
    cpu.build(xb, ids)
    build_s = time.perf_counter() - t0
    plan = cpu.state.primary.plan  # type: ignore[union-attr]
    dev, clone_s = gpu_engine(cpu, cfg, gpu)
    on_gpu = bool(dev.stats()["gpu"])
    na = "n/a (no GPU)" if not on_gpu else ""
    p.bench.append(
        {
            "metric": f"engine build {plan.factory}, {n} x {dim} (CPU train + add), s",
            "gpu": "-",
            "cpu": f"{build_s:.1f}",
        }
    )
    p.bench.append(
        {"metric": "clone of that index to the GPU, s", "gpu": na or f"{clone_s:.2f}", "cpu": "-"}
    )
    p.bench.append(
        {
            "metric": "faiss train + add on the device (same factory and sample), s",
            "gpu": na or f"{native_gpu_build(xb, plan, cfg):.1f}",
            "cpu": "-",
        }
    )
    for batch in (1, 256):
        q = xq[: max(nq, batch)]
        c = qps(lambda b: cpu.search(b, K), q, batch, seconds)
        cell = na
        if on_gpu:
            g = qps(lambda b: dev.search(b, K), q, batch, seconds)
            cell = f"{g:,.0f} ({g / c:.1f}x)"
        p.bench.append(
            {
                "metric": f"search QPS, batch {batch}, k={K}, nprobe "
                f"{cfg.default_nprobe} (Engine.search)",
                "gpu": cell,
                "cpu": f"{c:,.0f}",
            }
        )
    print(*(f"{r['metric']}: GPU {r['gpu']}, CPU {r['cpu']}" for r in p.bench), sep="\n")


def native_gpu_build(xb: np.ndarray, plan: Any, cfg: IndexSettings) -> float:
    """Seconds for faiss to train and fill the same IVF-Flat directly on the device."""
    res = faiss.StandardGpuResources()
    t0 = time.perf_counter()
    x = xb.copy()
    faiss.normalize_L2(x)
    index = faiss.index_cpu_to_gpu(
        res, 0, faiss.index_factory(xb.shape[1], plan.factory, metric_type(cfg.metric))
    )
    index.train(train_sample(x, plan.train_size, cfg.seed))
    index.add(x)
    return time.perf_counter() - t0


def write_report(p: Proof, out: Path, args: argparse.Namespace) -> Path:
    """Write the tables as markdown and the rows as JSON under out."""
    out.mkdir(parents=True, exist_ok=True)
    head = (
        f"- {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {device_line()}; "
        f"faiss {faiss.__version__}; Python {platform.python_version()}; "
        f"{os.cpu_count()} CPUs; dim {args.dim}; families n={args.n}, nq={args.nq}; "
        f"bench n={args.bench_n}" + ("; --cpu-dry-run: GPU steps skipped" if p.dry_run else "")
    )
    lines = [head, "", "| check | expected | measured | result |", "|---|---|---|---|"]
    lines += [
        f"| {r['check']} | {r['expected']} | {r['measured']} | {r['result']} |" for r in p.checks
    ]
    lines += ["", "| benchmark | GPU | CPU |", "|---|---:|---:|"]
    lines += [f"| {r['metric']} | {r['gpu']} | {r['cpu']} |" for r in p.bench]
    md = out / "gpu-proof.md"
    md.write_text("\n".join(lines) + "\n")
    (out / "gpu-proof.json").write_text(
        json.dumps({"checks": p.checks, "bench": p.bench}, indent=1)
    )
    return md


def device_line() -> str:
    """The GPU as nvidia-smi names it, or why there is none."""
    try:
        q = ["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"]
        return "GPU " + subprocess.run(
            q, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip().replace("\n", "; ")
    except (OSError, subprocess.SubprocessError):
        return "no GPU (nvidia-smi absent)"


def main(argv: list[str] | None = None) -> int:
    """Run every check and the benchmark; exit 1 when a check that ran failed."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu-dry-run", action="store_true", help="no GPU: skip GPU-only results")
    ap.add_argument("--small", action="store_true", help="tiny sizes (seconds on 2 cores)")
    ap.add_argument("--n", type=int, default=200_000, help="vectors for the family checks")
    ap.add_argument("--dim", type=int, default=128, help="vector dimension")
    ap.add_argument("--nq", type=int, default=1000, help="queries")
    ap.add_argument("--bench-n", type=int, default=1_000_000, help="vectors for the benchmark")
    ap.add_argument("--seconds", type=float, default=2.0, help="QPS measuring time per cell")
    ap.add_argument("--out", default=os.environ.get("OUT") or "benchmarks/out/gpu-proof")
    args = ap.parse_args(argv)
    if args.small:
        args.n, args.dim, args.nq, args.bench_n, args.seconds = 2000, 16, 32, 3000, 0.1
    started = time.perf_counter()
    p = Proof(args.cpu_dry_run)
    gpu = GpuSettings(mode="on")
    if check_probe(p) and args.cpu_dry_run:
        print("--cpu-dry-run on a machine with a GPU: GPU results are still recorded as skipped")
    check_gpu_tests(p, Path(__file__).resolve().parents[1])
    xb = clustered(args.n, args.dim, seed=3)
    xq = queries_like(args.n, args.dim, clusters=max(8, int(np.sqrt(args.n))), seed=3, nq=args.nq)
    for family in FAMILIES:
        check_family(p, family, xb, xq, gpu)
    check_hnsw(p, xb[: min(args.n, 50_000)], xq, gpu)
    check_fallbacks(p, xb[: min(args.n, 20_000)], xq, gpu)
    benchmark(p, args.bench_n, args.dim, args.nq, args.seconds, gpu)
    md = write_report(p, Path(args.out), args)
    print(f"[gpu-proof] done in {time.perf_counter() - started:.0f} s")
    print(md.read_text())
    bad = p.failed()
    print(f"{len(p.checks) - len(bad)} passed or skipped, {len(bad)} failed: {bad or ''}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
