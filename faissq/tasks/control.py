"""The control tasks: create and drop indexes at runtime (queue `faissq.control`, docs/tasks.md).

Only a dynamic worker (`faissq worker --dynamic`) consumes that queue; these tasks check the
arguments and hand them to its `DynamicIndexes`.
"""

from __future__ import annotations

from typing import Any

from faissq.errors import InvalidParameter
from faissq.tasks.base import FaissqTask
from faissq.worker.dynamic import DynamicIndexes


def create_index(
    self: FaissqTask,
    name: Any = None,
    dim: Any = None,
    metric: Any = "cosine",
    family: Any = "auto",
    attributes: Any = None,
) -> dict[str, Any]:
    """Create an empty index and serve it here; the same definition again is a no-op."""
    return dynamic_of(self).create(name, dim, metric, family, attributes)


def drop_index(self: FaissqTask, name: Any = None) -> dict[str, Any]:
    """Stop serving an index; its data is removed after worker.drop_grace_s."""
    return dynamic_of(self).drop(name)


CONTROL_TASKS = {"faissq.create_index": create_index, "faissq.drop_index": drop_index}


def dynamic_of(task: FaissqTask) -> DynamicIndexes:
    """The worker's dynamic indexes; refused on a worker started without --dynamic."""
    dyn = task.context().dynamic
    if dyn is None:
        raise InvalidParameter("index creation and drops run on a `faissq worker --dynamic` only")
    return dyn
