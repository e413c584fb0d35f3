"""Attribute fields and filtered search in the engine: typed refusals, exact filtered top-k on
Flat, IVF and HNSW, the table against a plain dict model, snapshots, the GPU seam."""

from __future__ import annotations

from typing import Any

import faiss
import numpy as np
import pytest
from engine_support import data

from faissq.config import IndexSettings
from faissq.errors import InvalidAttributes, InvalidFilter
from faissq.index.attributes import NULL, AttrTable, check_schema
from faissq.index.engine import Engine
from faissq.index.filters import compile_filter, select
from faissq.index.gpu import GpuCopy

SCHEMA = {"tenant": "int64", "lang": "keyword"}
LANGS = ["en", "de", "fr", None]


def _engine(
    n: int = 3000, family: str = "flat", **cfg: Any
) -> tuple[Engine, np.ndarray, dict[str, Any]]:
    xb = data(n, 16)
    rng = np.random.default_rng(3)
    attrs = {"tenant": rng.integers(0, 100, n).tolist(), "lang": [LANGS[i % 4] for i in range(n)]}
    eng = Engine(16, IndexSettings(metric="l2", attributes=SCHEMA, **cfg))  # type: ignore[arg-type]
    eng.build(xb, np.arange(n, dtype=np.int64), family=family, attributes=attrs)
    return eng, xb, attrs


def _truth(xb: np.ndarray, passing: np.ndarray, xq: np.ndarray, k: int) -> np.ndarray:
    """Exact filtered top-k ids by brute force in numpy."""
    ids = np.flatnonzero(passing)
    d = ((xq[:, None, :] - xb[ids][None]) ** 2).sum(-1)
    return ids[np.argsort(d, axis=1, kind="stable")[:, :k]]


@pytest.mark.parametrize("spec", [{"bad name": "int64"}, {"x": "float"}, ["x"], "x",
                                  {f"f{i}": "int64" for i in range(17)}])  # fmt: skip
def test_bad_declarations_are_invalid_attributes(spec: Any) -> None:
    with pytest.raises(InvalidAttributes):
        check_schema(spec)


@pytest.mark.parametrize(
    "attrs",
    [
        {"tenant": [1, 2]},  # wrong length
        {"tenant": [True, 1, 2]},
        {"tenant": ["1", 2, 3]},
        {"tenant": [2**63, 1, 2]},
        {"tenant": [NULL, 1, 2]},  # the null sentinel is reserved
        {"lang": [1, "en", "de"]},
        {"lang": ["x" * 300, "en", "de"]},
        {"colour": ["red", "red", "red"]},
        ["en", "de", "fr"],
    ],
)
def test_a_bad_batch_is_refused_and_changes_nothing(attrs: Any) -> None:
    eng, _, _ = _engine(200)
    before = eng.version, eng.attributes_of([0, 1, 2])
    with pytest.raises(InvalidAttributes):
        eng.upsert([0, 1, 2], data(3, 16), attributes=attrs)
    assert (eng.version, eng.attributes_of([0, 1, 2])) == before


def test_attributes_on_an_index_without_fields_are_refused() -> None:
    eng = Engine(16, IndexSettings(metric="l2"))
    with pytest.raises(InvalidAttributes):
        eng.build(data(10, 16), np.arange(10), attributes={"tenant": [1] * 10})
    eng.build(data(10, 16), np.arange(10))
    with pytest.raises(InvalidFilter):
        eng.search(data(1, 16), 3, filter={"field": "tenant", "eq": 1})


@pytest.mark.parametrize(
    "flt",
    [
        {"field": "colour", "eq": "red"},
        {"field": "tenant", "eq": True},
        {"field": "tenant", "eq": 1.5},
        {"field": "tenant", "eq": 2**63},
        {"field": "lang", "gte": "a"},  # ranges need int64
        {"field": "tenant", "like": 3},
        {"field": "tenant", "eq": 1, "in": [1]},
        {"field": "tenant", "in": list(range(1025))},
        {"xor": []},
        {"and": []},
        {"and": [{"field": "tenant", "eq": 1}], "or": []},
        [{"field": "tenant", "eq": 1}],
        {"or": [{"field": "tenant", "eq": i} for i in range(300)]},
        {
            "not": {
                "not": {
                    "not": {
                        "not": {
                            "not": {
                                "not": {
                                    "not": {
                                        "not": {
                                            "not": {
                                                "not": {
                                                    "not": {
                                                        "not": {
                                                            "not": {
                                                                "not": {
                                                                    "not": {
                                                                        "not": {
                                                                            "field": "tenant",
                                                                            "eq": 1,
                                                                        }
                                                                    }
                                                                }
                                                            }
                                                        }
                                                    }
                                                }
                                            }
                                        }
                                    }
                                }
                            }
                        }
                    }
                }
            }
        },
    ],
)
def test_bad_filters_are_invalid_filter(flt: Any) -> None:
    eng, _, _ = _engine(200)
    with pytest.raises(InvalidFilter):
        eng.search(data(1, 16), 3, filter=flt)


