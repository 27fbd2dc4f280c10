"""Policy-gradient math (megatron/objectives/policy_gradient.py, megatron/rollout/advantages.py)
against hand-worked values and against TRL 1.16's own GRPO / RLOO loss code on fixed per-token
inputs.

TRL's losses are trainer methods: they are called unbound on an object made with
``object.__new__`` that carries only the attributes they read, with the model's per-token
log-probs supplied by a stub ``_get_per_token_logps_and_entropies`` (see trl_stubs.py for the same
technique on the DPO family). Both sides compute the same fp32 expressions in the same order up to
reduction order, so losses agree to a few fp32 ulps of O(1) values: atol 1e-6; a wrong reduction
(e.g. sequence mean vs token mean) moves them by O(0.1) on these ragged masks.
"""

from __future__ import annotations

import math
import types
from collections import defaultdict

import pytest
import torch

from megatron.objectives.policy_gradient import LOSS_TYPES, grpo_loss, k3_kl, rloo_loss
from megatron.rollout.advantages import (
    group_advantages,
    nanstd,
    rloo_advantages,
    rloo_kl_penalty,
)

B, T, G = 6, 5, 3
ATOL = 1e-6  # see the module docstring


def _inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    logps = -torch.rand(B, T, generator=g) * 2
    old = logps + 0.3 * torch.randn(B, T, generator=g)  # ratios well outside [0.8, 1.28]
    ref = logps + 0.2 * torch.randn(B, T, generator=g)
    lengths = torch.tensor([5, 3, 1, 4, 2, 5])
    mask = (torch.arange(T).unsqueeze(0) < lengths.unsqueeze(1)).float()
    adv = torch.tensor([1.0, -0.5, 0.25, -1.5, 2.0, -0.75])
    return logps, old, ref, mask, adv


def test_group_advantages_hand_worked():
    """Group (1, 2, 3): mean 2, Bessel std 1 -> (r - 2) / (1 + 1e-4); group (5, 5, 5): std 0,
    advantages 0 and flagged; a NaN reward is left out of its group (mean of 4 and 6 is 5,
    std sqrt(2)) and gets advantage 0."""
    r = torch.tensor([1.0, 2.0, 3.0, 5.0, 5.0, 5.0, 4.0, float("nan"), 6.0])
    out = group_advantages(r, 3, "group")
    s2 = math.sqrt(2)
    want = [-1 / 1.0001, 0.0, 1 / 1.0001, 0, 0, 0, -1 / (s2 + 1e-4), 0.0, 1 / (s2 + 1e-4)]
    torch.testing.assert_close(out.advantages, torch.tensor(want), rtol=0, atol=1e-6)
    assert out.zero_std.tolist() == [False] * 3 + [True] * 3 + [False] * 3
    none = group_advantages(r, 3, "none").advantages
    assert none.tolist() == [-1.0, 0.0, 1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 1.0]
    batch = group_advantages(r[:6], 3, "batch")
    std = float(torch.tensor([1.0, 2.0, 3.0, 5.0, 5.0, 5.0]).std())  # Bessel, like torch.std
    torch.testing.assert_close(batch.std, torch.full((6,), std))
    with pytest.raises(ValueError, match="scale_rewards must be one of"):
        group_advantages(r, 3, "global")


def test_nanstd_is_bessel_corrected_and_nan_aware():
    x = torch.tensor([[1.0, 3.0, float("nan")], [2.0, float("nan"), float("nan")]])
    assert nanstd(x, dim=1)[0].item() == pytest.approx(math.sqrt(2))
    assert math.isnan(nanstd(x, dim=1)[1].item())  # one value: undefined, as in TRL


