"""The family p50 figure of docs/benchmarks.md as a small SVG under docs/img/, from its table.

The RPC latency histogram and the recall-latency curves are drawn by benchmarks/rpc.py and
benchmarks/family.py from their own runs.

    python benchmarks/plots.py        # needs matplotlib (the dev or bench extra)

The numbers below are copied from the tables of docs/benchmarks.md; change both together when a
benchmark is run again. Text stays text in the SVG (no embedded glyphs), and the files carry no
date, so a rerun over the same figures changes nothing.
"""

from __future__ import annotations

import argparse
from pathlib import Path

IMG = Path(__file__).resolve().parent.parent / "docs" / "img"

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
    family_p50(plt, args.out / "family-p50.svg")


if __name__ == "__main__":
    main()
