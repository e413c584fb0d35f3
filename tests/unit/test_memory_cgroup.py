"""The host memory budget honours a cgroup limit (v2 memory.max, v1 fallback) read from a folder."""

from __future__ import annotations

from pathlib import Path

from faissq.config import IndexSettings
from faissq.index.memory import available_host_bytes, cgroup_available_bytes, host_budget

GIB = 1 << 30
MIB = 1 << 20


def _meminfo(tmp: Path, available: int) -> Path:
    path = tmp / "meminfo"
    path.write_text(f"MemTotal: {64 * GIB // 1024} kB\nMemAvailable: {available // 1024} kB\n")
    return path


def _proc(tmp: Path, text: str) -> Path:
    path = tmp / "cgroup"
    path.write_text(text)
    return path


def _write(folder: Path, **files: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, value in files.items():
        (folder / name.replace("_", ".", 1)).write_text(value)


def test_v2_limit_lowers_the_budget_below_meminfo(tmp_path: Path) -> None:
    root = tmp_path / "fs"
    _write(root / "svc", memory_max=f"{2 * GIB}\n", memory_current=f"{512 * MIB}\n")
    (root / "svc" / "memory.stat").write_text(f"anon 1\ninactive_file {128 * MIB}\n")
    proc = _proc(tmp_path, "0::/svc\n")
    room = 2 * GIB - 512 * MIB + 128 * MIB
    assert cgroup_available_bytes(root, proc) == room
    got = available_host_bytes(_meminfo(tmp_path, 50 * GIB), root, proc)
    assert got == room
    assert host_budget(IndexSettings(memory_fraction=0.5), got) == room // 2


def test_v2_parent_limit_counts_and_max_means_none(tmp_path: Path) -> None:
    root = tmp_path / "fs"
    _write(root / "a", memory_max=f"{GIB}\n", memory_current="0\n")
    _write(root / "a" / "b", memory_max="max\n", memory_current="0\n")
    assert cgroup_available_bytes(root, _proc(tmp_path, "0::/a/b\n")) == GIB
    _write(root / "a", memory_max="max\n")
    assert cgroup_available_bytes(root, _proc(tmp_path, "0::/a/b\n")) is None


def test_v1_fallback_and_private_namespace(tmp_path: Path) -> None:
    root = tmp_path / "fs"
    # a private cgroup namespace: /proc/self/cgroup names a path that is not under the mount
    _write(root / "memory", memory_limit_in_bytes=f"{GIB}\n", memory_usage_in_bytes=f"{GIB}\n")
    proc = _proc(tmp_path, "4:memory:/docker/abc\n1:cpu:/docker/abc\n")
    assert cgroup_available_bytes(root, proc) == 0
    # unlimited v1 is the largest page-aligned int64
    _write(root / "memory", memory_limit_in_bytes="9223372036854771712\n")
    assert cgroup_available_bytes(root, proc) is None
    assert available_host_bytes(_meminfo(tmp_path, 3 * GIB), root, proc) == 3 * GIB


def test_unreadable_cgroup_leaves_meminfo(tmp_path: Path) -> None:
    missing = tmp_path / "nothing"
    assert cgroup_available_bytes(missing, missing) is None
    assert available_host_bytes(_meminfo(tmp_path, 5 * GIB), missing, missing) == 5 * GIB
