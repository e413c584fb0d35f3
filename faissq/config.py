"""One Settings object for the whole service (env prefix FAISSQ_, nested sections with "__")."""

from __future__ import annotations

from typing import Any, Literal
from urllib.parse import urlsplit, urlunsplit

from pydantic import BaseModel, Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

Metric = Literal["cosine", "l2"]


def masked_url(url: str | None) -> str:
    """The URL with its password (and a user's name with it) replaced by ``***``, for messages.

    Every URL faissq prints or logs goes through here: a Redis or storage URL can carry a
    password, and error messages end up in terminals, CI logs and log aggregators.
    """
    if not url:
        return str(url)
    try:
        parts = urlsplit(url)
        secret = parts.password
    except ValueError:  # an unparsable URL: show its scheme only
        return url.split(":", 1)[0] + "://***" if "://" in url else "***"
    if secret is None and "@" not in parts.netloc:
        return url
    host = parts.netloc.rsplit("@", 1)[-1]
    user = parts.username or ""
    netloc = f"{user}:***@{host}" if secret is not None else f"***@{host}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


class RedisSettings(BaseModel):
    """Where the broker, result backend and search queue live."""

    url: str | None = Field(
        default=None,
        description="Redis URL (redis://, rediss://, unix://). Unset: embedded redis-server.",
    )
    socket_timeout_s: float = Field(default=5.0, description="Socket timeout for client commands.")


class StorageSettings(BaseModel):
    """Shared storage for snapshots and the update log."""

    url: str = Field(
        default="./faissq-data",
        description="fsspec URL or local folder holding snapshots and the update log.",
    )
    retention: int = Field(default=3, ge=1, description="Snapshot versions kept per index.")
    fsync: bool = Field(default=True, description="fsync log entries and snapshot files.")
    options: dict[str, Any] = Field(
        default_factory=dict,
        description="fsspec storage options as JSON (credentials, endpoint; faultfs: control).",
    )
    incoming_ttl_s: float = Field(
        default=7 * 86_400,
        ge=0,
        description="incoming/ files older than this are deleted after a snapshot; 0 keeps them.",
    )


