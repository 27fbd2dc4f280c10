"""The online RL objectives (grpo, rloo, reinforce) on training micro-batches.

* The grid form of the losses (any ``[b, s]`` layout, tokens named by ``sequence_ids``) equals the
  ``[B, T]`` form TRL's code was checked against (test_policy_gradient.py), values and gradients,
  for padded and packed rows whose non-target positions hold NaN (a leak through the mask would
  show). Both compute the same fp32 expressions; only the order of the sums differs: atol 1e-6.
* REINFORCE against hand-worked values (GPT-NeoX's loss times the micro-batch size: see the
  objective's docstring) and its moving-average baseline.
* The objectives read their inputs from :class:`RolloutFields` and report TRL's metrics.
"""

from __future__ import annotations

import math

import pytest
import torch

from megatron.data.batch import RolloutFields
from megatron.objectives import get_objective
from megatron.objectives.online import RolloutStats
from megatron.objectives.policy_gradient import (
    LOSS_TYPES,
    grpo_loss,
    reinforce_loss,
    reinforce_penalty,
    rloo_loss,
)
from megatron.objectives.registry import Max
from megatron.rollout.advantages import moving_average_advantages
from tests.objectives.batches import sequence_batch

ATOL = 1e-6  # see the module docstring
SEQS = [[-1.0, -2.0, -0.5], [-0.3], [-2.5, -0.1, -0.7, -1.2], [-0.9, -1.1]]
ADV = torch.tensor([1.0, -0.5, 2.0, -1.5])


def _dense(values: list[list[float]]) -> tuple[torch.Tensor, torch.Tensor]:
    """``([B, T] values, [B, T] mask)`` right-padded with zeros."""
    t = max(map(len, values))
    x = torch.zeros(len(values), t)
    mask = torch.zeros(len(values), t)
    for i, v in enumerate(values):
        x[i, : len(v)] = torch.tensor(v)
        mask[i, : len(v)] = 1
    return x, mask


def _shifted(delta: float) -> list[list[float]]:
    """Old / reference log-probs: the policy's moved by +-delta (ratios leave the clip range)."""
    return [
        [v + (delta if (i + j) % 2 else -delta) for j, v in enumerate(s)]
        for i, s in enumerate(SEQS)
    ]


def _grids(layout: str):
    logps, batch = sequence_batch(SEQS, layout)
    old, _ = sequence_batch(_shifted(0.3), layout)
    ref, _ = sequence_batch(_shifted(0.2), layout)
    return logps, old.detach(), ref.detach(), batch


@pytest.mark.parametrize("layout", ["padded", "packed"])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_grpo_grid_equals_dense(layout, loss_type):
    logps, old, ref, batch = _grids(layout)
    kw = dict(
        loss_type=loss_type, epsilon_high=0.28, beta=0.04, max_completion_length=4, num_items=7.5
    )
    got, got_m = grpo_loss(
        logps, old, ADV, batch.loss_mask, ref_logps=ref, sequence_ids=batch.sequence_ids,
        num_sequences=batch.num_sequences, **kw,
    )  # fmt: skip
    got.backward()
    dense = _dense(SEQS)[0].requires_grad_(True)
    old_d, mask = _dense(_shifted(0.3))[0], _dense(SEQS)[1]
    want, want_m = grpo_loss(dense, old_d, ADV, mask, ref_logps=_dense(_shifted(0.2))[0], **kw)
    want.backward()
    assert float(got.detach()) == pytest.approx(float(want.detach()), abs=ATOL)
    for k, v in want_m.items():
        assert float(getattr(got_m[k], "value", got_m[k])) == pytest.approx(
            float(getattr(v, "value", v)), abs=ATOL
        ), k
    grid_grads = logps.grad[batch.sequence_ids >= 0]
    torch.testing.assert_close(
        torch.sort(grid_grads).values, torch.sort(dense.grad[mask > 0]).values
    )
    assert torch.isfinite(logps.grad).all()  # NaN at non-targets never reaches the gradient


