"""Advantages for online RL from per-completion rewards: GRPO's group baseline, RLOO's.

Shapes: B completions, ``G`` per prompt with each prompt's completions adjacent.

* **GRPO** (Shao et al., arXiv:2402.03300): a completion's advantage is its reward minus its
  group's mean, divided by the group's standard deviation plus 1e-4 (``scale_rewards="group"``;
  ``"batch"``: the whole batch's std; ``"none"``: not divided — Dr. GRPO, arXiv:2503.20783).
* **RLOO** (Ahmadian et al., arXiv:2402.14740): the baseline of completion i is the mean reward of
  its group's other completions, ``(sum_j r_j - r_i) / (G - 1)``; optionally standardised over the
  batch. With ``beta > 0`` the reward first pays a KL penalty, ``beta * sum_t (old - ref)``.
* **REINFORCE** (GPT-NeoX): leave-one-out as RLOO (not standardised), or a moving-average
  baseline over the means of the last 100 groups (:func:`moving_average_advantages`).

Reference implementation: TRL 1.16's ``GRPOTrainer`` / ``RLOOTrainer``
(``_generate_and_score_completions``); same conventions: ``nanstd`` is Bessel-corrected, and a
completion whose reward is NaN (no reward function applied to it) is left out of its group's
statistics and gets advantage 0. Tested in ``tests/objectives/test_policy_gradient.py``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

SCALE_REWARDS = ("group", "batch", "none")
STD_EPS = 1e-4  # added to the std before dividing (TRL's constant)


def nanstd(x: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Bessel-corrected standard deviation ignoring NaNs (NaN where fewer than 2 values)."""
    keep = dim is not None
    mean = torch.nanmean(x, dim=dim, keepdim=True)
    variance = torch.nanmean((x - mean) ** 2, dim=dim, keepdim=keep)
    count = (~torch.isnan(x)).sum(dim=dim, keepdim=keep)
    correction = torch.where(count > 1, count / (count - 1).clamp(min=1), torch.nan)
    return torch.sqrt(variance * correction)


@dataclass(frozen=True)
class Advantages:
    """Advantages ``[B]`` and the statistics logged with them.

    Attributes:
        advantages: ``[B]``, 0 for completions without a reward.
        std: ``[B]`` the std each advantage was scaled by (its group's, or the batch's).
        zero_std: ``[B]`` bool, True where that std is 0 (a group whose rewards all agree: it
            teaches nothing; ``frac_reward_zero_std`` is its mean).
    """

    advantages: torch.Tensor
    std: torch.Tensor
    zero_std: torch.Tensor


def group_advantages(
    rewards: torch.Tensor, num_generations: int, scale_rewards: str = "group"
) -> Advantages:
    """GRPO's advantages: reward minus the group mean, scaled as ``scale_rewards`` says.

    Args:
        rewards: ``[B]`` total reward per completion (NaN: no reward applied), ``B`` a multiple
            of ``num_generations`` with each prompt's completions adjacent.
        num_generations: ``G``, completions per prompt (>= 2).
        scale_rewards: ``group`` / ``batch`` / ``none`` (see the module docstring).
    """
    if scale_rewards not in SCALE_REWARDS:
        raise ValueError(f"scale_rewards must be one of {SCALE_REWARDS}, got {scale_rewards!r}")
    grouped = rewards.view(-1, num_generations)
    mean = torch.nanmean(grouped, dim=1).repeat_interleave(num_generations)
    if scale_rewards == "batch":
        std = nanstd(rewards).expand_as(rewards)
    else:
        std = nanstd(grouped, dim=1).repeat_interleave(num_generations)
    advantages = rewards - mean
    if scale_rewards != "none":
        advantages = advantages / (std + STD_EPS)
    zero_std = torch.isclose(std, torch.zeros_like(std))
    return Advantages(torch.nan_to_num(advantages, nan=0.0), std, zero_std)


def rloo_advantages(
    rewards: torch.Tensor, num_generations: int, normalize: bool = False
) -> torch.Tensor:
    """RLOO's advantages ``r_i - (sum_{j != i} r_j) / (G' - 1)`` over the scorable siblings
    (``G'`` of them), standardised over the batch when ``normalize``; 0 where undefined."""
    grouped = rewards.view(-1, num_generations)
    scorable = (~torch.isnan(grouped)).sum(dim=1, keepdim=True)
    others = torch.nansum(grouped, dim=1, keepdim=True) - grouped
    advantages = rewards - (others / (scorable - 1)).view(-1)
    if normalize:
        advantages = (advantages - torch.nanmean(advantages)) / (nanstd(advantages) + STD_EPS)
    return torch.nan_to_num(advantages, nan=0.0)


def rloo_kl_penalty(
    old_logps: torch.Tensor, ref_logps: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """``[B]`` RLOO's KL reward penalty per sequence (before ``beta``): the sum over its tokens of
    the first-order estimate ``old - ref`` (may be negative per token)."""
    return ((old_logps - ref_logps) * mask.to(old_logps.dtype)).sum(-1)


def moving_average_advantages(
    rewards: torch.Tensor, num_generations: int, history: list[float], window: int
) -> tuple[torch.Tensor, list[float]]:
    """GPT-NeoX REINFORCE's moving-average baseline, group by group in rollout order.

    Each group's baseline is the mean of the group-mean rewards of up to ``window`` groups before
    it (0 for the first group ever); then the group's own mean joins the history. NeoX keeps one
    history per data-parallel rank (its data server's order); here one history covers every
    rank's groups in rollout order, so any data-parallel layout gives the same advantages.

    Args:
        rewards: ``[B]`` total reward per completion, ``G`` adjacent per prompt (NaN: none
            applied; left out of its group's mean, advantage 0).
        num_generations: ``G`` (>= 1).
        history: group means so far (oldest first; at most ``window``).
        window: how many recent groups the baseline averages (NeoX: 100).

    Returns:
        ``(advantages [B], the new history)``.
    """
    grouped = rewards.view(-1, num_generations)
    history = list(history)
    baselines = []
    for mean in torch.nanmean(grouped, dim=1).tolist():
        baselines.append(sum(history) / len(history) if history else 0.0)
        if not math.isnan(mean):
            history = (history + [mean])[-window:]
    base = torch.tensor(baselines, dtype=rewards.dtype).repeat_interleave(num_generations)
    return torch.nan_to_num(rewards - base, nan=0.0), history