class IndexSettings(BaseModel):
    """How the engine chooses, builds and searches an index."""

    metric: Metric = Field(default="cosine", description="cosine (IP on normalised) or l2.")
    family: str = Field(
        default="auto",
        description="auto, flat, ivf_flat, ivf_pq, ivf_pq_refine, hnsw, or a FAISS factory string.",
    )
    flat_max: int = Field(
        default=5_000, ge=1, description="auto: Flat without calibration below this many vectors."
    )
    flat_max_ms: float = Field(
        default=0.1,
        ge=0,
        description="auto: Flat while exact search costs at most this per query (a third of "
        "an RPC trip).",
    )
    hnsw_min_speedup: float = Field(
        default=1.3,
        gt=0,
        description="auto: HNSW over IVF-Flat only when calibrated this many times faster.",
    )
    calibration_sample: int = Field(
        default=5_000,
        ge=0,
        description="auto: vectors the build-time calibration measures on, at most a quarter "
        "of the corpus (0: none, IVF-Flat).",
    )
    add_chunk: int = Field(
        default=65_536, ge=1, description="Rows per streamed build step (progress granularity)."
    )
    raw_dir: str | None = Field(
        default=None,
        description="Folder of the memory-mapped raw vectors (unlinked files). None: temp folder.",
    )
    nlist_factor: float = Field(default=4.0, gt=0, description="nlist = factor x sqrt(N).")
    min_points_per_centroid: int = Field(
        default=39, ge=1, description="Never more centroids than train_size / this (FAISS: 39)."
    )
    train_points_per_centroid: int = Field(
        default=64, ge=39, description="Training sample size = nlist x this (capped by N)."
    )
    pq_bytes: int | None = Field(
        default=None, description="PQ bytes per vector (sub-quantizers). None: dim / 4."
    )
    opq: bool = Field(
        default=True, description="ivf_pq(_refine): add an OPQ rotation when dim allows (not auto)."
    )
    refine: bool = Field(
        default=True, description="auto: a compressed choice refines exactly from raw vectors."
    )
    k_factor: int = Field(
        default=4, ge=1, description="Refine k x k_factor candidates (at most rpc.max_k_factor)."
    )
    hnsw_m: int = Field(default=32, ge=4, description="HNSW graph degree.")
    ef_construction: int = Field(default=40, ge=1, description="HNSW efConstruction.")
    default_nprobe: int = Field(default=16, ge=1, description="nprobe when none is asked for.")
    default_ef_search: int = Field(default=64, ge=1, description="efSearch when none is given.")
    max_k: int = Field(default=1024, ge=1, description="Largest k a search may ask for.")
    attributes: dict[str, Literal["int64", "keyword"]] = Field(
        default_factory=dict,
        description="Attribute fields stored with the vectors, for filters: name -> type.",
    )
    filter_exact_rows: int = Field(
        default=10_000, ge=0,
        description="A filter passing at most this many rows is answered by an exact scan.",
    )  # fmt: skip
    memory_fraction: float = Field(
        default=0.5, gt=0, le=1, description="Budget = this fraction of available host memory."
    )
    memory_budget_bytes: int | None = Field(
        default=None, description="Explicit host memory budget; overrides memory_fraction."
    )
    target_recall: float = Field(default=0.95, gt=0, le=1, description="Autotune target.")
    merge_delta_max: int = Field(
        default=5_000,
        ge=1,
        description="Delta size that makes a merge due (the worker then merges on its own).",
    )
    live_lists: bool = Field(
        default=True,
        description="IVF-Flat on the CPU: upserts and deletes change the lists in place, so a "
        "search under writes is one FAISS call (an id-to-list hash costs about 40 bytes a vector).",
    )
    imbalance_rebuild: float = Field(
        default=3.0, gt=1, description="IVF imbalance factor above which a rebuild is due."
    )
    seed: int = Field(default=1234, description="Seed for sampling and k-means.")


class GpuSettings(BaseModel):
    """Whether and how an index is cloned to a GPU."""

    mode: Literal["auto", "on", "off"] = Field(
        default="auto", description="auto: use a GPU when the probe finds one."
    )
    device: int = Field(default=0, ge=0, description="CUDA device number.")
    use_cuvs: bool = Field(
        default=True, description="Clone with cuVS when faiss was built with it."
    )
    fp16: bool = Field(default=False, description="Store IVF-Flat / lookup tables in float16.")
    temp_memory_bytes: int = Field(default=256 << 20, ge=0, description="GPU scratch memory.")
    max_k: int = Field(default=2048, ge=1, description="GPU top-k limit of this faiss build.")
    memory_fraction: float = Field(default=0.8, gt=0, le=1, description="GPU memory budget.")


