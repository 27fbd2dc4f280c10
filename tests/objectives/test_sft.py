"""``sft``: token and sequence means, hand-worked.

Sequences of target log-probs: [-1, -2], [-4], [-2, -2, -2], [-0.5, -1.5].
token_mean: (1 + 2 + 4 + 6 + 2) / 8 = 15 / 8 = 1.875.
sequence_mean: per-sequence NLL [1.5, 4, 2, 1] -> mean 8.5 / 4 = 2.125.
"""

from __future__ import annotations

import pytest
import torch

from megatron.objectives import get_objective
from megatron.objectives.sft import SFT, SFTConfig
from tests.objectives.batches import sequence_batch

SEQS = [[-1.0, -2.0], [-4.0], [-2.0, -2.0, -2.0], [-0.5, -1.5]]


@pytest.mark.parametrize("layout", ["padded", "packed"])
@pytest.mark.parametrize(
    ("reduction", "expected"), [("token_mean", 1.875), ("sequence_mean", 2.125)]
)
def test_hand_worked(reduction, expected, layout):
    logps, batch = sequence_batch(SEQS, layout)
    loss, metrics = SFT(SFTConfig(reduction=reduction)).loss({"token_logps": logps}, None, batch)
    torch.testing.assert_close(loss, torch.tensor(expected), atol=1e-6, rtol=0)
    torch.testing.assert_close(metrics["sft/nll"], torch.tensor(1.875), atol=1e-6, rtol=0)
    assert metrics["sft/tokens"].item() == 8
    loss.backward()
    mask = batch.loss_mask > 0
    assert torch.isfinite(logps.grad).all() and (logps.grad[~mask] == 0).all()
    if reduction == "sequence_mean":  # d/d l_t = -1 / (n_i * 4): the single token of seq 1 -> -1/4
        assert metrics["sft/sequences"].item() == 4
        assert sorted(set(logps.grad[mask].tolist())) == pytest.approx([-1 / 4, -1 / 8, -1 / 12])


def test_token_mean_equals_lm_objective():
    logps, batch = sequence_batch(SEQS, "packed")
    ours, _ = SFT(SFTConfig()).loss({"token_logps": logps}, None, batch)
    lm = get_objective("lm")(get_objective("lm").Config())
    policy = {"token_logps": torch.nan_to_num(logps.detach()), "log_z": torch.zeros_like(logps)}
    theirs, _ = lm.loss(policy, None, batch)
    torch.testing.assert_close(ours, theirs)


@pytest.mark.parametrize("reduction", ["token_mean", "sequence_mean"])
def test_empty_sequence_and_all_masked(reduction):
    objective = SFT(SFTConfig(reduction=reduction))
    logps, batch = sequence_batch([[-1.0], [], [-3.0]])
    loss, _ = objective.loss({"token_logps": logps}, None, batch)
    torch.testing.assert_close(loss, torch.tensor(2.0))  # both reductions: (1 + 3) / 2
    logps, batch = sequence_batch([[], []])
    loss, metrics = objective.loss({"token_logps": logps}, None, batch)
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(logps.grad).all()
    assert all(torch.isfinite(v) for v in metrics.values())


def test_registry():
    assert get_objective("sft") is SFT and SFT.batch_kind == "sequence"
    assert SFT.needs_reference_model is False
