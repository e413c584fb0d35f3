"""Attribute fields stored with the vectors: declared types, checked columns, and a table by id.

An index declares up to MAX_FIELDS fields, each `int64` or `keyword`. A batch carries one column
per field (missing fields and None values are null). The table keeps every live id of the index
with its values as int64 columns (keywords as codes into an append-only vocabulary), in a large
sorted base plus a small sorted overlay of recent rows, so an upsert costs O(batch + overlay)
and the base is rewritten only once the overlay passes a fraction of it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, Literal

import msgpack
import numpy as np
import numpy.typing as npt

from faissq.errors import InvalidAttributes
from faissq.index.validate import I64

AttrType = Literal["int64", "keyword"]
Schema = dict[str, AttrType]
TYPES: tuple[AttrType, ...] = ("int64", "keyword")
NULL = np.iinfo(np.int64).min  # a missing value; refused as a stored int64
MAX_FIELDS = 16
MAX_KEYWORD_BYTES = 256
COMPACT_MIN = 4096  # overlay + removed rows tolerated before the base is rewritten ...
COMPACT_FRACTION = 0.25  # ... or this share of the base, whichever is larger
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")
_EMPTY: I64 = np.empty(0, dtype=np.int64)
Columns = dict[str, I64]  # field -> int64 values (keywords as vocabulary codes), NULL = missing


def check_schema(spec: Any) -> Schema:
    """Validate a declaration ({name: "int64" | "keyword"}; None or [] = no fields)."""
    if spec is None or (isinstance(spec, list | tuple | dict) and not spec):
        return {}
    if not isinstance(spec, Mapping):
        raise InvalidAttributes(f"attributes must map field names to types, got {spec!r}")
    if len(spec) > MAX_FIELDS:
        raise InvalidAttributes(f"at most {MAX_FIELDS} attribute fields, got {len(spec)}")
    out: Schema = {}
    for name, kind in spec.items():
        if not isinstance(name, str) or not _NAME.match(name):
            raise InvalidAttributes(f"attribute name {name!r} must match {_NAME.pattern}")
        if kind not in TYPES:
            raise InvalidAttributes(f"attribute {name!r} has type {kind!r}; types: int64, keyword")
        out[name] = kind
    return out


class Vocab:
    """Keyword <-> code for one field; append-only, so a code never changes meaning and older
    tables read the same words (the single writer adds, readers only look up)."""

    def __init__(self, words: list[str] | None = None) -> None:
        self.words: list[str] = list(words or [])
        self.codes: dict[str, int] = {w: i for i, w in enumerate(self.words)}

    def code(self, word: str) -> int | None:
        """The code of a word, None when no row ever held it."""
        return self.codes.get(word)

    def add(self, values: list[str | None]) -> I64:
        """Codes of values (NULL for None), adding new words."""
        out = np.empty(len(values), dtype=np.int64)
        for i, w in enumerate(values):
            if w is None:
                out[i] = NULL
                continue
            c = self.codes.get(w)
            if c is None:
                c = self.codes[w] = len(self.words)
                self.words.append(w)
            out[i] = c
        return out


def check_batch(schema: Schema, raw: Any, n: int) -> dict[str, Any]:
    """Validate a batch's columns: int64 fields -> int64 arrays (NULL for None), keyword fields
    -> lists of str or None; every declared field present (all null when not given)."""
    if raw is None:
        raw = {}
    if not schema:
        if raw:
            raise InvalidAttributes("this index declares no attribute fields")
        return {}
    if not isinstance(raw, Mapping):
        raise InvalidAttributes(f"attributes must map field names to columns, got {type(raw)}")
    unknown = sorted(str(k) for k in raw if k not in schema)
    if unknown:
        raise InvalidAttributes(f"unknown attribute field(s) {unknown}; declared: {list(schema)}")
    out: dict[str, Any] = {}
    for name, kind in schema.items():
        col = raw.get(name)
        if col is None:
            out[name] = np.full(n, NULL, np.int64) if kind == "int64" else [None] * n
        elif kind == "int64":
            out[name] = _int_column(name, col, n)
        else:
            out[name] = _keyword_column(name, col, n)
    return out


def _int_column(name: str, col: Any, n: int) -> I64:
    """An int64 field's column from a list of ints / None or an int64 array."""
    if isinstance(col, np.ndarray):
        if col.dtype != np.int64 or col.shape != (n,):
            raise InvalidAttributes(f"attribute {name!r}: want {n} int64 values, got "
                                    f"{col.dtype} {col.shape}")  # fmt: skip
        arr = col
    else:
        if not isinstance(col, list | tuple) or len(col) != n:
            raise InvalidAttributes(f"attribute {name!r} must be a list of {n} values")
        if not all(v is None or (isinstance(v, int) and not isinstance(v, bool)) for v in col):
            raise InvalidAttributes(f"attribute {name!r} is int64: integers or null only")
        if any(v == NULL for v in col if v is not None):
            raise InvalidAttributes(f"attribute {name!r}: {NULL} is reserved for null")
        try:
            return np.array([NULL if v is None else v for v in col], dtype=np.int64)
        except OverflowError:
            raise InvalidAttributes(f"attribute {name!r}: a value does not fit in int64") from None
    if arr.size and bool((arr == NULL).any()):
        raise InvalidAttributes(f"attribute {name!r}: {NULL} is reserved for null")
    return np.ascontiguousarray(arr)


