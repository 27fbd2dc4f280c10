"""How much a row layout saves on a dataset, from token counts alone (no model run).

For each layout the pairs are collated exactly as training would (micro-batches of consecutive
rows) and three quantities are summed over the micro-batches:

* ``grid``: ``b * s`` token slots of the collated ``[b, s]`` batch — the linear layers, the MLP
  and the vocabulary projection cost this much (padding included: they compute it);
* ``real``: tokens that are not padding (for ``prefix_shared`` the prompt counts once per pair);
* ``attention``: query-key scores of the batch's attention plan
  (:func:`megatron.model.layout.attention_scores`): ``b * s^2`` for a dense mask, ``n * L^2``
  when the rows' ``n`` groups (packed sequences, prefix-shared spans; ``L`` the longest) are
  gathered into their own rows — so packing no longer multiplies attention work.

The projected speed-up of layout ``L`` over ``padded`` is ``grid(padded) / grid(L)`` where the
linear layers dominate (short rows, wide models) and tends to ``attention(padded) /
attention(L)`` where attention does (long rows). Packing raises the share of real tokens;
prefix sharing also removes the second copy of every prompt. The benchmark
(``tools/bench/dpo_vs_trl.py --layout``) measures the real ratio; this model says what to expect
on a user's own data (``tools/inspect_data.py PREFIX --layouts``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from megatron.data.collators import Collator
from megatron.model.layout import attention_scores


@dataclass(frozen=True)
class LayoutCost:
    """Token counts of one layout over the projected micro-batches (see the module docstring)."""

    layout: str
    rows: int
    grid: int
    real: int
    attention: int

    @property
    def efficiency(self) -> float:
        """Real tokens per token slot."""
        return self.real / self.grid if self.grid else 0.0


def project_layouts(
    dataset: Any,
    layouts: Sequence[str],
    micro_batch: int,
    seq_length: int,
    pad_to_multiple_of: int = 8,
    max_rows: int | None = None,
) -> list[LayoutCost]:
    """:class:`LayoutCost` per layout for the pairs of ``dataset`` (a pairwise dataset).

    Args:
        dataset: indexable pairs (``prompt``, ``chosen``, ``rejected`` token arrays).
        layouts: e.g. ``("padded", "packed", "prefix_shared", "prefix_shared_packed")``.
        micro_batch: pairs per micro-batch (``training.micro_batch_size``).
        seq_length: ``data.seq_length``.
        pad_to_multiple_of: ``data.pad_to_multiple_of``.
        max_rows: project the first ``max_rows`` pairs only (``None``: all).

    Returns:
        One :class:`LayoutCost` per layout, in the order given.
    """
    n = len(dataset) if max_rows is None else min(len(dataset), max_rows)
    out = []
    for layout in layouts:
        collate = Collator("pair", layout, seq_length, pad_to_multiple_of)
        rows = grid = real = attention = 0
        for start in range(0, n, micro_batch):
            batch = collate([dataset[i] for i in range(start, min(start + micro_batch, n))])
            b, s = batch.tokens.shape
            rows, grid = rows + b, grid + b * s
            attention += attention_scores(batch.layout)
            real += int(batch.stats["real_tokens"])
        out.append(LayoutCost(layout, rows, grid, real, attention))
    return out


def format_projection(costs: list[LayoutCost]) -> list[str]:
    """A table of the costs with the projected speed-ups over the first layout."""
    base = costs[0]
    lines = [
        f"{'layout':<20} {'rows':>7} {'token slots':>12} {'real':>10} {'efficiency':>10} "
        f"{'x linear':>9} {'x attention':>11}"
    ]
    for c in costs:
        lines.append(
            f"{c.layout:<20} {c.rows:>7} {c.grid:>12} {c.real:>10} {c.efficiency:>10.1%} "
            f"{base.grid / max(c.grid, 1):>9.2f} {base.attention / max(c.attention, 1):>11.2f}"
        )
    return lines
