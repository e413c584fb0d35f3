"""faissq: a service that owns FAISS vector indexes."""

from __future__ import annotations

from faissq.client import JobClient, put_vectors
from faissq.config import Settings
from faissq.errors import (
    ChecksumMismatch,
    DeadLettered,
    DimensionMismatch,
    EmptyBuild,
    FaissqError,
    IndexBusy,
    IndexNotReady,
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
    SnapshotCorrupt,
    StorageUnavailable,
    UnknownFamily,
    UnknownIndex,
    WriterConflict,
)
from faissq.rpc.aio import AsyncSearchClient
from faissq.rpc.client import SearchClient, SearchResponse

__version__ = "0.1.0"

__all__ = [
    "AsyncSearchClient",
    "ChecksumMismatch",
    "DeadLettered",
    "DimensionMismatch",
    "EmptyBuild",
    "FaissqError",
    "IndexBusy",
    "IndexNotReady",
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
    "SnapshotCorrupt",
    "StorageUnavailable",
    "UnknownFamily",
    "UnknownIndex",
    "WriterConflict",
    "__version__",
    "put_vectors",
]
