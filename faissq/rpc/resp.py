"""RESP bytes of pipelined commands, packed by hiredis instead of redis-py's Python packer."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import hiredis


def pack(commands: Iterable[tuple[Any, ...]]) -> list[bytes]:
    """Every command (args: str, bytes, int or float) in one buffer, as send_packed_command
    takes it (a list of buffers: redis-py iterates over what it is given).

    Measured: 4.94 vs 23.23 µs per request (client) and 41.75 vs 283.04 µs per 16 replies
    (worker) with redis-py's pack_commands, docs/benchmarks.md#rpc-fast-paths.
    """
    return [b"".join([hiredis.pack_command(command) for command in commands])]