@pytest.mark.parametrize("family", ["flat", "ivf_flat", "hnsw"])
def test_filtered_top_k_is_exact_with_respect_to_the_filter(family: str) -> None:
    """Every selectivity, routed exactly (few rows) or through FAISS's selector (many)."""
    eng, xb, attrs = _engine(4000, family, filter_exact_rows=100)
    tenant = np.asarray(attrs["tenant"])
    lang = np.asarray([x or "" for x in attrs["lang"]])
    xq = data(20, 16, seed=5)
    cases = [
        ({"field": "tenant", "lt": 50}, tenant < 50),
        ({"field": "tenant", "in": list(range(3, 13))}, (tenant >= 3) & (tenant <= 12)),
        ({"and": [{"field": "lang", "eq": "de"}, {"field": "tenant", "gte": 90}]},
         (lang == "de") & (tenant >= 90)),
        ({"or": [{"field": "tenant", "eq": 7}, {"not": {"field": "lang", "in": LANGS[:3]}}]},
         (tenant == 7) | (lang == "")),
        ({"field": "lang", "eq": "nowhere"}, np.zeros(tenant.size, dtype=bool)),
    ]  # fmt: skip
    for flt, passing in cases:
        got = eng.search(xq, 10, filter=flt).ids
        truth = _truth(xb, passing, xq, 10)
        assert np.isin(got[got >= 0], np.flatnonzero(passing)).all(), flt
        want = min(10, int(passing.sum()))
        assert ((got >= 0).sum(axis=1) == want).all(), flt  # no holes
        if not want:
            continue
        recall = np.mean(
            [np.intersect1d(g, t).size / max(want, 1) for g, t in zip(got, truth, strict=True)]
        )
        assert recall >= (1.0 if family == "flat" else 0.95), (flt, recall)


def test_upserts_and_deletes_change_what_a_filter_passes() -> None:
    eng, xb, _ = _engine(500)
    eng.upsert([1, 2], xb[[1, 2]], attributes={"tenant": [777, 777]})  # lang omitted: null
    eng.delete([2])
    eng.upsert([600], data(1, 16, seed=9), attributes={"tenant": [777], "lang": ["xx"]})
    got = eng.search(xb[[1]], 5, filter={"field": "tenant", "eq": 777}).ids[0]
    assert sorted(got[got >= 0].tolist()) == [1, 600]
    assert eng.attributes_of([1, 2, 600]) == {
        "tenant": [777, None, 777],
        "lang": [None, None, "xx"],
    }
    nulls = eng.search(
        xb[[1]], 5, filter={"not": {"field": "lang", "in": ["en", "de", "fr", "xx"]}}
    )
    assert 1 in nulls.ids[0]
    eng.merge()
    assert eng.attributes_of([1, 600])["tenant"] == [777, 777]


def test_a_filtered_range_search_is_the_unfiltered_one_cut_to_the_passing_ids() -> None:
    eng, xb, attrs = _engine(800)
    eng.upsert([900, 901], data(2, 16, seed=8), attributes={"tenant": [5, 6]})  # in the delta
    eng.delete([3])
    xq = np.concatenate([xb[[0, 1]], data(1, 16, seed=8)])
    radius = 40.0  # l2: catches about a fifth of the 800
    flt = {"field": "tenant", "in": [5, 6, 40]}
    passing = {i for i, t in enumerate(attrs["tenant"]) if t in (5, 6, 40)} | {900, 901}
    every_s, every_i = eng.range_search(xq, radius)
    got_s, got_i = eng.range_search(xq, radius, filter=flt)
    for row in range(3):
        keep = np.isin(every_i[row], sorted(passing))
        assert got_i[row].tolist() == every_i[row][keep].tolist() and got_i[row].size
        np.testing.assert_allclose(got_s[row], every_s[row][keep])
    none = eng.range_search(xq, radius, filter={"field": "lang", "eq": "nowhere"})
    assert [r.size for r in none[1]] == [0, 0, 0]
    with pytest.raises(InvalidFilter):
        eng.range_search(xq, radius, filter={"field": "colour", "eq": "red"})


def test_the_table_agrees_with_a_dict_model_through_many_changes_and_compactions() -> None:
    rng = np.random.default_rng(11)
    schema = check_schema({"a": "int64", "b": "keyword"})
    table, model = AttrTable(schema), {}
    for step in range(300):
        ids = np.unique(rng.integers(0, 5000, rng.integers(1, 200))).astype(np.int64)
        if step % 4 == 3:
            table = table.without(ids)
            for i in ids.tolist():
                model.pop(i, None)
            continue
        a = rng.integers(0, 10, ids.size).tolist()
        b = [str(x) if x < 5 else None for x in rng.integers(0, 7, ids.size)]
        table = table.upserted(ids, {"a": np.asarray(a, dtype=np.int64), "b": b})
        model.update({i: (x, y) for i, x, y in zip(ids.tolist(), a, b, strict=True)})
    assert len(table) == len(model)
    flt = compile_filter(
        {"and": [{"field": "a", "gte": 3}, {"field": "b", "in": ["1", "2"]}]}, schema
    )
    want = sorted(i for i, (x, y) in model.items() if x >= 3 and y in ("1", "2"))
    assert select(table, flt).tolist() == want
    restored = AttrTable.from_bytes(schema, table.to_bytes())
    assert select(restored, flt).tolist() == want
    some = np.asarray(sorted(model)[:50], dtype=np.int64)
    assert restored.values_of(some)["b"] == [model[i][1] for i in some.tolist()]


