"""REINFORCE Leave-One-Out (``objective.name: rloo``), online RL as TRL's ``RLOOTrainer``.

Paper: Ahmadian et al., "Back to Basics: Revisiting REINFORCE Style Optimization for Learning from
Human Feedback in LLMs", arXiv:2402.14740.

For each prompt, G = ``num_generations`` completions are sampled. The reward first pays a KL
penalty to a frozen reference, the first-order estimate summed over the completion's tokens
(``r_i <- r_i - beta * sum_t (log pi_old(o_t) - log pi_ref(o_t))``), then each completion's
baseline is the mean reward of its group's other completions::

    A_i = r_i - (sum_j r_j - r_i) / (G - 1)

optionally standardised over the whole rollout (``normalize_advantages``). The loss is PPO's clip
on the *sequence* ratio ``rho_i = exp(sum_t log pi(o_t) - sum_t log pi_old(o_t))``::

    L = -mean_i min(rho_i A_i, clip(rho_i, 1 - epsilon, 1 + epsilon_high) A_i)

Reference implementation: TRL 1.16.0 ``RLOOTrainer`` (defaults: G = 2, beta 0.05, epsilon 0.2,
no normalisation, mu 1): the loss checked against ``RLOOTrainer._compute_loss`` and the
advantages against ``_generate_and_score_completions``'s (``tests/objectives/``). As in TRL, the
sampling policy's log-probs are always computed at the rollout (the KL penalty needs them) and
``kl`` is the token mean of ``old - ref`` over the rollout. Departures: none in the math;
``reward_clip_range`` clips the total (weighted) reward, as TRL does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from megatron.data.batch import Batch
from megatron.objectives.online import (
    OnlineObjective,
    RolloutStats,
    common_metrics,
    policy_checks,
    rollout_fields,
    token_inputs,
)
from megatron.objectives.policy_gradient import _sequences, rloo_loss
from megatron.objectives.registry import register_objective
from megatron.rollout.advantages import nanstd, rloo_advantages


@dataclass(kw_only=True, frozen=True)
class RLOOConfig:
    """Hyper-parameters of the ``rloo`` objective (TRL 1.16's names and defaults)."""

    num_generations: int = 2
    """Completions sampled per prompt (G, >= 2)."""
    beta: float = 0.05
    """Weight of the KL penalty paid by the reward (0: no reference model)."""
    epsilon: float = 0.2
    """Lower clip of the sequence ratio: 1 - epsilon."""
    epsilon_high: float | None = None
    """Upper clip: 1 + epsilon_high; null: epsilon."""
    num_iterations: int = 1
    """Passes over each rollout (mu)."""
    normalize_advantages: bool = False
    """Standardise the advantages over the whole rollout (std + 1e-4)."""
    reward_clip_range: list[float] | None = None
    """``[low, high]``: clip each completion's total reward into this range before the KL penalty; null: no clipping."""
    mask_truncated_completions: bool = False
    """Do not train on completions that reached rollout.max_new_tokens without EOS."""

    def __post_init__(self) -> None:
        checks = policy_checks(self)
        clip = self.reward_clip_range
        if clip is not None and (len(clip) != 2 or not clip[0] <= clip[1]):
            checks.fail("reward_clip_range", f"must be [low, high] with low <= high (got {clip})")
        checks.done()


@register_objective("rloo")
class RLOO(OnlineObjective):
    """RLOO: leave-one-out baseline, KL as a reward penalty, PPO clip on the sequence ratio."""

    Config = RLOOConfig

    @property
    def needs_reference_model(self) -> bool:  # type: ignore[override]
        return self.config.beta > 0

    def needs_old_logps(self, passes: int) -> bool:
        return True  # the KL penalty of the reward reads them (TRL computes them always)

    def advantages(
        self, rewards: torch.Tensor, stats: RolloutStats
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Leave-one-out advantages of the KL-penalised (and clipped) rewards."""
        cfg, metrics = self.config, {}
        if cfg.reward_clip_range is not None:
            rewards = rewards.clamp(*cfg.reward_clip_range)
        if cfg.beta > 0:
            penalty = stats.old_sums - stats.ref_sums  # [N]: sum_t (old - ref)
            rewards = rewards - cfg.beta * penalty
            tokens = float(stats.old_ref_tokens.sum())
            metrics["kl"] = float(penalty.sum()) / max(tokens, 1.0)
        std = nanstd(rewards.view(-1, self.num_generations), dim=1)
        metrics["frac_reward_zero_std"] = float(
            torch.isclose(std, torch.zeros_like(std)).float().mean()
        )
        adv = rloo_advantages(rewards, self.num_generations, cfg.normalize_advantages)
        return adv, metrics

    def loss(self, policy: Any, reference: Any, batch: Batch) -> tuple[torch.Tensor, dict]:
        fields = rollout_fields(batch)
        tokens = token_inputs(policy, batch)
        old = torch.where(tokens.mask > 0, fields.old_logps, 0.0)
        old_sums, _ = _sequences(old, tokens.mask, tokens.sequence_ids, batch.num_sequences)
        loss, metrics = rloo_loss(
            tokens.logps,
            old_sums,
            fields.advantages,
            tokens.mask,
            epsilon=self.config.epsilon,
            epsilon_high=self.config.epsilon_high,
            sequence_ids=tokens.sequence_ids,
            num_sequences=batch.num_sequences,
        )
        return loss, {**metrics, **common_metrics(tokens, batch)}
