"""The faissq error tree; every error a caller can see is one of these.

    FaissqError
    ├── PermanentError              retrying cannot help: fail the job, nothing applied
    │   ├── InvalidVectors
    │   │   └── DimensionMismatch
    │   ├── InvalidIds
    │   ├── InvalidParameter
    │   │   └── InvalidFilter
    │   ├── InvalidAttributes
    │   ├── UnknownFamily
    │   ├── EmptyBuild
    │   ├── MemoryBudgetExceeded
    │   ├── UnknownIndex
    │   ├── IndexExists
    │   ├── PayloadTooLarge
    │   ├── ChecksumMismatch
    │   ├── SnapshotCorrupt
    │   ├── ManifestMismatch
    │   ├── LogCorrupt
    │   ├── WriterConflict
    │   ├── IndexNotReady
    │   ├── JobTimeLimitExceeded
    │   ├── DeadLettered
    │   ├── PermissionDenied
    │   └── RecallRegression
    ├── RetryableError              transient: retry with backoff
    │   └── StorageUnavailable
    └── RpcError                    raised by SearchClient
        ├── SearchTimeout
        ├── NoWorkerAlive
        ├── IndexBusy
        ├── StaleRead
        ├── ShardUnavailable
        └── RemoteSearchError

Each class carries a stable `code` string used on the wire (RPC replies, task results).
"""

from __future__ import annotations


class FaissqError(Exception):
    """Raised for any faissq failure; the base of the tree."""

    code = "error"


class PermanentError(FaissqError):
    """Raised when retrying the same input cannot succeed."""

    code = "permanent"


class InvalidVectors(PermanentError):
    """Raised when vectors are not a finite 2-D float array usable by the index."""

    code = "invalid_vectors"


class DimensionMismatch(InvalidVectors):
    """Raised when vectors have another dimension than the index."""

    code = "dimension_mismatch"


class InvalidIds(PermanentError):
    """Raised when ids are not unique int64 values matching the vectors one to one."""

    code = "invalid_ids"


class InvalidParameter(PermanentError):
    """Raised when a search or build parameter is out of range or unknown."""

    code = "invalid_parameter"


class InvalidFilter(InvalidParameter):
    """Raised when a search filter is malformed, too large or names an undeclared attribute."""

    code = "invalid_filter"


class InvalidAttributes(PermanentError):
    """Raised when a batch's attribute columns do not match the index's declared fields."""

    code = "invalid_attributes"


class UnknownFamily(PermanentError):
    """Raised when the index family is neither a known name nor a valid factory string."""

    code = "unknown_family"


class EmptyBuild(PermanentError):
    """Raised when a build is asked for with no vectors."""

    code = "empty_build"


class MemoryBudgetExceeded(PermanentError):
    """Raised when no allowed family fits the memory budget; the message names the numbers."""

    code = "memory_budget_exceeded"


class UnknownIndex(PermanentError):
    """Raised when a job or search names an index this service does not serve."""

    code = "unknown_index"


class IndexExists(PermanentError):
    """Raised when a create names an index that exists with another definition, or is dropped."""

    code = "index_exists"


class PayloadTooLarge(PermanentError):
    """Raised when an inline batch or a filter list is above its configured cap."""

    code = "payload_too_large"


class ChecksumMismatch(PermanentError):
    """Raised when bytes do not match the sha256 they were announced with."""

    code = "checksum_mismatch"


class SnapshotCorrupt(PermanentError):
    """Raised when a snapshot file is missing, unreadable or fails its checksum."""

    code = "snapshot_corrupt"


class ManifestMismatch(PermanentError):
    """Raised when a snapshot's manifest disagrees with the settings (dim, metric, format)."""

    code = "manifest_mismatch"


class LogCorrupt(PermanentError):
    """Raised when an update-log entry is truncated or fails its checksum."""

    code = "log_corrupt"


class WriterConflict(PermanentError):
    """Raised when a second or stale writer appends to a log or publishes an older snapshot."""

    code = "writer_conflict"


class IndexNotReady(PermanentError):
    """Raised when an index is searched or mutated before it was built or loaded."""

    code = "index_not_ready"


class JobTimeLimitExceeded(PermanentError):
    """Raised when a job passes its cooperative time limit; it stops cleanly between chunks."""

    code = "time_limit_exceeded"


class DeadLettered(PermanentError):
    """Raised when a job was delivered more times than allowed (it kept crashing the worker)."""

    code = "dead_lettered"


class PermissionDenied(PermanentError):
    """Raised when Redis refuses a command to this client's ACL user; the message names it."""

    code = "permission_denied"


class RecallRegression(PermanentError):
    """Raised when a new build recalls worse on sampled queries than the index serving now.

    `report` holds both recalls, their lower bounds, the settings and the sample size; the
    serving index stays in place.
    """

    code = "recall_regression"

    def __init__(self, message: str, report: dict[str, object] | None = None) -> None:
        super().__init__(message, report or {})
        self.report: dict[str, object] = report or {}

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


def refused(exc: BaseException | None) -> str | None:
    """The NOPERM message in a Redis error or its causes (kombu wraps them), else None."""
    seen = 0
    while exc is not None and seen < 8:  # a cause chain is short; a cycle must not hang us
        if type(exc).__name__ == "NoPermissionError" or str(exc).startswith("NOPERM"):
            return str(exc)
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return None


def permission_denied(message: str, role: str) -> PermissionDenied:
    """The typed error for a Redis NOPERM reply, naming what was refused and the role it needs."""
    return PermissionDenied(
        f"Redis ACL refused this {role} client: {message} (its user lacks this permission; "
        f"the {role} role's rules: `faissq acl --role {role}`)"
    )


class RetryableError(FaissqError):
    """Raised for transient faults that a retry with backoff may clear."""

    code = "retryable"


class StorageUnavailable(RetryableError):
    """Raised when shared storage cannot be written or read right now (read-only, full, down)."""

    code = "storage_unavailable"


class RpcError(FaissqError):
    """Raised by the search client; the base of the RPC-side errors."""

    code = "rpc_error"


class SearchTimeout(RpcError):
    """Raised when no reply arrived before the search deadline."""

    code = "timeout"


class NoWorkerAlive(RpcError):
    """Raised when no worker heartbeat exists for the index."""

    code = "no_worker"


class IndexBusy(RpcError):
    """Raised when the index's request queue is at its bound."""

    code = "busy"


class StaleRead(RpcError):
    """Raised when the answering worker had not applied a search's min_seq by its deadline."""

    code = "stale"


class ShardUnavailable(RpcError):
    """Raised when shards of a sharded index gave no answer in time; `missing` maps each such
    shard's index name to its error code (timeout, no_worker, index_not_ready, busy, ...)."""

    code = "shard_unavailable"

    def __init__(self, message: str, missing: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.missing = dict(missing or {})


class RemoteSearchError(RpcError):
    """Raised when the worker replied with an error; `remote_code` holds its stable code."""

    code = "remote_error"

    def __init__(self, message: str, remote_code: str = "error") -> None:
        super().__init__(message)
        self.remote_code = remote_code


def error_for_code(code: str) -> type[FaissqError]:
    """Return the error class with this wire code (FaissqError when unknown)."""
    stack: list[type[FaissqError]] = [FaissqError]
    while stack:
        cls = stack.pop()
        if cls.code == code:
            return cls
        stack.extend(cls.__subclasses__())
    return FaissqError
