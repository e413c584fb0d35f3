"""The tombstone selector rejects exactly its ids, whether it is a bitmap or a hashed batch."""

from __future__ import annotations

import numpy as np
import pytest

from faissq.index.params import bitmap_selector, not_selector


@pytest.mark.parametrize(
    ("ids", "bitmap"),
    [
        (np.array([0, 3, 7, 8, 9, 1000, 99_999], dtype=np.int64), True),  # small ids: a bitmap
        (np.array([5, 2**40, 2**40 + 3], dtype=np.int64), False),  # sparse: a hashed batch
    ],
)
def test_not_selector_rejects_exactly_its_ids(ids: np.ndarray, bitmap: bool) -> None:
    """Every id in the set is rejected and every other passes, past the bitmap's end too."""
    assert (bitmap_selector(ids) is not None) is bitmap
    sel, keep = not_selector(ids)
    probe = np.unique(np.concatenate([ids, ids + 1, ids - 1, np.arange(0, 2000), [2**20, 2**41]]))
    probe = probe[probe >= 0]
    passed = np.array([sel.is_member(int(i)) for i in probe])
    assert keep
    np.testing.assert_array_equal(passed, ~np.isin(probe, ids))


def test_bitmap_selector_declines_a_large_or_negative_range() -> None:
    """A bitmap larger than the id array (beyond its floor) or a negative id: no bitmap."""
    assert bitmap_selector(np.array([2**30], dtype=np.int64)) is None
    assert bitmap_selector(np.array([-1, 4], dtype=np.int64)) is None
    assert bitmap_selector(np.empty(0, dtype=np.int64)) is None
