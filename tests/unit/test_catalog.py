"""The catalog of indexes created at runtime: typed attribute fields, older records still read."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from faissq.errors import InvalidAttributes
from faissq.storage.catalog import FOLDER, Catalog, check_definition
from faissq.storage.fs import Storage


def test_attribute_fields_are_declared_like_the_settings_and_old_records_still_load(
    tmp_path: Path,
) -> None:
    """A create's attributes are {field: int64 | keyword} (InvalidAttributes otherwise); a
    record written when they were a free-form list loads with no fields."""
    rec = check_definition("shoes", 8, "l2", "flat", {"color": "keyword", "size": "int64"})
    assert rec.attributes == {"color": "keyword", "size": "int64"}
    assert check_definition("hats", 8, "l2", "flat", None).attributes == {}
    for bad in (["color"], {"color": "float"}, {"bad name": "int64"}):
        with pytest.raises(InvalidAttributes):
            check_definition("shoes", 8, "l2", "flat", bad)
    catalog = Catalog(Storage.from_url(str(tmp_path)))
    catalog.put(rec)
    assert catalog.get("shoes") == rec
    old = {**rec.describe(), "name": "old", "attributes": []}
    (tmp_path / FOLDER / "old.json").write_text(json.dumps(old))
    loaded = catalog.get("old")
    assert loaded is not None and loaded.attributes == {}
    assert loaded.definition() == check_definition("old", 8, "l2", "flat", []).definition()
