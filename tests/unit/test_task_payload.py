"""Job payload checks: references stay under the storage root and match their checksum."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from faissq.config import Settings
from faissq.errors import (
    ChecksumMismatch,
    InvalidAttributes,
    InvalidIds,
    InvalidParameter,
    InvalidVectors,
)
from faissq.tasks import payload
from faissq.tasks.producer import put_attributes, put_vectors


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    """Settings whose storage root is a temp folder."""
    (tmp_path / "root").mkdir()
    return Settings(storage={"url": str(tmp_path / "root")})


def test_put_vectors_reference_round_trips(settings: Settings) -> None:
    """put_vectors writes a .npy under incoming/ that read_ref loads back after checking it."""
    x = np.random.default_rng(0).standard_normal((5, 3)).astype(np.float32)
    ref = put_vectors(settings, x)
    assert ref["path"].startswith("incoming/") and ref["shape"] == [5, 3]
    got = payload.vectors_arg(None, ref, root=settings.storage.url, inline_max_bytes=0)
    np.testing.assert_array_equal(got, x)
    leftovers = [p for p in os.listdir(Path(settings.storage.url) / "incoming") if "tmp" in p]
    assert leftovers == []


@pytest.mark.parametrize("path", ["../x.npy", "/etc/passwd", "a/../../x.npy", "", "memory://x"])
def test_references_outside_the_root_are_refused(settings: Settings, path: str) -> None:
    """Traversal, absolute paths elsewhere, empty paths and foreign filesystems are refused."""
    with pytest.raises(InvalidParameter):
        payload.resolve_ref(path, settings.storage.url)


def test_a_symlink_leaving_the_root_is_refused(settings: Settings, tmp_path: Path) -> None:
    """A link inside the root that points outside it is not followed."""
    np.save(tmp_path / "secret.npy", np.zeros((1, 1), np.float32))
    os.symlink(tmp_path / "secret.npy", Path(settings.storage.url) / "link.npy")
    with pytest.raises(InvalidParameter, match="link"):
        payload.resolve_ref("link.npy", settings.storage.url)


def test_checksum_and_shape_are_checked(settings: Settings) -> None:
    """A wrong sha256 is ChecksumMismatch; a wrong announced shape is InvalidVectors."""
    ref = put_vectors(settings, np.ones((2, 2), np.float32))
    root = settings.storage.url
    with pytest.raises(ChecksumMismatch):
        payload.vectors_arg(None, {**ref, "sha256": "f" * 64}, root=root, inline_max_bytes=0)
    with pytest.raises(InvalidVectors, match="announced"):
        payload.vectors_arg(None, {**ref, "shape": [4, 1]}, root=root, inline_max_bytes=0)
    with pytest.raises(InvalidParameter, match="sha256"):
        payload.vectors_arg(None, {**ref, "sha256": "xyz"}, root=root, inline_max_bytes=0)


def test_pickled_npy_is_refused(settings: Settings) -> None:
    """An object array (which needs pickle) is never loaded."""
    import hashlib

    path = Path(settings.storage.url) / "obj.npy"
    np.save(path, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    ref = {"path": "obj.npy", "shape": [1], "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
    with pytest.raises(InvalidVectors, match="not a plain"):
        payload.vectors_arg(None, ref, root=settings.storage.url, inline_max_bytes=0)


def test_ids_forms() -> None:
    """ids may be a list or an int64 frame; floats, bools and overflow are refused."""
    from faissq import codec

    np.testing.assert_array_equal(payload.ids_arg([3, 1], None, root="", n=2), [3, 1])
    frame = codec.pack_array(np.array([5, 6], np.int64))
    np.testing.assert_array_equal(payload.ids_arg(frame, None, root="", n=None), [5, 6])
    for bad in ([1.5], [True], [2**63], {"dtype": "<f4", "shape": [1], "data": b"\0" * 4}):
        with pytest.raises(InvalidIds):
            payload.ids_arg(bad, None, root="", n=None)


def test_batch_id_and_time_limit() -> None:
    """The task id stands in for a missing batch id; limits must be positive numbers."""
    assert payload.batch_id_arg(None, "task-1") == "task-1"
    assert payload.batch_id_arg("b", "task-1") == "b"
    for bad in ("", 5, "x" * 201):
        with pytest.raises(InvalidParameter):
            payload.batch_id_arg(bad, None)
    assert payload.time_limit_arg(None, 7.0) == 7.0
    for bad_limit in (0, -1, True, "1"):
        with pytest.raises(InvalidParameter):
            payload.time_limit_arg(bad_limit, 7.0)


def test_vectors_the_engine_would_refuse_never_reach_the_log() -> None:
    """NaN rows, zero rows under cosine, a wrong dimension: refused before logging."""
    from faissq.errors import DimensionMismatch
    from faissq.index.engine import Engine
    from faissq.tasks.jobs import check_vectors

    engine = Engine(4, Settings().index)
    ok = np.ones((3, 4), np.float32)
    check_vectors(ok, engine, "cosine")
    nan, zero = ok.copy(), ok.copy()
    nan[2, 1] = np.nan
    zero[1] = 0
    with pytest.raises(InvalidVectors, match="row 2"):
        check_vectors(nan, engine, "cosine")
    with pytest.raises(InvalidVectors, match="zero"):
        check_vectors(zero, engine, "cosine")
    check_vectors(zero, engine, "l2")  # a zero vector is a fine point under L2
    with pytest.raises(DimensionMismatch):
        check_vectors(np.ones((3, 5), np.float32), engine, "cosine")


def test_attributes_come_inline_or_by_a_checked_reference(settings: Settings) -> None:
    """attributes_ref names a msgpack map under the root (put_attributes), checked like the
    other references; one form at most; a file that is no map is InvalidAttributes."""
    root = settings.storage.url
    cols = {"tenant": [1, None], "lang": ["en", None]}
    assert payload.attributes_arg(None, None, root=root) is None
    assert payload.attributes_arg(cols, None, root=root) == cols
    ref = put_attributes(settings, {"tenant": np.array([1, 2]), "lang": ("en", None)})
    assert set(ref) == {"path", "sha256"} and ref["path"].endswith(".msgpack")
    got = payload.attributes_arg(None, ref, root=root)
    assert got == {"tenant": [1, 2], "lang": ["en", None]}
    with pytest.raises(InvalidParameter, match="not both"):
        payload.attributes_arg(cols, ref, root=root)
    with pytest.raises(ChecksumMismatch):
        payload.attributes_arg(None, {**ref, "sha256": "f" * 64}, root=root)
    with pytest.raises(InvalidParameter, match="outside"):
        payload.attributes_arg(None, {**ref, "path": "../x.msgpack"}, root=root)
    with pytest.raises(InvalidParameter, match="lacks"):
        payload.attributes_arg(None, {"path": ref["path"]}, root=root)
    npy = put_vectors(settings, np.ones((2, 2), np.float32))
    with pytest.raises(InvalidAttributes):
        payload.attributes_arg(None, npy, root=root)
