"""Where a primary runs: the GPU copy attached when configured and possible, with the reason."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

from faissq.config import GpuSettings
from faissq.index.gpu import GpuCopy, clone_to_gpu, device_budget, probe_once
from faissq.index.memory import index_bytes
from faissq.index.state import Primary

Cloner = Callable[[Any], tuple[GpuCopy | None, str]]


def gpu_budget(cfg: GpuSettings | None, cloner: Cloner | None) -> int | None:
    """GPU bytes an index may take when it will be cloned there, else None."""
    if cloner is not None or cfg is None:
        return None
    return device_budget(cfg, probe_once())


def with_gpu(primary: Primary, cfg: GpuSettings | None, cloner: Cloner | None) -> Primary:
    """The primary with a GPU copy attached when configured and possible; the reason either way
    (cloner: replaces clone_to_gpu, for tests and custom devices)."""
    if cloner is not None:
        copy, reason = cloner(primary.index)
    elif cfg is None:
        return primary
    else:
        copy, reason = clone_to_gpu(primary.index, cfg, probe_once(), index_bytes(primary.plan))
    return replace(primary, gpu=copy, gpu_reason=reason)
