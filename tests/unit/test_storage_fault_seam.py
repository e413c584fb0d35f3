"""The faultfs seam itself: failures and hangs start and stop on the control file's word."""

from __future__ import annotations

import threading
from pathlib import Path

import fsspec
import pytest

from faissq.storage import faults


def make_fs(tmp_path: Path) -> tuple[faults.FaultFS, str]:
    control = str(tmp_path / "faults.json")
    return fsspec.filesystem(faults.PROTOCOL, control=control), control


def test_a_failure_is_counted_and_stops_after_times(tmp_path: Path) -> None:
    """`times` bounds the injected failures; each one is counted in the hits file."""
    fs, control = make_fs(tmp_path)
    faults.set_faults(control, ["rename"], errno="ENOSPC", times=1)
    fs.pipe_file(str(tmp_path / "a"), b"x")
    with pytest.raises(OSError, match="injected on rename"):
        fs.mv(str(tmp_path / "a"), str(tmp_path / "b"))
    fs.mv(str(tmp_path / "a"), str(tmp_path / "b"))
    assert faults.hits(control) == 1


def test_a_stall_holds_only_matching_paths_until_cleared(tmp_path: Path) -> None:
    """A hung rename of CURRENT blocks until the control file lets go; others pass meanwhile."""
    fs, control = make_fs(tmp_path)
    for name in ("a", "CURRENT.tmp"):
        fs.pipe_file(str(tmp_path / name), b"x")
    faults.set_faults(control, stall=["rename"], match="CURRENT")
    fs.mv(str(tmp_path / "a"), str(tmp_path / "b"))  # no match: not held
    done = threading.Event()

    def flip() -> None:
        fs.mv(str(tmp_path / "CURRENT.tmp"), str(tmp_path / "CURRENT"))
        done.set()

    thread = threading.Thread(target=flip)
    thread.start()
    while faults.stalls(control) < 1:  # the event: the rename has started hanging
        assert thread.is_alive()
    assert not done.is_set() and not (tmp_path / "CURRENT").exists()
    faults.set_faults(control, [])
    thread.join(timeout=30)
    assert done.is_set() and (tmp_path / "CURRENT").read_bytes() == b"x"


def test_unknown_operations_are_refused(tmp_path: Path) -> None:
    """A typo in a drill must not silently inject nothing."""
    with pytest.raises(ValueError, match="unknown fault operations"):
        faults.set_faults(str(tmp_path / "c.json"), stall=["renmae"])
