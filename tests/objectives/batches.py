"""Pair, unpaired and sequence micro-batches from per-sequence token log-probs, in two layouts.

The data layer's contract: ``loss_mask [b, s]`` float32 (1 on trained targets), ``sequence_ids
[b, s]`` int64 (-1 where masked), ``num_sequences`` (2P for P pairs: chosen 0..P-1, rejected
P..2P-1). ``padded`` puts one sequence per row after a masked prompt position; ``packed`` puts
several sequences per row, each after a masked gap (its prompt). Positions that are not targets
hold NaN in ``token_logps`` so that a leak through the mask shows up.
"""

from __future__ import annotations

import math

import torch

from megatron.data.batch import Batch
from megatron.model.layout import SequenceLayout

NAN = float("nan")


def sequence_batch(
    seqs: list[list[float]], layout: str = "padded", fill: float = NAN
) -> tuple[torch.Tensor, Batch]:
    """``(token_logps [b, s] fp32 leaf with grad, batch)`` for sequences of target log-probs."""
    if layout == "padded":
        rows = [[(None, None)] + [(i, v) for v in seq] for i, seq in enumerate(seqs)]
    elif layout == "packed":
        rows = [[], []]
        for i, seq in enumerate(seqs):
            gap = [(None, None)] * (1 + i % 2)  # a masked "prompt" before each sequence
            rows[i % 2] += gap + [(i, v) for v in seq]
    else:
        raise ValueError(layout)
    s = max(len(r) for r in rows) + 1
    logps = torch.full((len(rows), s), fill)
    ids = torch.full((len(rows), s), -1, dtype=torch.int64)
    for b, row in enumerate(rows):
        for t, (i, v) in enumerate(row):
            if i is not None:
                logps[b, t], ids[b, t] = v, i
    tokens = torch.zeros_like(ids)  # the objectives never read the inputs
    batch = Batch(
        tokens=tokens,
        targets=tokens,
        loss_mask=(ids >= 0).float(),
        layout=SequenceLayout.causal(*ids.shape),
        sequence_ids=ids,
        num_sequences=len(seqs),
    )
    return logps.requires_grad_(True), batch


def pair_batch(
    chosen: list[list[float]], rejected: list[list[float]], layout: str = "padded"
) -> tuple[torch.Tensor, Batch]:
    """:func:`sequence_batch` of ``chosen + rejected`` (sequence i pairs with P + i)."""
    assert len(chosen) == len(rejected)
    return sequence_batch(chosen + rejected, layout)


def unpaired_batch(
    examples: list[list[float]],
    labels: list[bool],
    kl: list[list[float]] | None = None,
    layout: str = "padded",
) -> tuple[torch.Tensor, Batch]:
    """:func:`sequence_batch` of an unpaired micro-batch: the n examples, then their n KL
    sequences (none when ``kl`` is None), with ``labels [n]`` bool and ``kl_start = n``."""
    assert kl is None or len(kl) == len(examples) == len(labels)
    logps, batch = sequence_batch(examples + (kl or []), layout)
    batch = batch.replace(labels=torch.tensor(labels, dtype=torch.bool), kl_start=len(examples))
    return logps, batch


def reference(chosen: list[float], rejected: list[float]) -> dict[str, torch.Tensor]:
    """Per-sequence reference log-probs as the trainer hands them to the objective."""
    return {"chosen_logps": torch.tensor(chosen), "rejected_logps": torch.tensor(rejected)}


def logsig(x: float) -> float:
    """``log sigma(x)`` in plain floats, for hand-worked expectations."""
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def sig(x: float) -> float:
    """``sigma(x)`` in plain floats."""
    return 1.0 / (1.0 + math.exp(-x))


def scored_batch(score_index: torch.Tensor, margin: torch.Tensor | None = None) -> Batch:
    """A reward-model batch that only says where each sequence is scored (``score_index``)."""
    tokens = torch.zeros(1, int(score_index.max()) + 1, dtype=torch.long)
    return Batch(
        tokens=tokens,
        targets=tokens,
        loss_mask=torch.zeros(tokens.shape),
        layout=SequenceLayout.causal(*tokens.shape),
        score_index=score_index,
        margin=margin,
    )
