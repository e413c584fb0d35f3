"""An IVF build on given coarse centroids: used as they are, refused where they cannot fit."""

from __future__ import annotations

import numpy as np
import pytest

from faissq.config import IndexSettings
from faissq.errors import InvalidParameter
from faissq.index.builder import train_centroids
from faissq.index.engine import Engine
from faissq.index.params import ivf_of
from faissq.index.policy import nlist_for

DIM = 16


def test_ivf_build_uses_given_centroids_and_refuses_other_families() -> None:
    """The quantizer holds exactly the centroids (nlist from their rows); flat, OPQ and a
    wrong dimension are InvalidParameter."""
    x = np.random.default_rng(0).standard_normal((4000, DIM)).astype(np.float32)
    cfg = IndexSettings()
    cents = train_centroids(x, cfg, "cosine")
    assert cents.shape == (nlist_for(4000, cfg)[0], DIM)
    assert np.allclose(np.linalg.norm(cents, axis=1), 1, atol=1e-4)  # spherical under cosine
    eng = Engine(DIM, cfg)
    report = eng.build(x, np.arange(4000), family="ivf_flat", centroids=cents[:50])
    assert report["factory"] == "IVF50,Flat"
    ivf = ivf_of(eng.state.primary.index)
    assert ivf is not None
    assert np.array_equal(ivf.quantizer.reconstruct_n(0, ivf.nlist), cents[:50])
    assert eng.search(x[:5], 1, nprobe=50).ids[:, 0].tolist() == [0, 1, 2, 3, 4]
    for family, given in [("flat", cents), ("ivf_pq", cents), ("ivf_flat", cents[:, :8])]:
        with pytest.raises(InvalidParameter):
            eng.build(x, np.arange(4000), family=family, centroids=given)