class RpcSettings(BaseModel):
    """The synchronous search path over Redis lists."""

    url: str | None = Field(
        default=None,
        description="Redis of the search path (request lists, replies, heartbeats); "
        "unset: redis.url. Celery's broker stays on redis.url.",
    )
    cluster: bool = Field(
        default=False,
        description="url is a node of a Redis Cluster: each index's search keys are used on "
        "the node owning their slot.",
    )
    max_batch: int = Field(default=64, ge=1, description="Requests popped per loop turn.")
    batch_window_ms: float = Field(
        default=0.0, ge=0, description="Extra wait for more requests when the queue is busy."
    )
    queue_max: int = Field(default=10_000, ge=1, description="Request list bound: above, busy.")
    heartbeat_ttl_s: float = Field(default=5.0, gt=0, description="Heartbeat key lifetime.")
    reply_ttl_s: int = Field(default=30, ge=1, description="Reply key lifetime.")
    timeout_s: float = Field(default=2.0, gt=0, description="Client default search timeout.")
    max_allow_ids: int = Field(default=100_000, ge=0, description="Largest allow/deny list.")
    max_nprobe: int = Field(
        default=2048, ge=1, description="Largest nprobe a request may ask for (FAISS GPU's limit)."
    )
    max_ef_search: int = Field(
        default=4096, ge=1, description="Largest efSearch a request may ask for."
    )
    max_k_factor: int = Field(
        default=32, ge=1, description="Largest k_factor a request may ask for."
    )
    max_candidates: int = Field(
        default=1 << 18,
        ge=1,
        description="Largest rows x k x k_factor of one request (k_factor: asked, else the "
        "larger of the index's and the autotuned one): bounds the candidates one search holds, "
        "about 4 x dim + 16 bytes each.",
    )
    max_fetch_ids: int = Field(
        default=1000, ge=1, description="Largest id list of one fetch request (vectors by id)."
    )
    max_filter_bytes: int = Field(
        default=1 << 16, ge=1, description="Largest attribute filter of one request, as msgpack."
    )
    coalesce: bool = Field(
        default=True,
        description="Clients merge concurrent searches with equal k and options into one request.",
    )
    max_in_flight: int | None = Field(
        default=None,
        ge=1,
        description="Round trips one merging client runs at once (unset: 2 threads, 3 asyncio).",
    )


class MetricsSettings(BaseModel):
    """Prometheus exposition."""

    enabled: bool = Field(default=True, description="Serve /metrics from the worker.")
    port: int = Field(
        default=9310, ge=0, le=65535, description="Port of /metrics, /healthz, /readyz (0: any)."
    )
    host: str = Field(
        default="0.0.0.0", description="Address the metrics port binds (0.0.0.0: all interfaces)."
    )


class WorkerSettings(BaseModel):
    """The Celery worker that pins the indexes."""

    indexes: list[str] = Field(default_factory=lambda: ["default"], description="Served indexes.")
    dead_letter_after: int = Field(default=3, ge=1, description="Deliveries before dead-letter.")
    visibility_timeout_s: int = Field(default=6 * 3600, ge=60, description="Above longest job.")
    inline_max_bytes: int = Field(default=8 << 20, ge=0, description="Largest inline batch.")
    job_time_limit_s: float = Field(default=4 * 3600, gt=0, description="Cooperative limit.")
    progress_interval_s: float = Field(
        default=1.0, ge=0, description="Least time between two PROGRESS updates of a job."
    )
    storage_retries: int = Field(
        default=8,
        ge=0,
        description="In-place retries of a job while storage is unavailable (the queue waits).",
    )
    retry_backoff_s: float = Field(
        default=1.0, gt=0, description="Wait before the first storage retry; doubles each time."
    )
    retry_backoff_max_s: float = Field(default=120, gt=0, description="Longest retry wait.")
    replica: bool = Field(
        default=False,
        description="Search-only replica: consume no job queue, follow the writer's log.",
    )
    replica_poll_s: float = Field(
        default=0.5, gt=0, description="How often a replica polls the log and CURRENT."
    )
    dynamic: bool = Field(
        default=False,
        description="Consume faissq.control: create and drop indexes at runtime (one per root).",
    )
    drop_grace_s: float = Field(
        default=24 * 3600.0,
        ge=0,
        description="Seconds a dropped index's data is kept before it is removed (0: at once).",
    )
    writer_lease_s: float = Field(
        default=15.0,
        ge=1,
        description="TTL of a writer's Redis lease (renewed each third): a crashed writer's "
        "successor on object storage waits this long at most.",
    )


