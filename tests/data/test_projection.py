"""The layout cost projection (megatron/data/projection.py), against hand-counted token slots."""

from __future__ import annotations

import numpy as np
import pytest

from megatron.data.projection import format_projection, project_layouts


def _pair(p: int, c: int, r: int) -> dict:
    return {
        "prompt": np.arange(1, p + 1),
        "chosen": np.arange(1, c + 1),
        "rejected": np.arange(1, r + 1),
    }


def test_hand_counted_costs():
    """Two pairs (prompt 3, chosen 2, rejected 1), one micro-batch, seq_length 16, no rounding.

    padded: sequences 5, 5, 4, 4 in 4 rows of width 5 -> 20 slots, 18 real, 4 * 25 attention.
    packed: first-fit decreasing needs two rows, balanced to 5 + 4 in each: width 9 -> 18
    slots, 18 real; 2 * 81 scores (gathering the 4 sequences into rows of 5, 4 * 25, would not
    halve that). prefix_shared: two spans of 3 + 2 + 1 = 6, one
    per row of width 6 -> 12 slots, 12 real (each prompt once), 2 * 36 (gathering would save
    nothing); prefix_shared_packed: both spans in one row of width 12 -> 12 slots, 12 real, the
    two spans gathered: 2 * 36 (dense: 144).
    """
    layouts = ("padded", "packed", "prefix_shared", "prefix_shared_packed")
    costs = project_layouts([_pair(3, 2, 1)] * 2, layouts, 2, 16, 1)
    got = {c.layout: (c.rows, c.grid, c.real, c.attention) for c in costs}
    assert got == {
        "padded": (4, 20, 18, 100),
        "packed": (2, 18, 18, 162),
        "prefix_shared": (2, 12, 12, 72),
        "prefix_shared_packed": (1, 12, 12, 72),
    }
    assert costs[2].efficiency == pytest.approx(1.0)
    table = format_projection(costs)
    assert table[0].split()[:2] == ["layout", "rows"]
    assert table[3].split()[-2:] == [f"{20 / 12:.2f}", f"{100 / 72:.2f}"]
    assert table[4].split()[-2:] == [f"{20 / 12:.2f}", f"{100 / 72:.2f}"]


def test_max_rows_limits_the_pairs():
    costs = project_layouts([_pair(2, 2, 2)] * 10, ("padded",), 4, 16, 1, max_rows=3)
    assert costs[0].rows == 6 and costs[0].real == 3 * 8
