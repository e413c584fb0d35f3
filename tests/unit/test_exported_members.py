"""The public surface upstream services import is pinned: changing it is a deliberate act."""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import tomllib
from pathlib import Path

import faissq
from faissq import errors

ROOT = Path(__file__).resolve().parents[2]

# name exported by faissq -> the module that defines it (faissq re-exports, never redefines)
EXPORTED = {
    "AsyncSearchClient": "faissq.rpc.aio_client",
    "AsyncShardedSearchClient": "faissq.rpc.aio_shard_client",
    "JobClient": "faissq.tasks.producer",
    "SearchClient": "faissq.rpc.search_client",
    "SearchResponse": "faissq.rpc.search_client",
    "ShardedSearchClient": "faissq.rpc.shard_client",
    "ShardedSearchResponse": "faissq.rpc.shard_plan",
    "Settings": "faissq.config",
    "put_vectors": "faissq.tasks.producer",
}

# every error class: its parent and the `code` it carries on the wire (RPC replies, job results)
ERRORS = {
    "FaissqError": ("Exception", "error"),
    "PermanentError": ("FaissqError", "permanent"),
    "InvalidVectors": ("PermanentError", "invalid_vectors"),
    "DimensionMismatch": ("InvalidVectors", "dimension_mismatch"),
    "InvalidIds": ("PermanentError", "invalid_ids"),
    "InvalidParameter": ("PermanentError", "invalid_parameter"),
    "InvalidFilter": ("InvalidParameter", "invalid_filter"),
    "InvalidAttributes": ("PermanentError", "invalid_attributes"),
    "UnknownFamily": ("PermanentError", "unknown_family"),
    "EmptyBuild": ("PermanentError", "empty_build"),
    "MemoryBudgetExceeded": ("PermanentError", "memory_budget_exceeded"),
    "UnknownIndex": ("PermanentError", "unknown_index"),
    "IndexExists": ("PermanentError", "index_exists"),
    "PayloadTooLarge": ("PermanentError", "payload_too_large"),
    "ChecksumMismatch": ("PermanentError", "checksum_mismatch"),
    "SnapshotCorrupt": ("PermanentError", "snapshot_corrupt"),
    "ManifestMismatch": ("PermanentError", "manifest_mismatch"),
    "LogCorrupt": ("PermanentError", "log_corrupt"),
    "WriterConflict": ("PermanentError", "writer_conflict"),
    "IndexNotReady": ("PermanentError", "index_not_ready"),
    "JobTimeLimitExceeded": ("PermanentError", "time_limit_exceeded"),
    "DeadLettered": ("PermanentError", "dead_lettered"),
    "PermissionDenied": ("PermanentError", "permission_denied"),
    "RecallRegression": ("PermanentError", "recall_regression"),
    "RetryableError": ("FaissqError", "retryable"),
    "StorageUnavailable": ("RetryableError", "storage_unavailable"),
    "RpcError": ("FaissqError", "rpc_error"),
    "SearchTimeout": ("RpcError", "timeout"),
    "StaleRead": ("RpcError", "stale"),
    "ShardUnavailable": ("RpcError", "shard_unavailable"),
    "NoWorkerAlive": ("RpcError", "no_worker"),
    "IndexBusy": ("RpcError", "busy"),
    "RemoteSearchError": ("RpcError", "remote_error"),
}

# the public methods of the exported classes, and the fields of the search result
METHODS = {
    "SearchClient": {"alive", "close", "fetch", "range_search", "search", "workers"},
    "AsyncSearchClient": {"alive", "close", "fetch", "range_search", "search"},
    "ShardedSearchClient": {"close", "search"},
    "AsyncShardedSearchClient": {"close", "search"},
    "JobClient": {
        "attributes_kwargs",
        "autotune",
        "build",
        "close",
        "declare_sharded",
        "delete",
        "merge",
        "rebuild",
        "reload",
        "save",
        "send",
        "shard_map",
        "stats",
        "upsert",
        "vectors_kwargs",
    },
}
RESPONSE_FIELDS = ["scores", "ids", "version", "worker", "timings", "target_met"]


def test_all_is_exactly_the_clients_settings_errors_and_version() -> None:
    assert len(faissq.__all__) == len(set(faissq.__all__)), "a name listed twice"
    assert set(faissq.__all__) == set(EXPORTED) | set(ERRORS) | {"__version__"}


def test_each_export_is_the_object_of_its_home_module() -> None:
    for name, module in EXPORTED.items():
        assert getattr(faissq, name) is getattr(importlib.import_module(module), name), name
    for name in ERRORS:
        assert getattr(faissq, name) is getattr(errors, name), name


def test_version_matches_the_package_metadata() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert faissq.__version__ == project["version"]


def test_the_error_tree_and_its_wire_codes() -> None:
    found = {
        name: (cls.__bases__[0].__name__, cls.code)
        for name, cls in inspect.getmembers(errors, inspect.isclass)
        if issubclass(cls, errors.FaissqError)
    }
    assert found == ERRORS


def test_public_methods_and_result_fields() -> None:
    for name, methods in METHODS.items():
        cls = getattr(faissq, name)
        assert {m for m in dir(cls) if not m.startswith("_")} == methods, name
    assert [f.name for f in dataclasses.fields(faissq.SearchResponse)] == RESPONSE_FIELDS