@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_rloo_and_reinforce_grid_equal_dense(layout):
    logps, old, ref, batch = _grids(layout)
    ids, n = batch.sequence_ids, batch.num_sequences
    dense, mask = _dense(SEQS)
    old_sums = (_dense(_shifted(0.3))[0] * mask).sum(1)
    got, _ = rloo_loss(logps, old_sums, ADV, batch.loss_mask, epsilon_high=0.28, sequence_ids=ids,
                       num_sequences=n)  # fmt: skip
    want, _ = rloo_loss(dense, old_sums, ADV, mask, epsilon_high=0.28)
    assert float(got.detach()) == pytest.approx(float(want.detach()), abs=ATOL)
    for impl in ("abs", "mse", "kl"):
        pen = reinforce_penalty(logps, ref, impl)
        got, _ = reinforce_loss(logps, ADV, batch.loss_mask, kl_div_beta=0.1, penalty=pen,
                                sequence_ids=ids)  # fmt: skip
        ref_d = _dense(_shifted(0.2))[0]
        want, _ = reinforce_loss(
            dense, ADV, mask, kl_div_beta=0.1, penalty=reinforce_penalty(dense, ref_d, impl)
        )
        assert float(got.detach()) == pytest.approx(float(want.detach()), abs=ATOL), impl


def test_reinforce_hand_worked():
    """GPT-NeoX's example: mask [[0,1,1],[0,1,0]], A = (0.5, -1), beta 0.1. NeoX's loss (token
    sum / tokens / B) is 0.358333 (abs), 0.34375 (mse), 0.325 (kl); ours is the token mean, B = 2
    times that. abs by hand: row 0: 0.5*2 + 0.5*3 + 0.1*(0 + 1) = 2.6; row 1: -1*0.5 + 0.1*0.5
    = -0.45; (2.6 - 0.45) / 3 tokens = 0.716667."""
    logps = torch.tensor([[-1.0, -2.0, -3.0], [-1.0, -0.5, -4.0]])
    ref = torch.tensor([[-1.5, -2.0, -2.0], [-1.0, -1.0, -4.0]])
    mask = torch.tensor([[0.0, 1.0, 1.0], [0.0, 1.0, 0.0]])
    adv = torch.tensor([0.5, -1.0])
    for impl, neox in (("abs", 0.358333), ("mse", 0.34375), ("kl", 0.325)):
        pen = reinforce_penalty(logps, ref, impl)
        loss, metrics = reinforce_loss(logps, adv, mask, kl_div_beta=0.1, penalty=pen)
        assert float(loss) == pytest.approx(2 * neox, abs=1e-5), impl
    assert float(reinforce_loss(logps, adv, mask)[0]) == pytest.approx((1.0 + 1.5 - 0.5) / 3)


def test_moving_average_baseline():
    """Groups of 2 with means 0.2, 0.6, 1.0: baselines 0 (nothing before), 0.2, (0.2 + 0.6) / 2;
    a window of 1 forgets all but the last group; a group without any reward keeps the history."""
    r = torch.tensor([0.0, 0.4, 0.5, 0.7, 1.0, 1.0])
    adv, hist = moving_average_advantages(r, 2, [], 100)
    torch.testing.assert_close(adv, torch.tensor([0.0, 0.4, 0.3, 0.5, 0.6, 0.6]))
    assert hist == pytest.approx([0.2, 0.6, 1.0])
    adv, hist = moving_average_advantages(r, 2, [5.0], 1)
    torch.testing.assert_close(adv, r - torch.tensor([5.0, 5.0, 0.2, 0.2, 0.6, 0.6]))
    nan = torch.tensor([math.nan, math.nan, 1.0, 2.0])
    adv, hist = moving_average_advantages(nan, 2, [1.0], 100)
    assert adv.tolist() == [0.0, 0.0, 0.0, 1.0] and hist == [1.0, 1.5]


def _objective(name: str, **params):
    cls = get_objective(name)
    return cls(cls.Config(**params))


def _rollout_batch(layout="packed", sampler=False):
    logps, old, ref, batch = _grids(layout)
    flat = lambda t: t.reshape(-1)  # noqa: E731  [b, s] -> [b * s]: no extra targets here
    fields = RolloutFields(
        advantages=ADV, old_logps=flat(old), ref_logps=flat(ref),
        sampler_logps=flat(old) if sampler else None, num_items=10.0, max_new_tokens=4,
    )  # fmt: skip
    policy = {"token_logps": logps, "entropy": torch.full_like(logps, 2.0)}
    return policy, batch.replace(rollout=fields)


