"""Per-sequence reductions of megatron/objectives/logprobs.py, in padded and packed layouts."""

from __future__ import annotations

import pytest
import torch

from megatron.objectives.logprobs import (
    ld_pair_log_probs,
    pair_log_probs,
    sequence_log_probs,
    split_pairs,
    token_positions,
)
from tests.objectives.batches import pair_batch, sequence_batch

# chosen: [-1, -2] (sum -3, n 2), [-4] (sum -4, n 1); rejected: [-2, -2, -2] (-6, 3), [-0.5, -1.5] (-2, 2)
CHOSEN = [[-1.0, -2.0], [-4.0]]
REJECTED = [[-2.0, -2.0, -2.0], [-0.5, -1.5]]


@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_sequence_sums_and_counts(layout):
    logps, batch = pair_batch(CHOSEN, REJECTED, layout)
    sums, counts = sequence_log_probs(logps, batch)
    assert sums.dtype == counts.dtype == torch.float32
    torch.testing.assert_close(sums, torch.tensor([-3.0, -4.0, -6.0, -2.0]))
    torch.testing.assert_close(counts, torch.tensor([2.0, 1.0, 3.0, 2.0]))


@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_masked_nan_does_not_leak_into_sums_or_grads(layout):
    logps, batch = pair_batch(CHOSEN, REJECTED, layout)  # NaN on every masked position
    sums, _ = sequence_log_probs(logps, batch)
    sums.sum().backward()
    assert torch.isfinite(sums).all()
    mask = batch.loss_mask > 0
    assert torch.equal(logps.grad, mask.float())  # d(sum)/d(logp) = 1 on targets, 0 elsewhere


def test_empty_sequence_has_zero_sum_and_count():
    logps, batch = sequence_batch([[-1.0], [], [-2.0, -3.0]])
    sums, counts = sequence_log_probs(logps, batch)
    torch.testing.assert_close(sums, torch.tensor([-1.0, 0.0, -5.0]))
    torch.testing.assert_close(counts, torch.tensor([1.0, 0.0, 2.0]))


def test_mask_zero_with_a_sequence_id_is_not_counted():
    logps, batch = sequence_batch([[-1.0, -2.0]])
    batch.loss_mask[0, 2] = 0.0  # the second target switched off, its id kept
    sums, counts = sequence_log_probs(logps, batch)
    torch.testing.assert_close(sums, torch.tensor([-1.0]))
    torch.testing.assert_close(counts, torch.tensor([1.0]))


def test_pair_split_means_and_valid():
    logps, batch = pair_batch([[-1.0, -2.0], [-4.0]], [[-3.0], []])
    lp = pair_log_probs(logps, batch)
    torch.testing.assert_close(lp.chosen_means, torch.tensor([-1.5, -4.0]))
    torch.testing.assert_close(lp.rejected_means, torch.tensor([-3.0, 0.0]))  # count clamped to 1
    assert lp.valid.tolist() == [True, False]
    # token-mean NLL over all chosen tokens: (1 + 2 + 4) / 3
    torch.testing.assert_close(lp.chosen_nll(), torch.tensor(7.0 / 3.0))


def test_split_pairs_rejects_odd():
    with pytest.raises(ValueError, match="even"):
        split_pairs(torch.zeros(3))


@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_token_positions(layout):
    logps, batch = pair_batch(CHOSEN, REJECTED, layout)
    pos = token_positions(batch)
    ids = batch.sequence_ids
    for i, seq in enumerate(CHOSEN + REJECTED):
        assert pos[ids == i].tolist() == list(range(1, len(seq) + 1))
    assert (pos[ids < 0] == 0).all()


@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_ld_weighting(layout):
    """LD-DPO, alpha = 0.5: pair 0 shares l = min(2, 3) = 2 tokens, so the rejected's third token
    counts half: -2 - 2 + 0.5 * -2 = -5; pair 1 shares l = 1: rejected -0.5 + 0.5 * -1.5 = -1.25.
    Chosen sequences are never longer than l here, so they keep their sums (-3, -4)."""
    logps, batch = pair_batch(CHOSEN, REJECTED, layout)
    out = ld_pair_log_probs(logps, batch, 0.5)
    torch.testing.assert_close(out, torch.tensor([-3.0, -4.0, -5.0, -1.25]))
    torch.testing.assert_close(
        ld_pair_log_probs(logps, batch, 1.0), sequence_log_probs(logps, batch)[0]
    )
    out.sum().backward()
    assert torch.isfinite(logps.grad).all()