def test_rloo_advantages_hand_worked():
    """Group (1, 2, 3): baselines (5/2, 4/2, 3/2) -> (-1.5, 0, 1.5); a NaN reward leaves its
    siblings' baseline the other scorable one's reward and gets 0."""
    r = torch.tensor([1.0, 2.0, 3.0, 4.0, float("nan"), 6.0])
    assert rloo_advantages(r, 3).tolist() == [-1.5, 0.0, 1.5, -2.0, 0.0, 2.0]
    norm = rloo_advantages(r, 3, normalize=True)
    assert float(norm.sum()) == pytest.approx(0.0, abs=1e-6)


def test_k3_is_zero_at_equality_and_positive():
    x = torch.tensor([-1.0, -2.0])
    assert k3_kl(x, x).tolist() == [0.0, 0.0]
    assert bool((k3_kl(x, x + torch.tensor([0.5, -0.5])) > 0).all())


def test_ratio_one_gives_the_plain_policy_gradient():
    """old = current (mu = 1): ratio == 1 everywhere, nothing clipped, and the gradient of the
    grpo-type loss is -A / |o| on each of a sequence's log-probs, divided by B."""
    logps, _, _, mask, adv = _inputs()
    logps = logps.clone().requires_grad_(True)
    loss, metrics = grpo_loss(logps, None, adv, mask, loss_type="grpo")
    loss.backward()
    want = -(adv.unsqueeze(1) * mask / mask.sum(1, keepdim=True)) / B
    torch.testing.assert_close(logps.grad, want, rtol=0, atol=1e-7)
    assert float(loss.detach()) == pytest.approx(float(-adv.mean()), abs=1e-6)
    assert all(_value(metrics[k]) == 0.0 for k in metrics if k.startswith("clip_ratio"))


class _Reduce:
    num_processes = 1

    def reduce(self, x, reduction="sum"):
        return x

    def gather(self, x):
        return x


def _run_trl(cls, attrs: dict, logps: torch.Tensor, mask, adv, **extra):
    """``cls._compute_loss`` on an uninitialised trainer carrying ``attrs`` (plus the common
    ones), its model's per-token log-probs being ``logps``: ``(loss, last metrics)``."""
    trainer = object.__new__(cls)
    trainer.__dict__.update(
        aux_loss_enabled=False,
        accelerator=_Reduce(),
        model=types.SimpleNamespace(training=True),
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        **attrs,
    )
    entropies = torch.zeros_like(logps)
    trainer._get_per_token_logps_and_entropies = lambda *a, **k: (logps, entropies, None)
    inputs = {
        "prompt_ids": torch.zeros(B, 1, dtype=torch.long),
        "prompt_mask": torch.ones(B, 1, dtype=torch.long),
        "completion_ids": torch.zeros(B, T, dtype=torch.long),
        "completion_mask": mask,
        "advantages": adv,
        **extra,
    }
    loss = cls._compute_loss(trainer, None, inputs)
    return loss, {k: v[-1] for k, v in trainer._metrics["train"].items()}


def _trl_grpo(
    loss_type, epsilon, epsilon_high, beta, logps, old, ref, mask, adv, max_len, items, bias=True
):
    """TRL 1.16's ``GRPOTrainer._compute_loss`` on these per-token values."""
    from trl import GRPOTrainer

    attrs = dict(
        loss_type=loss_type,
        epsilon_low=epsilon,
        epsilon_high=epsilon_high,
        beta=beta,
        top_entropy_quantile=1.0,
        off_policy_mask_threshold=None,
        importance_sampling_level="token",
        use_vllm=False,
        vllm_importance_sampling_correction=False,
        _entropy_bonus_enabled=False,
        current_gradient_accumulation_steps=1,
        max_completion_length=max_len,
        args=types.SimpleNamespace(use_bias_correction_kl=bias, delta=None, steps_per_generation=1),
    )
    extra = {"old_per_token_logps": old, "ref_per_token_logps": ref}
    extra["num_items_in_batch"] = torch.tensor(items)
    return _run_trl(GRPOTrainer, attrs, logps, mask, adv, **extra)


def _value(metric) -> float:
    """A metric's number (a Max / Min carries it in ``value``)."""
    return float(getattr(metric, "value", metric))