def _keyword_column(name: str, col: Any, n: int) -> list[str | None]:
    """A keyword field's column: a list of n strings (at most MAX_KEYWORD_BYTES UTF-8) or None."""
    if not isinstance(col, list | tuple) or len(col) != n:
        raise InvalidAttributes(f"attribute {name!r} must be a list of {n} values")
    for v in col:
        if v is None:
            continue
        if not isinstance(v, str):
            raise InvalidAttributes(f"attribute {name!r} is a keyword: strings or null only")
        if len(v) > MAX_KEYWORD_BYTES and len(v.encode()) > MAX_KEYWORD_BYTES:
            raise InvalidAttributes(f"attribute {name!r}: a keyword over {MAX_KEYWORD_BYTES} bytes")
    return list(col)


def encode_batch(batch: Mapping[str, Any]) -> bytes:
    """A checked batch as msgpack (int64 columns as raw little-endian bytes, keywords as lists)
    for the update log; b"" when the index has no fields."""
    if not batch:
        return b""
    doc = {k: (v.astype("<i8").tobytes() if isinstance(v, np.ndarray) else list(v))
           for k, v in batch.items()}  # fmt: skip
    return bytes(msgpack.packb(doc, use_bin_type=True))


def decode_batch(data: bytes | memoryview) -> dict[str, Any]:
    """The inverse of encode_batch (a log entry's attribute section)."""
    if not len(data):
        return {}
    doc = msgpack.unpackb(bytes(data), raw=False)
    if not isinstance(doc, dict):
        raise InvalidAttributes("an attribute section is not a map")
    return {k: (np.frombuffer(v, dtype="<i8").astype(np.int64) if isinstance(v, bytes) else v)
            for k, v in doc.items()}  # fmt: skip


def columns_for(schema: Schema, batch: Mapping[str, Any]) -> dict[str, Any]:
    """A checked (logged) batch as columns check_batch takes again under `schema`: int64 nulls
    as None, all-null columns left out, and fields no longer declared (or of another type) left
    out, so a log written under an older declaration still replays."""
    out: dict[str, Any] = {}
    for name, col in batch.items():
        kind = schema.get(name)
        if kind == "int64" and isinstance(col, np.ndarray) and col.dtype == np.int64:
            null = col == NULL
            if null.all():
                continue
            out[name] = ([None if v == NULL else v for v in col.tolist()]
                         if null.any() else col)  # fmt: skip
        elif kind == "keyword" and isinstance(col, list):
            out[name] = col
    return out


