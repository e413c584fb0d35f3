"""Search filters on attribute fields: checked once per request, evaluated to the sorted ids that
pass, which the engine hands to FAISS as a selector (or scans exactly when few pass).

    {"field": "tenant", "eq": 7}                    equality
    {"field": "lang", "in": ["en", "de"]}           membership (at most MAX_IN values)
    {"field": "created_at", "gte": 10, "lt": 20}    range (int64 fields; gt, gte, lt, lte)
    {"and": [f, ...]}, {"or": [f, ...]}, {"not": f}

A null (missing) value matches no condition on its field; `not` inverts, so it matches nulls.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from faissq.errors import InvalidFilter
from faissq.index.attributes import MAX_KEYWORD_BYTES, NULL, AttrTable, Columns, Schema
from faissq.index.validate import I64

MAX_NODES = 256  # conditions and operators in one filter
MAX_DEPTH = 16
MAX_IN = 1024  # values in one `in`
RANGE_OPS = ("gt", "gte", "lt", "lte")
_CACHED = 32  # filter results kept per attribute table (tables are immutable) ...
_CACHED_BYTES = 64 << 20  # ... holding at most this many bytes of ids
_INT_MAX = int(np.iinfo(np.int64).max)
Mask = npt.NDArray[np.bool_]


@dataclass(frozen=True)
class Filter:
    """A checked filter: a tree of ("in", field, values) / ("range", field, lo, hi) /
    ("and" | "or", children) / ("not", child), and a key naming it for caches."""

    node: tuple[Any, ...]
    key: str


def compile_filter(expr: Any, schema: Schema) -> Filter:
    """Check a filter against the declared fields; InvalidFilter names the first problem."""
    if not schema:
        raise InvalidFilter("this index declares no attribute fields to filter on")
    count = [0]
    node = _node(expr, schema, 1, count)
    return Filter(node, repr(node))


def _node(expr: Any, schema: Schema, depth: int, count: list[int]) -> tuple[Any, ...]:
    count[0] += 1
    if count[0] > MAX_NODES:
        raise InvalidFilter(f"a filter holds at most {MAX_NODES} conditions and operators")
    if depth > MAX_DEPTH:
        raise InvalidFilter(f"a filter nests at most {MAX_DEPTH} levels")
    if not isinstance(expr, Mapping):
        raise InvalidFilter(f"a filter is a map, got {type(expr).__name__}")
    if "field" in expr:
        return _condition(expr, schema)
    if len(expr) != 1:
        raise InvalidFilter(f"an operator map holds one of and, or, not; got {sorted(expr)}")
    ((op, arg),) = expr.items()
    if op == "not":
        return ("not", _node(arg, schema, depth + 1, count))
    if op not in ("and", "or"):
        raise InvalidFilter(f"unknown filter operator {op!r}: and, or, not, or a field condition")
    if not isinstance(arg, list | tuple) or not arg:
        raise InvalidFilter(f"{op!r} takes a non-empty list of filters")
    # and / or do not depend on order: sorted children give one cache key per condition set
    return (op, tuple(sorted((_node(a, schema, depth + 1, count) for a in arg), key=repr)))


def _condition(expr: Mapping[str, Any], schema: Schema) -> tuple[Any, ...]:
    name = expr["field"]
    if not isinstance(name, str) or name not in schema:
        raise InvalidFilter(f"unknown attribute field {name!r}; declared: {list(schema)}")
    kind = schema[name]
    ops = sorted(k for k in expr if k != "field")
    if ops == ["eq"]:
        return ("in", name, (_value(name, kind, expr["eq"]),))
    if ops == ["in"]:
        vals = expr["in"]
        if not isinstance(vals, list | tuple) or len(vals) > MAX_IN:
            raise InvalidFilter(f"{name!r}: 'in' takes a list of at most {MAX_IN} values")
        return ("in", name, tuple(sorted({_value(name, kind, v) for v in vals})))
    if ops and all(op in RANGE_OPS for op in ops):
        if kind != "int64":
            raise InvalidFilter(f"{name!r} is a keyword: ranges need an int64 field")
        lo, hi = NULL + 1, _INT_MAX
        for op in ops:
            v = _value(name, kind, expr[op])
            if op in ("gt", "gte"):
                lo = max(lo, v + 1 if op == "gt" else v)
            else:
                hi = min(hi, v - 1 if op == "lt" else v)
        return ("range", name, lo, hi)
    bounds = ", ".join(RANGE_OPS)
    raise InvalidFilter(f"{name!r}: a condition is eq, in, or range bounds ({bounds}); got {ops}")


def _value(name: str, kind: str, v: Any) -> Any:
    if kind == "int64":
        if isinstance(v, bool) or not isinstance(v, int) or not NULL < v <= _INT_MAX:
            raise InvalidFilter(f"{name!r} is int64: {v!r} is not an integer in its range")
        return v
    if not isinstance(v, str) or len(v.encode()) > MAX_KEYWORD_BYTES:
        raise InvalidFilter(f"{name!r} is a keyword: {v!r} is not a string of at most "
                            f"{MAX_KEYWORD_BYTES} bytes")  # fmt: skip
    return v


def filtered_allow(table: AttrTable | None, schema: Schema, expr: Any, allow: I64 | None) -> I64:
    """The sorted ids a search may return: those passing the filter (and in allow, if given)."""
    flt = expr if isinstance(expr, Filter) else compile_filter(expr, schema)
    if table is None:
        raise InvalidFilter("this index declares no attribute fields to filter on")
    passing = select(table, flt)
    if allow is None:
        return passing
    return np.intersect1d(passing, allow, assume_unique=True)


def select(table: AttrTable, flt: Filter) -> I64:
    """Sorted ids of the table's rows that pass the filter (cached per table and filter)."""
    key = ("filter", flt.key)
    hit = table._cache.get(key)
    if hit is not None:
        return hit  # type: ignore[no-any-return]
    base = evaluate(flt.node, table, table.base_cols, table.base_ids.size) & table.base_live()
    over = evaluate(flt.node, table, table.over_cols, table.over_ids.size)
    ids = np.concatenate([table.base_ids[base], table.over_ids[over]])
    ids.sort(kind="stable")  # two sorted runs: a linear merge
    held = [v for k, v in table._cache.items() if k[0] == "filter"]
    if len(held) < _CACHED and sum(h.nbytes for h in held) + ids.nbytes <= _CACHED_BYTES:
        table._cache[key] = ids
    return ids


def evaluate(node: tuple[Any, ...], table: AttrTable, cols: Columns, n: int) -> Mask:
    """Which of n rows (columns `cols` of `table`) pass `node`."""
    op = node[0]
    if op == "in":
        col = cols[node[1]]
        vals = _codes(table, node[1], node[2])
        if not vals:
            return np.zeros(n, dtype=bool)
        if len(vals) == 1:
            return np.asarray(col == vals[0])
        return np.isin(col, np.asarray(vals, dtype=np.int64))
    if op == "range":
        col = cols[node[1]]
        return np.asarray((col >= node[2]) & (col <= node[3]))
    if op == "not":
        return ~evaluate(node[1], table, cols, n)
    out = evaluate(node[1][0], table, cols, n)
    for child in node[1][1:]:
        out = (
            (out & evaluate(child, table, cols, n))
            if op == "and"
            else (out | evaluate(child, table, cols, n))
        )
    return out


def _codes(table: AttrTable, name: str, values: tuple[Any, ...]) -> list[int]:
    """A condition's values as stored codes (keywords no row holds drop out)."""
    vocab = table.vocab.get(name)
    if vocab is None:
        return list(values)
    return [c for c in (vocab.code(v) for v in values) if c is not None]