def test_attributes_survive_an_export_and_restore() -> None:
    eng, _, _ = _engine(300)
    eng.upsert([5], data(1, 16), attributes={"tenant": [4242], "lang": ["zz"]})
    copy = Engine.from_export(eng.export(), eng.cfg, version=eng.version)
    assert copy.attributes_of([5, 6]) == eng.attributes_of([5, 6])
    flt = {"field": "tenant", "eq": 4242}
    assert copy.search(data(1, 16), 3, filter=flt).ids.tolist() == [[5, -1, -1]]


class CpuDevice:
    """A stand-in GPU index: a CPU clone that ignores selectors, counting its calls."""

    def __init__(self, index: Any) -> None:
        self.index = faiss.clone_index(index)
        self.calls = 0

    def search(self, x: np.ndarray, k: int, params: Any = None) -> tuple[np.ndarray, np.ndarray]:
        self.calls += 1
        return self.index.search(x, k)  # type: ignore[no-any-return]


def test_filtered_searches_go_through_the_gpu_seam_without_holes() -> None:
    devices: list[CpuDevice] = []

    def cloner(index: Any) -> tuple[GpuCopy | None, str]:
        devices.append(CpuDevice(index))
        return GpuCopy(devices[-1], 2048), "test device"

    xb = data(3000, 16)
    tenant = np.arange(3000, dtype=np.int64) % 10
    eng = Engine(16, IndexSettings(metric="l2", family="flat", attributes={"tenant": "int64"},
                                   filter_exact_rows=0), cloner=cloner)  # fmt: skip
    eng.build(xb, np.arange(3000, dtype=np.int64), attributes={"tenant": tenant})
    xq = data(5, 16, seed=4)
    got = eng.search(xq, 10, filter={"field": "tenant", "lt": 5}).ids
    assert devices[-1].calls == 1  # half the rows pass: the device's over-fetch holds them
    np.testing.assert_array_equal(got, _truth(xb, tenant < 5, xq, 10))
    rare = {"field": "tenant", "eq": 3}
    got = eng.search(xq, 10, filter=rare).ids  # a tenth pass: over-fetch may fall short
    np.testing.assert_array_equal(got, _truth(xb, tenant == 3, xq, 10))


def test_a_snapshot_saved_before_fields_were_declared_restores_null_rows() -> None:
    """`not` matches nulls, so ids restored without values must still have (null) rows."""
    plain = Engine(16, IndexSettings(metric="l2", family="flat"))
    plain.build(data(50, 16), np.arange(50, dtype=np.int64))
    plain.upsert([70], data(1, 16, seed=8))
    declared = plain.cfg.model_copy(update={"attributes": {"tenant": "int64"}})
    eng = Engine.from_export(plain.export(), declared, version=plain.version)
    got = eng.search(data(1, 16), 100, filter={"not": {"field": "tenant", "eq": 1}}).ids[0]
    assert sorted(got[got >= 0].tolist()) == [*range(50), 70]


def test_a_field_declared_again_with_another_type_starts_null() -> None:
    schema = check_schema({"tag": "keyword"})
    table = AttrTable(schema).upserted(np.arange(3, dtype=np.int64), {"tag": ["a", "b", None]})
    retyped = AttrTable.from_bytes(check_schema({"tag": "int64"}), table.to_bytes())
    assert retyped.values_of(np.arange(3, dtype=np.int64)) == {"tag": [None, None, None]}
    same = AttrTable.from_bytes(schema, table.to_bytes())
    assert same.values_of(np.arange(3, dtype=np.int64)) == {"tag": ["a", "b", None]}


def test_the_same_conditions_in_another_order_share_one_cached_result() -> None:
    schema = check_schema(SCHEMA)
    a, b = {"field": "tenant", "gte": 3}, {"field": "lang", "in": ["en", "de"]}
    c = {"not": {"field": "tenant", "eq": 5}}
    one = compile_filter({"and": [a, {"or": [b, c]}]}, schema)
    other = compile_filter({"and": [{"or": [c, b]}, a]}, schema)
    assert one.key == other.key
    table = AttrTable(schema).upserted(
        np.arange(6, dtype=np.int64), {"tenant": np.arange(6, dtype=np.int64),
                                       "lang": ["en", "fr", "de", None, "en", "de"]}
    )  # fmt: skip
    assert select(table, one).tolist() == select(table, other).tolist() == [3, 4, 5]
    assert sum(k[0] == "filter" for k in table._cache) == 1