def _in_sorted(sorted_arr: I64, ids: I64) -> npt.NDArray[np.bool_]:
    if sorted_arr.size == 0 or ids.size == 0:
        return np.zeros(ids.shape, dtype=bool)
    pos = np.minimum(np.searchsorted(sorted_arr, ids), sorted_arr.size - 1)
    return np.asarray(sorted_arr[pos] == ids)


class AttrTable:
    """The attribute values of every live id; immutable, each change returns a new table."""

    __slots__ = ("_cache", "base_cols", "base_ids", "gone", "over_cols", "over_ids", "schema",
                 "vocab")  # fmt: skip

    def __init__(self, schema: Schema, vocab: dict[str, Vocab] | None = None) -> None:
        """An empty table of these fields."""
        self.schema = schema
        self.vocab = (
            vocab
            if vocab is not None
            else {k: Vocab() for k, t in schema.items() if t == "keyword"}
        )
        self.base_ids: I64 = _EMPTY
        self.base_cols: Columns = {k: _EMPTY for k in schema}
        self.over_ids: I64 = _EMPTY
        self.over_cols: Columns = {k: _EMPTY for k in schema}
        self.gone: I64 = _EMPTY  # sorted base ids deleted or replaced by the overlay
        self._cache: dict[Any, Any] = {}

    def _new(self, base: tuple[I64, Columns], over: tuple[I64, Columns], gone: I64) -> AttrTable:
        out = AttrTable(self.schema, self.vocab)
        out.base_ids, out.base_cols = base
        out.over_ids, out.over_cols = over
        out.gone = gone
        if over[0].size + gone.size > max(COMPACT_MIN, COMPACT_FRACTION * base[0].size):
            return out.compacted()
        return out

    def __len__(self) -> int:
        """Live ids."""
        return int(self.base_ids.size - self.gone.size + self.over_ids.size)

    def codes(self, batch: Mapping[str, Any]) -> Columns:
        """A checked batch as int64 columns (new keywords join the vocabulary)."""
        out: Columns = {}
        for k, t in self.schema.items():
            if t == "keyword":
                out[k] = self.vocab[k].add(list(batch[k]))
            else:
                out[k] = np.asarray(batch[k], dtype=np.int64)
        return out

    def built(self, ids: I64, batch: Mapping[str, Any]) -> AttrTable:
        """A fresh table of exactly these rows (a build)."""
        fresh = AttrTable(self.schema)
        cols = fresh.codes(batch)
        order = np.argsort(ids, kind="stable")
        base = (np.ascontiguousarray(ids[order]), {k: v[order] for k, v in cols.items()})
        return fresh._new(base, (_EMPTY, {k: _EMPTY for k in self.schema}), _EMPTY)

    def upserted(self, ids: I64, batch: Mapping[str, Any]) -> AttrTable:
        """These rows added or replaced (ids unique within the batch)."""
        if ids.size == 0:
            return self
        cols = self.codes(batch)
        keep = ~_in_sorted(np.sort(ids), self.over_ids)
        over_ids = np.concatenate([self.over_ids[keep], ids])
        order = np.argsort(over_ids, kind="stable")
        merged = {k: np.concatenate([self.over_cols[k][keep], cols[k]])[order] for k in cols}
        over = (over_ids[order], merged)
        return self._new((self.base_ids, self.base_cols), over, self._gone_with(ids))

    def without(self, ids: I64) -> AttrTable:
        """These ids removed (unknown ones ignored)."""
        if ids.size == 0 or len(self) == 0:
            return self
        keep = ~_in_sorted(np.unique(ids), self.over_ids)
        over = (self.over_ids[keep], {k: v[keep] for k, v in self.over_cols.items()})
        return self._new((self.base_ids, self.base_cols), over, self._gone_with(ids))

    def _gone_with(self, ids: I64) -> I64:
        hit = np.unique(ids[_in_sorted(self.base_ids, ids)])
        return np.union1d(self.gone, hit).astype(np.int64) if hit.size else self.gone

    def compacted(self) -> AttrTable:
        """The same rows with the overlay folded into the base."""
        ids, cols = self.rows()
        out = AttrTable(self.schema, self.vocab)
        out.base_ids, out.base_cols = ids, cols
        out.over_cols = {k: _EMPTY for k in self.schema}
        return out

    def rows(self) -> tuple[I64, Columns]:
        """Every live id (sorted) and its columns."""
        live = self.base_live()
        ids = np.concatenate([self.base_ids[live], self.over_ids])
        order = np.argsort(ids, kind="stable")
        cols = {k: np.concatenate([self.base_cols[k][live], self.over_cols[k]])[order]
                for k in self.schema}  # fmt: skip
        return ids[order], cols

    def base_live(self) -> npt.NDArray[np.bool_]:
        """Which base rows are still live (computed once per table)."""
        live = self._cache.get("live")
        if live is None:
            live = self._cache["live"] = ~_in_sorted(self.gone, self.base_ids)
        return live

    def values_of(self, ids: I64) -> dict[str, list[Any]]:
        """Each field's value for each id (None where null or the id has no row)."""
        out: dict[str, list[Any]] = {}
        pos_o = _positions(self.over_ids, ids)
        pos_b = _positions(self.base_ids, ids)
        pos_b[_in_sorted(self.gone, ids)] = -1
        for k, t in self.schema.items():
            vals = np.full(ids.size, NULL, dtype=np.int64)
            b, o = pos_b >= 0, pos_o >= 0
            vals[b] = self.base_cols[k][pos_b[b]]
            vals[o] = self.over_cols[k][pos_o[o]]
            words = self.vocab[k].words if t == "keyword" else None
            out[k] = [None if v == NULL else (words[v] if words is not None else int(v))
                      for v in vals.tolist()]  # fmt: skip
        return out

    def to_bytes(self) -> bytes:
        """The whole table as msgpack (snapshots): sorted ids, int64 columns, keyword words."""
        ids, cols = self.rows()
        doc = {"ids": ids.astype("<i8").tobytes(),
               "cols": {k: v.astype("<i8").tobytes() for k, v in cols.items()},
               "vocab": {k: v.words for k, v in self.vocab.items()}}  # fmt: skip
        return bytes(msgpack.packb(doc, use_bin_type=True))

    @classmethod
    def from_bytes(cls, schema: Schema, data: bytes) -> AttrTable:
        """A table saved by to_bytes (fields the schema no longer declares are dropped)."""
        doc = msgpack.unpackb(data, raw=False)
        vocab = {k: Vocab(doc["vocab"].get(k)) for k, t in schema.items() if t == "keyword"}
        out = cls(schema, vocab)
        ids = np.frombuffer(doc["ids"], dtype="<i8").astype(np.int64)
        cols = doc["cols"]
        out.base_ids = ids
        stored_keywords = set(doc["vocab"])
        out.base_cols = {}
        for k, t in schema.items():
            # a field declared again with another type starts null: codes are not numbers
            same_type = (t == "keyword") == (k in stored_keywords)
            if k in cols and same_type:
                out.base_cols[k] = np.frombuffer(cols[k], dtype="<i8").astype(np.int64)
            else:
                out.base_cols[k] = np.full(ids.size, NULL, np.int64)
        return out

    def covering(self, ids: I64) -> AttrTable:
        """This table plus a null row for each of ids it holds no row for (a snapshot written
        before its index declared these fields)."""
        have = _in_sorted(self.base_ids, ids) & ~_in_sorted(self.gone, ids)
        missing = ids[~(have | _in_sorted(self.over_ids, ids))]
        if missing.size == 0:
            return self
        return self.upserted(missing, check_batch(self.schema, None, int(missing.size)))


def _positions(sorted_ids: I64, ids: I64) -> npt.NDArray[np.intp]:
    """Index of each id in a sorted array, -1 where absent."""
    if sorted_ids.size == 0 or ids.size == 0:
        return np.full(ids.shape, -1, dtype=np.intp)
    pos = np.minimum(np.searchsorted(sorted_ids, ids), sorted_ids.size - 1)
    return np.where(sorted_ids[pos] == ids, pos, -1)
