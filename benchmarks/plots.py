"""The figures of docs/benchmarks.md drawn as small SVG files under docs/img/, from its tables.

    python benchmarks/plots.py        # needs matplotlib (the dev or bench extra)

The numbers below are copied from the tables of docs/benchmarks.md; change both together when a
benchmark is run again. Text stays text in the SVG (no embedded glyphs), and the files carry no
date, so a rerun over the same figures changes nothing.
"""

from __future__ import annotations

import argparse
from pathlib import Path

IMG = Path(__file__).resolve().parent.parent / "docs" / "img"

# RPC, run of 2026-11-26 02:04 (pinned, latency settings): row -> (p50, p90, p99) ms
RPC_LATENCY = {
    "(a) in-process search": (0.068, 0.077, 0.131),
    "(a'') in-process, PING between": (0.088, 0.102, 0.144),
    "(b) bare LPUSH + BRPOP": (0.223, 0.310, 0.436),
    "(b'') bare, polling": (0.202, 0.223, 0.290),
    "(c0) faissq RPC, no-op engine": (0.199, 0.233, 0.330),
    "(c) faissq SearchClient": (0.317, 0.393, 0.503),
    "(d) Celery delay().get()": (2.785, 3.540, 5.268),
}

# Index family, 2026-12-07: kind -> n -> (auto, raw IVF-Flat, raw HNSW32) p50 ms at recall >= 0.95
FAMILY_P50 = {
    "clustered": {
        20_000: (0.133, 0.104, 0.135),
        50_000: (0.204, 0.163, 0.214),
        100_000: (0.255, 0.198, 0.307),
    },
    "text (all-MiniLM-L6-v2)": {
        5_000: (0.178, 0.144, 0.137),
        10_000: (0.193, 0.211, 0.156),
        20_000: (0.244, 0.469, 0.189),
    },
}


def rpc_latency(plt: object, path: Path) -> None:
    """p50, p90 and p99 of each sequential-search row on a log axis."""
    fig, ax = plt.subplots(figsize=(7, 3.2))  # type: ignore[attr-defined]
    rows = list(RPC_LATENCY)
    for i, row in enumerate(rows):
        p50, p90, p99 = RPC_LATENCY[row]
        ax.plot([p50, p99], [i, i], color="0.7", lw=1, zorder=1)
        ax.scatter([p50], [i], color="C0", zorder=2, label="p50" if i == 0 else None)
        ax.scatter([p90], [i], color="C1", marker="s", zorder=2, label="p90" if i == 0 else None)
        ax.scatter([p99], [i], color="C3", marker="^", zorder=2, label="p99" if i == 0 else None)
    ax.set_yticks(range(len(rows)), rows)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ticks = [0.05, 0.1, 0.2, 0.5, 1, 2, 5]
    ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
    ax.minorticks_off()
    ax.set_xlabel("ms per single-query search (log scale)")
    ax.set_title("RPC latency, 100k x 128 IVF-Flat, 2-core VM (2026-11-26 02:04)", fontsize=10)
    ax.legend(loc="upper right", fontsize=8)
    ax.grid(axis="x", which="both", color="0.9")
    save(fig, path)


def family_p50(plt: object, path: Path) -> None:
    """Single-query p50 at recall@10 >= 0.95 against corpus size: auto against raw FAISS."""
    fig, axes = plt.subplots(1, 2, figsize=(7, 3), sharey=True)  # type: ignore[attr-defined]
    names = ("faissq auto (autotuned)", "raw IVF-Flat (oracle nprobe)", "raw HNSW32 (oracle ef)")
    for ax, (kind, by_n) in zip(axes, FAMILY_P50.items(), strict=True):
        sizes = sorted(by_n)
        for j, name in enumerate(names):
            ax.plot(sizes, [by_n[n][j] for n in sizes], marker="osd"[j], label=name)
        ax.set_xscale("log")
        ax.set_xticks(sizes, [f"{n // 1000}k" for n in sizes])
        ax.minorticks_off()
        ax.set_title(kind, fontsize=10)
        ax.set_xlabel("vectors (384-d)")
        ax.grid(color="0.9")
    axes[0].set_ylabel("p50 ms at recall@10 >= 0.95")
    axes[1].legend(fontsize=7, loc="upper left")
    save(fig, path)


def save(fig: object, path: Path) -> None:
    """Write one SVG without a date in it."""
    fig.tight_layout()  # type: ignore[attr-defined]
    fig.savefig(path, format="svg", metadata={"Date": None})  # type: ignore[attr-defined]
    print(f"wrote {path} ({path.stat().st_size:,} bytes)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=IMG, help="folder for the SVG files")
    args = ap.parse_args()
    import matplotlib

    matplotlib.use("svg")
    matplotlib.rcParams["svg.fonttype"] = "none"  # text as text: small files
    matplotlib.rcParams["svg.hashsalt"] = "faissq"  # stable element ids across runs
    import matplotlib.pyplot as plt

    args.out.mkdir(parents=True, exist_ok=True)
    rpc_latency(plt, args.out / "rpc-latency.svg")
    family_p50(plt, args.out / "family-p50.svg")


if __name__ == "__main__":
    main()
