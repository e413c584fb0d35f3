"""faissq: a service that owns FAISS vector indexes."""

from __future__ import annotations

from faissq.config import Settings
from faissq.errors import (
    DimensionMismatch,
    EmptyBuild,
    FaissqError,
    IndexBusy,
    InvalidIds,
    InvalidParameter,
    InvalidVectors,
    MemoryBudgetExceeded,
    NoWorkerAlive,
    PermanentError,
    RemoteSearchError,
    RetryableError,
    RpcError,
    SearchTimeout,
    SnapshotCorrupt,
    StorageUnavailable,
    UnknownFamily,
)
from faissq.rpc.aio import AsyncSearchClient
from faissq.rpc.client import SearchClient, SearchResponse

__version__ = "0.1.0"

__all__ = [
    "AsyncSearchClient",
    "DimensionMismatch",
    "EmptyBuild",
    "FaissqError",
    "IndexBusy",
    "InvalidIds",
    "InvalidParameter",
    "InvalidVectors",
    "MemoryBudgetExceeded",
    "NoWorkerAlive",
    "PermanentError",
    "RemoteSearchError",
    "RetryableError",
    "RpcError",
    "SearchClient",
    "SearchResponse",
    "SearchTimeout",
    "Settings",
    "SnapshotCorrupt",
    "StorageUnavailable",
    "UnknownFamily",
    "__version__",
]