CLIP_KEYS = (
    "clip_ratio/low_mean",
    "clip_ratio/high_mean",
    "clip_ratio/region_mean",
    "clip_ratio/low_min",
    "clip_ratio/high_max",
)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize(
    ("epsilon_high", "beta", "bias"), [(0.2, 0.0, True), (0.28, 0.04, True), (0.28, 0.04, False)]
)
def test_grpo_loss_equals_trl(loss_type, epsilon_high, beta, bias):
    logps, old, ref, mask, adv = _inputs(1)
    items = float(mask.sum()) * 1.5  # dapo: the global batch's tokens, not this micro-batch's
    want, want_m = _trl_grpo(
        loss_type, 0.2, epsilon_high, beta, logps, old, ref, mask, adv, T, items, bias
    )
    got, got_m = grpo_loss(
        logps,
        old,
        adv,
        mask,
        loss_type=loss_type,
        epsilon=0.2,
        epsilon_high=epsilon_high,
        beta=beta,
        ref_logps=ref,
        bias_correction_kl=bias,
        max_completion_length=T,
        num_items=items,
    )
    assert abs(float(got) - float(want)) <= ATOL
    for key in CLIP_KEYS:
        assert _value(got_m[key]) == pytest.approx(want_m[key], abs=ATOL), key
    assert 0 < want_m["clip_ratio/region_mean"] < 1, "the inputs must exercise the clip"
    if beta:
        assert float(got_m["kl"]) == pytest.approx(want_m["kl"], abs=ATOL)


def test_grpo_reductions_differ_on_ragged_masks():
    """The four reductions give different losses here, so the parity above is not vacuous (dapo
    over this micro-batch alone would be bnpo: its denominator is the global batch's tokens;
    25 of them here, not B * T = 30, which would make it dr_grpo's)."""
    logps, old, _, mask, adv = _inputs(1)
    items = float(mask.sum()) * 1.25
    losses = [
        float(
            grpo_loss(logps, old, adv, mask, loss_type=t, max_completion_length=T, num_items=items)[
                0
            ]
        )
        for t in LOSS_TYPES
    ]
    assert len({round(v, 4) for v in losses}) == len(LOSS_TYPES)


def test_rloo_loss_and_kl_penalty_hand_worked():
    """Two sequences, old = current: ratio 1, loss = -mean(A); k1 penalty sums old - ref."""
    logps = torch.tensor([[-1.0, -2.0], [-0.5, 0.0]])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    seq = (logps * mask).sum(1)
    loss, metrics = rloo_loss(logps, seq, torch.tensor([2.0, -1.0]), mask)
    assert float(loss) == pytest.approx(-0.5) and _value(metrics["clip_ratio/region_mean"]) == 0
    ref = torch.tensor([[-1.5, -1.0], [-0.5, 9.0]])
    assert rloo_kl_penalty(logps, ref, mask).tolist() == [-0.5, 0.0]


def test_rloo_loss_equals_trl():
    """TRL 1.16's ``RLOOTrainer._compute_loss`` (sequence-level ratio) on the same inputs."""
    from trl import RLOOTrainer

    logps, old_tok, _, mask, adv = _inputs(2)
    old = (old_tok * mask).sum(1)  # the sampling policy's sequence log-probs
    attrs = {"epsilon_low": 0.2, "epsilon_high": 0.28}
    want, want_m = _run_trl(RLOOTrainer, attrs, logps, mask, adv, old_logps=old)
    got, got_m = rloo_loss(logps, old, adv, mask, epsilon=0.2, epsilon_high=0.28)
    assert abs(float(got) - float(want)) <= ATOL
    for key in CLIP_KEYS:
        assert _value(got_m[key]) == pytest.approx(want_m[key], abs=ATOL), key
    assert 0 < want_m["clip_ratio/region_mean"] < 1, "the inputs must exercise the clip"
