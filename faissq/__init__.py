"""faissq: a service that owns FAISS vector indexes.

The public names load on first use (module __getattr__), so `import faissq` and the pure engine
(`faissq.index`) import no Celery, kombu or redis.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from faissq.config import Settings
    from faissq.errors import (
        ChecksumMismatch,
        DeadLettered,
        DimensionMismatch,
        EmptyBuild,
        FaissqError,
        IndexBusy,
        IndexExists,
        IndexNotReady,
        InvalidAttributes,
        InvalidFilter,
        InvalidIds,
        InvalidParameter,
        InvalidVectors,
        JobTimeLimitExceeded,
        LogCorrupt,
        ManifestMismatch,
        MemoryBudgetExceeded,
        NoWorkerAlive,
        PayloadTooLarge,
        PermanentError,
        PermissionDenied,
        RecallRegression,
        RemoteSearchError,
        RetryableError,
        RpcError,
        SearchTimeout,
        ShardUnavailable,
        SnapshotCorrupt,
        StaleRead,
        StorageUnavailable,
        UnknownFamily,
        UnknownIndex,
        WriterConflict,
    )
    from faissq.rpc.aio_client import AsyncSearchClient
    from faissq.rpc.aio_shard_client import AsyncShardedSearchClient
    from faissq.rpc.search_client import SearchClient, SearchResponse
    from faissq.rpc.shard_client import ShardedSearchClient
    from faissq.rpc.shard_plan import ShardedSearchResponse
    from faissq.tasks.producer import JobClient, put_vectors

__version__ = "0.1.0"

_WHERE = {
    "Settings": "faissq.config",
    "AsyncSearchClient": "faissq.rpc.aio_client",
    "AsyncShardedSearchClient": "faissq.rpc.aio_shard_client",
    "SearchClient": "faissq.rpc.search_client",
    "SearchResponse": "faissq.rpc.search_client",
    "ShardedSearchClient": "faissq.rpc.shard_client",
    "ShardedSearchResponse": "faissq.rpc.shard_plan",
    "JobClient": "faissq.tasks.producer",
    "put_vectors": "faissq.tasks.producer",
    "ChecksumMismatch": "faissq.errors",
    "DeadLettered": "faissq.errors",
    "DimensionMismatch": "faissq.errors",
    "EmptyBuild": "faissq.errors",
    "FaissqError": "faissq.errors",
    "IndexBusy": "faissq.errors",
    "IndexNotReady": "faissq.errors",
    "InvalidIds": "faissq.errors",
    "InvalidParameter": "faissq.errors",
    "InvalidFilter": "faissq.errors",
    "InvalidAttributes": "faissq.errors",
    "InvalidVectors": "faissq.errors",
    "JobTimeLimitExceeded": "faissq.errors",
    "LogCorrupt": "faissq.errors",
    "ManifestMismatch": "faissq.errors",
    "MemoryBudgetExceeded": "faissq.errors",
    "NoWorkerAlive": "faissq.errors",
    "PayloadTooLarge": "faissq.errors",
    "PermanentError": "faissq.errors",
    "PermissionDenied": "faissq.errors",
    "RecallRegression": "faissq.errors",
    "RemoteSearchError": "faissq.errors",
    "RetryableError": "faissq.errors",
    "RpcError": "faissq.errors",
    "SearchTimeout": "faissq.errors",
    "ShardUnavailable": "faissq.errors",
    "StaleRead": "faissq.errors",
    "SnapshotCorrupt": "faissq.errors",
    "StorageUnavailable": "faissq.errors",
    "UnknownFamily": "faissq.errors",
    "UnknownIndex": "faissq.errors",
    "IndexExists": "faissq.errors",
    "WriterConflict": "faissq.errors",
}


def __getattr__(name: str) -> Any:
    """Import a public name's module when the name is first used."""
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'faissq' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    """The public surface, for completion and `from faissq import *`."""
    return sorted(__all__)


__all__ = [
    "AsyncSearchClient",
    "AsyncShardedSearchClient",
    "ChecksumMismatch",
    "DeadLettered",
    "DimensionMismatch",
    "EmptyBuild",
    "FaissqError",
    "IndexBusy",
    "IndexExists",
    "IndexNotReady",
    "InvalidAttributes",
    "InvalidFilter",
    "InvalidIds",
    "InvalidParameter",
    "InvalidVectors",
    "JobClient",
    "JobTimeLimitExceeded",
    "LogCorrupt",
    "ManifestMismatch",
    "MemoryBudgetExceeded",
    "NoWorkerAlive",
    "PayloadTooLarge",
    "PermanentError",
    "PermissionDenied",
    "RecallRegression",
    "RemoteSearchError",
    "RetryableError",
    "RpcError",
    "SearchClient",
    "SearchResponse",
    "SearchTimeout",
    "Settings",
    "ShardUnavailable",
    "ShardedSearchClient",
    "ShardedSearchResponse",
    "SnapshotCorrupt",
    "StaleRead",
    "StorageUnavailable",
    "UnknownFamily",
    "UnknownIndex",
    "WriterConflict",
    "__version__",
    "put_vectors",
]
