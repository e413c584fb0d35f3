"""Bad input: every case is a named permanent error and the index is left unchanged."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from engine_support import data, engine

from faissq.config import IndexSettings
from faissq.errors import (
    DimensionMismatch,
    EmptyBuild,
    InvalidIds,
    InvalidParameter,
    InvalidVectors,
    PermanentError,
)
from faissq.index.engine import Engine

GOOD = data(4, 32, seed=5)


def _nan() -> np.ndarray:
    x = GOOD.copy()
    x[1, 3] = np.nan
    return x


def _inf() -> np.ndarray:
    x = GOOD.copy()
    x[2, 0] = np.inf
    return x


def _zero() -> np.ndarray:
    x = GOOD.copy()
    x[0] = 0
    return x


BAD_UPSERTS: list[tuple[str, Any, Any, type[Exception]]] = [
    ("wrong dim", [1, 2, 3, 4], data(4, 16), DimensionMismatch),
    ("1-D", [1], GOOD[0], InvalidVectors),
    ("3-D", [1], GOOD[None], InvalidVectors),
    ("strings", [1, 2], np.array([["a"] * 32] * 2), InvalidVectors),
    ("complex", [1, 2, 3, 4], GOOD.astype(np.complex64), InvalidVectors),
    ("NaN", [1, 2, 3, 4], _nan(), InvalidVectors),
    ("Inf", [1, 2, 3, 4], _inf(), InvalidVectors),
    ("float64 overflow", [1, 2, 3, 4], GOOD.astype(np.float64) * 1e300, InvalidVectors),
    ("zero vector under cosine", [1, 2, 3, 4], _zero(), InvalidVectors),
    ("ids length", [1, 2, 3], GOOD, InvalidIds),
    ("duplicate ids", [1, 2, 2, 3], GOOD, InvalidIds),
    ("float ids", [1.5, 2, 3, 4], GOOD, InvalidIds),
    ("negative ids", [-1, 2, 3, 4], GOOD, InvalidIds),
    ("2-D ids", [[1, 2, 3, 4]], GOOD, InvalidIds),
]


@pytest.mark.parametrize(
    ("case", "ids", "vectors", "error"), BAD_UPSERTS, ids=[c[0] for c in BAD_UPSERTS]
)
def test_bad_upsert_is_named_and_changes_nothing(
    case: str, ids: Any, vectors: Any, error: type[Exception]
) -> None:
    eng, xb, _ = engine(300, family="flat")
    before = (eng.version, eng.ntotal, eng.search(xb[:3], 5).ids.copy())
    with pytest.raises(error) as info:
        eng.upsert(ids, vectors)
    assert isinstance(info.value, PermanentError)
    assert (eng.version, eng.ntotal) == before[:2]
    assert np.array_equal(eng.search(xb[:3], 5).ids, before[2])


def test_integer_vectors_are_cast_safely() -> None:
    eng, _, _ = engine(300, family="flat")
    eng.upsert([1, 2], np.arange(64).reshape(2, 32) + 1)
    assert eng.contains([1, 2]).all()


def test_zero_vectors_are_fine_under_l2() -> None:
    eng, _, _ = engine(300, family="flat", metric="l2")
    eng.upsert([1], np.zeros((1, 32)))
    assert eng.search(np.zeros((1, 32)), 1).ids[0, 0] == 1


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"k": 0}, InvalidParameter),
        ({"k": -3}, InvalidParameter),
        ({"k": 10_000}, InvalidParameter),
        ({"k": 2.5}, InvalidParameter),
        ({"k": True}, InvalidParameter),
        ({"k": 5, "nprobe": 0}, InvalidParameter),
        ({"k": 5, "nprobe": -1}, InvalidParameter),
        ({"k": 5, "ef_search": 0}, InvalidParameter),
        ({"k": 5, "k_factor": 0}, InvalidParameter),
        ({"k": 5, "target_recall": 1.5}, InvalidParameter),
        ({"k": 5, "allow_ids": [1.5]}, InvalidIds),
    ],
)
def test_bad_search_parameters(kwargs: dict[str, Any], error: type[Exception]) -> None:
    eng, xb, _ = engine(300, family="flat")
    with pytest.raises(error):
        eng.search(xb[:2], **kwargs)


def test_bad_queries() -> None:
    eng, _, _ = engine(300, family="flat")
    with pytest.raises(DimensionMismatch):
        eng.search(data(2, 8), 3)
    with pytest.raises(InvalidVectors):
        eng.search(_nan(), 3)


def test_empty_build_and_failed_build_keep_previous_index() -> None:
    eng, _xb, ids = engine(300, family="flat")
    with pytest.raises(EmptyBuild):
        eng.build(np.empty((0, 32), np.float32), np.empty(0, np.int64))
    with pytest.raises(InvalidIds):
        eng.build(data(10), [1] * 10)
    assert eng.ntotal == 300 and eng.contains(ids[:3]).all()


def test_dimension_must_be_positive() -> None:
    with pytest.raises(InvalidParameter):
        Engine(0, IndexSettings())


def test_huge_finite_vectors_normalise_under_cosine() -> None:
    eng, _, _ = engine(300, family="flat")
    big = GOOD[:1].astype(np.float64) * 1e37
    eng.upsert([1], big)
    res = eng.search(GOOD[:1], 1)
    assert res.ids[0, 0] == 1 and abs(res.scores[0, 0] - 1) < 1e-5