def test_objectives_read_the_rollout_fields():
    policy, batch = _rollout_batch(sampler=True)
    grpo = _objective("grpo", loss_type="dapo", beta=0.04, epsilon_high=0.28)
    loss, metrics = grpo.loss(policy, None, batch)
    grid = lambda t: t.view_as(batch.loss_mask)  # noqa: E731
    want, _ = grpo_loss(
        policy["token_logps"], grid(batch.rollout.old_logps), ADV, batch.loss_mask,
        loss_type="dapo", epsilon_high=0.28, beta=0.04, ref_logps=grid(batch.rollout.ref_logps),
        num_items=10.0, sequence_ids=batch.sequence_ids, num_sequences=4,
    )  # fmt: skip
    assert float(loss) == pytest.approx(float(want), abs=ATOL)
    assert float(metrics["entropy"]) == pytest.approx(2.0)
    assert float(metrics["sampling/logp_difference/mean"]) == pytest.approx(0.3, abs=1e-6)
    assert isinstance(metrics["sampling/logp_difference/max"], Max)
    assert {"kl", "clip_ratio/region_mean", "clip_ratio/high_max"} <= set(metrics)
    rloo = _objective("rloo", beta=0.05)
    loss, metrics = rloo.loss(policy, None, batch)
    assert math.isfinite(float(loss)) and "clip_ratio/low_min" in metrics
    reinforce = _objective("reinforce", kl_impl="abs", kl_div_beta=0.1)
    loss, metrics = reinforce.loss(policy, None, batch)
    assert math.isfinite(float(loss)) and "kl" in metrics
    with pytest.raises(ValueError, match="rollout batches"):
        grpo.loss(policy, None, batch.replace(rollout=None))


def test_advantages_of_each_objective():
    r = torch.tensor([1.0, 0.0, 0.5, 0.5])
    stats = RolloutStats(
        old_sums=torch.tensor([-2.0, -1, -3, -1]), ref_sums=torch.tensor([-2.5, -1, -2, -1]),
        old_ref_tokens=torch.tensor([3.0, 1, 4, 2]),
    )  # fmt: skip
    adv, m = _objective("grpo", num_generations=2).advantages(r, stats)
    torch.testing.assert_close(adv, torch.tensor([0.5, -0.5, 0, 0]) / (math.sqrt(0.5) + 1e-4))
    assert m["frac_reward_zero_std"] == 0.5
    # rloo: r - beta * (old - ref) = (1 - 0.05*0.5, 0, 0.5 + 0.05, 0.5), then leave-one-out
    adv, m = _objective("rloo", num_generations=2, beta=0.05).advantages(r, stats)
    torch.testing.assert_close(adv, torch.tensor([0.975, -0.975, 0.05, -0.05]))
    assert m["kl"] == pytest.approx((0.5 - 1.0) / 10)
    reinforce = _objective("reinforce", num_generations=2, baseline="moving_average")
    adv, _ = reinforce.advantages(r, stats)
    torch.testing.assert_close(adv, torch.tensor([1.0, 0.0, 0.0, 0.0]))  # baselines 0, then 0.5
    assert reinforce.state_dict() == {"history": [0.5, 0.5]}
    loo = _objective("reinforce", num_generations=2, baseline="loo")
    torch.testing.assert_close(loo.advantages(r, stats)[0], torch.tensor([1.0, -1.0, 0.0, 0.0]))


def test_mu_one_ratio_is_one_and_gradient_is_plain_policy_gradient():
    """No old log-probs (the policy is still the sampler): ratio == 1, nothing clipped, and the
    ``grpo`` loss's gradient is -A_i / |o_i| / B on each of completion i's tokens."""
    policy, batch = _rollout_batch()
    batch = batch.replace(rollout=RolloutFields(advantages=ADV, num_items=1.0, max_new_tokens=4))
    loss, metrics = _objective("grpo", loss_type="grpo").loss(policy, None, batch)
    loss.backward()
    grad = policy["token_logps"].grad
    for i, seq in enumerate(SEQS):
        want = -float(ADV[i]) / len(seq) / len(SEQS)
        torch.testing.assert_close(grad[batch.sequence_ids == i], torch.full((len(seq),), want))
    assert float(metrics["clip_ratio/region_mean"]) == 0.0


def test_reinforce_full_kl_reads_the_kl_output():
    """``kl_impl: full``: the penalty is the model's per-token ``kl`` output (the exact KL); the
    objective asks the step for the reference's hidden states, not the rollout for log-probs."""
    policy, batch = _rollout_batch()
    full = _objective("reinforce", kl_impl="full", kl_div_beta=0.1)
    assert full.needs_reference_hidden and not full.needs_reference_logps
    assert "kl" in full.model_outputs
    kl = torch.rand_like(policy["token_logps"]).requires_grad_(True)
    loss, metrics = full.loss({**policy, "kl": kl}, None, batch)
    want, _ = reinforce_loss(
        policy["token_logps"], ADV, batch.loss_mask, kl_div_beta=0.1, penalty=kl,
        sequence_ids=batch.sequence_ids,
    )  # fmt: skip
    assert float(loss.detach()) == pytest.approx(float(want.detach()), abs=ATOL)
    with pytest.raises(ValueError, match="kl_impl full: the step gave the policy no reference"):
        full.loss(policy, None, batch)
