"""The operator commands without a worker: input files, id lists, help texts, the Redis URL rule."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest

from faissq.cli.job_commands import load_vectors, parse_ids, require_redis
from faissq.cli.main import COMMANDS, build_parser, main
from faissq.cli.progress_view import ProgressView, bar
from faissq.config import Settings
from faissq.errors import InvalidIds, InvalidParameter, InvalidVectors


def test_every_command_has_a_help_text() -> None:
    """`faissq CMD --help` builds for every entry of COMMANDS."""
    parser = build_parser()
    for name in COMMANDS:
        with pytest.raises(SystemExit) as done:
            parser.parse_args([name, "--help"])
        assert done.value.code == 0


def test_ids_from_a_list_or_a_file(tmp_path: Path) -> None:
    """`7,8,9` is a list; a path is an int .npy; anything else is a typed error."""
    assert parse_ids("7, 8,9").tolist() == [7, 8, 9]
    np.save(tmp_path / "ids.npy", np.arange(3, dtype=np.int32))
    assert parse_ids(str(tmp_path / "ids.npy")).dtype == np.int64
    np.save(tmp_path / "f.npy", np.zeros(3))
    with pytest.raises(InvalidIds):
        parse_ids(str(tmp_path / "f.npy"))
    with pytest.raises(InvalidParameter):
        parse_ids("7;8")


def test_vectors_from_npy_and_npz(tmp_path: Path) -> None:
    """An .npz gives `vectors` and `ids`; a 1-D array is refused with the file named."""
    x = np.ones((4, 3), dtype=np.float64)
    np.savez(tmp_path / "b.npz", vectors=x, ids=np.arange(10, 14))
    vectors, ids = load_vectors(tmp_path / "b.npz")
    assert vectors.dtype == np.float32 and ids is not None and ids.tolist() == [10, 11, 12, 13]
    np.save(tmp_path / "one.npy", np.ones(3))
    with pytest.raises(InvalidVectors, match=r"one\.npy"):
        load_vectors(tmp_path / "one.npy")


def test_a_missing_redis_url_is_one_line_and_exit_code_1(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """Commands that talk to a worker refuse to start an embedded Redis of their own."""
    monkeypatch.delenv("FAISSQ_REDIS__URL", raising=False)
    monkeypatch.setenv("FAISSQ_STORAGE__URL", str(tmp_path))
    assert main(["status"]) == 1
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "FAISSQ_REDIS__URL is unset" in err[0]
    with pytest.raises(InvalidParameter, match="faissq search"):
        require_redis(Settings(storage={"url": str(tmp_path)}), "search")


def test_progress_is_one_line_per_change_in_a_pipe() -> None:
    """A pipe gets plain lines (no carriage returns), repeated states drawn once."""
    out = io.StringIO()
    view = ProgressView(out)
    for done in (0, 0, 5):
        view.show(bar("train", done, 10, width=10))
    view.close()
    assert out.getvalue() == "  train     [..........] 0/10\n  train     [#####.....] 5/10\n"
