"""Resident memory of an Engine under upsert/delete churn, against the bytes it stores.

    python benchmarks/churn.py                 # 60 s of churn (the figure in docs/benchmarks.md)
    python benchmarks/churn.py --seconds 10    # a quick check

The process builds a primary of --n vectors, then a writer thread (the worker's writer is the
Celery task thread, so its allocations land in a thread arena as here) runs churn for --seconds:
batches of --batch ids drawn from --n primary ids plus --extra new ids, each an upsert or (one in
--delete-every) a delete, and a merge whenever the delta passes --merge-delta-max, as the worker's
maintenance does. RSS is VmRSS from /proc/self/status; "stored" is what the engine holds: the raw
store (ids + vectors), the FAISS index (serialised size), the delta's live rows and tombstones.
Growth = RSS - RSS before any data existed; the target is growth <= 1.5 x stored at the end.
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import threading
import time
from typing import Any

import faiss
import numpy as np

from faissq.cli.demo_data import clustered
from faissq.config import IndexSettings, MaintenanceSettings
from faissq.index.engine import Engine
from faissq.index.heap import mmap_large_blocks, release_freed

TARGET = 1.5  # growth / stored at the end of the run


def rss_bytes() -> int:
    """VmRSS of this process."""
    with open("/proc/self/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("VmRSS not in /proc/self/status")


def stored_bytes(eng: Engine) -> dict[str, int]:
    """What the engine holds, by part."""
    st = eng.state
    p = st.primary
    index = int(faiss.serialize_index(p.index).nbytes) if p is not None else 0
    raw = int(p.ids.nbytes + p.vectors.nbytes) if p is not None else 0
    delta = len(st.delta) * (8 + 4 * eng.dim)
    return {"index": index, "raw": raw, "delta": delta, "tombstones": int(st.tombstones.nbytes)}


def churn(eng: Engine, args: argparse.Namespace, out: dict[str, Any]) -> None:
    """The writer thread: upserts, deletes and merges for args.seconds."""
    rng = np.random.default_rng(7)
    universe = args.n + args.extra
    end = time.monotonic() + args.seconds
    ops = merges = rows = 0
    peak = rss_bytes()
    while time.monotonic() < end:
        ids = rng.choice(universe, size=args.batch, replace=False).astype(np.int64)
        if ops % args.delete_every == args.delete_every - 1:
            eng.delete(ids)
        else:
            eng.upsert(ids, rng.standard_normal((args.batch, eng.dim), dtype=np.float32))
        ops += 1
        rows += args.batch
        if len(eng.state.delta) >= args.merge_delta_max:
            eng.merge()
            release_freed()  # what the worker does after every job that swapped an index
            merges += 1
        if ops % 50 == 0:
            peak = max(peak, rss_bytes())
    out.update(ops=ops, rows=rows, merges=merges, peak=max(peak, rss_bytes()))


def main() -> None:
    """Build, churn, print one table."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=100_000, help="primary vectors")
    ap.add_argument("--extra", type=int, default=45_000, help="ids beyond the primary's")
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--batch", type=int, default=500, help="ids per upsert or delete")
    ap.add_argument("--delete-every", type=int, default=4, help="one batch in this many deletes")
    ap.add_argument("--merge-delta-max", type=int, default=IndexSettings().merge_delta_max,
                    help="merge past this delta (default: the setting's)")  # fmt: skip
    ap.add_argument("--seconds", type=float, default=60.0, help="churn duration")
    ap.add_argument("--family", default="ivf_flat")
    args = ap.parse_args()

    faiss.omp_set_num_threads(1)
    mmap_large_blocks(MaintenanceSettings().mmap_threshold_bytes)  # as the worker does at start
    gc.collect()
    base = rss_bytes()
    xb = clustered(args.n, args.dim, seed=1)
    eng = Engine(args.dim, IndexSettings(merge_delta_max=args.merge_delta_max))
    eng.build(xb, np.arange(args.n, dtype=np.int64), family=args.family)
    del xb
    gc.collect()
    release_freed()  # as after a build job
    built = rss_bytes()
    stored0 = sum(stored_bytes(eng).values())
    out: dict[str, Any] = {}
    t = threading.Thread(target=churn, args=(eng, args, out), name="writer")
    t.start()
    t.join()
    gc.collect()
    end = rss_bytes()
    parts = stored_bytes(eng)
    stored = sum(parts.values())
    growth = end - base
    mib = 1 << 20
    print(f"# churn: n={args.n} extra={args.extra} dim={args.dim} batch={args.batch} "
          f"delete 1/{args.delete_every} merge_delta_max={args.merge_delta_max} "
          f"{args.seconds:.0f} s, {out['ops']} batches ({out['rows']} rows), "
          f"{out['merges']} merges; {platform.node()} {os.cpu_count()} CPUs")  # fmt: skip
    print("# stored by part (MiB): " + ", ".join(f"{k} {v / mib:.1f}" for k, v in parts.items()))
    print("| measure | MiB | x stored | target |")
    print("|---|---:|---:|---|")
    print(f"| stored after build | {stored0 / mib:.1f} | 1.00 | |")
    print(f"| RSS growth after build | {(built - base) / mib:.1f} | "
          f"{(built - base) / stored0:.2f} | |")  # fmt: skip
    print(f"| stored after churn | {stored / mib:.1f} | 1.00 | |")
    print(f"| RSS growth, peak sample during churn | {(out['peak'] - base) / mib:.1f} | "
          f"{(out['peak'] - base) / stored:.2f} | |")  # fmt: skip
    ok = "met" if growth <= TARGET * stored else "MISSED"
    print(f"| RSS growth after churn | {growth / mib:.1f} | {growth / stored:.2f} | "
          f"<= {TARGET} ({ok}) |")  # fmt: skip


if __name__ == "__main__":
    main()
