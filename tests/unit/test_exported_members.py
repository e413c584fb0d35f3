"""The public surface upstream services import is pinned: changing it is a deliberate act."""

from __future__ import annotations

import inspect

import faissq
from faissq import errors

EXPECTED = {
    "AsyncSearchClient",
    "JobClient",
    "SearchClient",
    "SearchResponse",
    "Settings",
    "put_vectors",
    "__version__",
}


def test_all_lists_clients_settings_and_every_error() -> None:
    error_names = {
        name
        for name, obj in inspect.getmembers(errors, inspect.isclass)
        if issubclass(obj, errors.FaissqError)
    }
    assert set(faissq.__all__) == EXPECTED | error_names


def test_every_exported_name_resolves() -> None:
    for name in faissq.__all__:
        assert getattr(faissq, name) is not None, name