class MaintenanceSettings(BaseModel):
    """Background merges and saves of an index writer, queued as jobs on the index's queue."""

    enabled: bool = Field(
        default=True, description="Queue a faissq.maintain job when a merge or a save is due."
    )
    interval_s: float = Field(
        default=1.0, gt=0, description="How often the writer checks whether something is due."
    )
    save_log_bytes: int = Field(
        default=256 << 20,
        ge=0,
        description="Save when the log a restart would replay passes this size (0: never).",
    )
    save_log_age_s: float = Field(
        default=900.0,
        ge=0,
        description="Save when the oldest entry a restart would replay is this old (0: never).",
    )
    pending_ttl_s: float = Field(
        default=3600.0, gt=0, description="A queued maintain job unfinished this long is re-sent."
    )
    retry_after_s: float = Field(
        default=60.0, ge=0, description="Wait after a failed maintain job before queueing again."
    )
    mmap_threshold_bytes: int = Field(
        default=128 << 10,
        ge=0,
        description="glibc: blocks this large are mmapped, so freeing returns them (0: adaptive).",
    )


class RecallSettings(BaseModel):
    """Live recall: sampled searches checked by exact search; autotune and the publish gate."""

    sample_rate: float = Field(
        default=0.01, ge=0, le=1, description="Fraction of served query vectors sampled (0: off)."
    )
    ring_size: int = Field(
        default=2_000, ge=1, description="Sampled queries kept per index, newest (bounds memory)."
    )
    cpu_fraction: float = Field(
        default=0.05,
        gt=0,
        le=1,
        description="Share of one core the background exact search may use, on average.",
    )
    nice: int = Field(
        default=19, ge=0, le=19, description="Nice value of the exact-search thread (19: lowest)."
    )
    max_params: int = Field(
        default=16, ge=1, description="Parameter settings reported per index; the rest: other."
    )
    min_queries: int = Field(
        default=200,
        ge=2,
        description="Sampled queries needed before autotune and the publish gate use them.",
    )
    gate: bool = Field(
        default=True,
        description="Swap in a build or rebuild only when its recall on sampled queries holds.",
    )
    gate_margin: float = Field(
        default=0.01, ge=0, le=1, description="Recall a new build may lose against the serving one."
    )
    drift_ratio: float = Field(
        default=1.25,
        gt=1,
        description="IVF: new vectors' mean centroid distance over training's that advises a "
        "rebuild.",
    )
    drift_rebuild: bool = Field(
        default=False, description="Maintenance rebuilds an IVF index when drift advises it."
    )
    drift_hold_s: float = Field(
        default=3600.0,
        ge=0,
        description="Wait after the recall gate refused a drift rebuild before trying another.",
    )
    drift_interval_s: float = Field(
        default=10.0, gt=0, description="How often the writer measures IVF drift."
    )


class Settings(BaseSettings):
    """The whole configuration, read from FAISSQ_* variables (e.g. FAISSQ_INDEX__METRIC=l2)."""

    model_config = SettingsConfigDict(
        env_prefix="FAISSQ_", env_nested_delimiter="__", extra="ignore"
    )

    redis: RedisSettings = Field(default_factory=RedisSettings)
    storage: StorageSettings = Field(default_factory=StorageSettings)
    index: IndexSettings = Field(default_factory=IndexSettings)
    gpu: GpuSettings = Field(default_factory=GpuSettings)
    rpc: RpcSettings = Field(default_factory=RpcSettings)
    metrics: MetricsSettings = Field(default_factory=MetricsSettings)
    worker: WorkerSettings = Field(default_factory=WorkerSettings)
    maintenance: MaintenanceSettings = Field(default_factory=MaintenanceSettings)
    recall: RecallSettings = Field(default_factory=RecallSettings)

    @model_validator(mode="after")
    def _k_factor_within_the_request_cap(self) -> Settings:
        """The index's k_factor refines every request naming none: no more than one may name."""
        if self.index.k_factor > self.rpc.max_k_factor:
            raise ValueError(
                f"index.k_factor {self.index.k_factor} is over rpc.max_k_factor "
                f"{self.rpc.max_k_factor}"
            )
        return self
