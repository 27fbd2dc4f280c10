"""Group Relative Policy Optimization (``objective.name: grpo``), online RL with a group baseline.

Paper: Shao et al., "DeepSeekMath", arXiv:2402.03300 (GRPO); the loss types of Liu et al.
arXiv:2503.20783 (``dr_grpo``) and Yu et al. arXiv:2503.14476 (DAPO: ``dapo``, ``epsilon_high``).

For each prompt, G = ``num_generations`` completions are sampled; completion ``i`` of a group with
total reward ``r_i`` gets the advantage ``A_i = (r_i - mean_group r) / (std + 1e-4)``
(``scale_rewards``: the group's std, the whole rollout's, or none). Per completion token ``t``,
with ``rho_t = exp(log pi(o_t) - log pi_old(o_t))``::

    l_t = -min(rho_t A_i, clip(rho_t, 1 - epsilon, 1 + epsilon_high) A_i) + beta * rho_t * k3_t
    k3_t = exp(ref_t - log pi_t) - (ref_t - log pi_t) - 1

(``rho_t`` on the KL term: TRL's ``use_bias_correction_kl``), reduced by ``loss_type`` (see
:func:`megatron.objectives.policy_gradient.grpo_loss`). ``num_iterations`` (mu) passes are taken
over each rollout; ``pi_old`` is the sampling policy (its log-probs are computed at the rollout
when the policy moves before a batch is trained on, else ``rho = 1`` exactly).

Reference implementation: TRL 1.16.0 ``GRPOTrainer`` (options and defaults: G = 8, ``dapo``,
``group`` scaling, epsilon 0.2, beta 0, mu 1), its loss checked against
``GRPOTrainer._compute_loss`` on fixed per-token inputs and its advantages against
``_generate_and_score_completions``'s (``tests/objectives/test_policy_gradient.py``).

Departures from TRL: ``dapo`` divides by the completion tokens of the optimizer step being taken
(all ranks and micro-batches), the DAPO paper's definition; TRL divides by the tokens of the whole
generation batch over its ``steps_per_generation`` (the same when one rollout is one optimizer
step, TRL's default). ``steps_per_generation`` itself is ``rollout.prompts_per_step x G /
training.global_batch_size`` here. Not implemented: TRL's ``sequence`` importance sampling
(GSPO), ``cispo``/``sapo``/``luspo``/``vespo`` losses, ``top_entropy_quantile``, ``delta``
(two-sided clip) and vLLM importance-sampling correction (the built-in backend's log-probs are
the training forward's).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

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
from megatron.objectives.policy_gradient import LOSS_TYPES, grpo_loss
from megatron.objectives.registry import register_objective
from megatron.rollout.advantages import SCALE_REWARDS, group_advantages


@dataclass(kw_only=True, frozen=True)
class GRPOConfig:
    """Hyper-parameters of the ``grpo`` objective (TRL 1.16's names and defaults)."""

    num_generations: int = 8
    """Completions sampled per prompt (G, >= 2)."""
    loss_type: Literal["grpo", "bnpo", "dr_grpo", "dapo"] = "dapo"
    """Token-loss reduction: ``grpo`` (mean over each completion's tokens, then over completions), ``bnpo`` (mean over the micro-batch's tokens), ``dr_grpo`` (sum / (completions x rollout.max_new_tokens)), ``dapo`` (sum / the completion tokens of the whole optimizer step)."""
    scale_rewards: Literal["group", "batch", "none"] = "group"
    """Advantage scaling: divide by the group's reward std (+1e-4), the whole rollout's, or not at all (Dr. GRPO)."""
    epsilon: float = 0.2
    """Lower clip of the ratio: 1 - epsilon."""
    epsilon_high: float | None = None
    """Upper clip of the ratio: 1 + epsilon_high (DAPO: 0.28); null: epsilon."""
    beta: float = 0.0
    """Weight of the k3 KL to a frozen reference model (0: no reference)."""
    use_bias_correction_kl: bool = True
    """Multiply the KL term by the importance ratio (TRL's default)."""
    num_iterations: int = 1
    """Passes over each rollout (mu); mu > 1 keeps the sampling policy's log-probs as the old policy."""
    mask_truncated_completions: bool = False
    """Do not train on completions that reached rollout.max_new_tokens without EOS (their rewards still count in the group statistics)."""

    def __post_init__(self) -> None:
        checks = policy_checks(self)
        if self.loss_type not in LOSS_TYPES:
            checks.fail("loss_type", f"must be one of {LOSS_TYPES} (got {self.loss_type!r})")
        if self.scale_rewards not in SCALE_REWARDS:
            checks.fail(
                "scale_rewards", f"must be one of {SCALE_REWARDS} (got {self.scale_rewards!r})"
            )
        checks.done()


@register_objective("grpo")
class GRPO(OnlineObjective):
    """GRPO (DeepSeekMath): PPO's clipped token loss with group-normalised rewards, no critic."""

    Config = GRPOConfig

    @property
    def needs_reference_model(self) -> bool:  # type: ignore[override]
        return self.config.beta > 0

    def advantages(
        self, rewards: torch.Tensor, stats: RolloutStats
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Group advantages (:func:`megatron.rollout.advantages.group_advantages`)."""
        adv = group_advantages(rewards, self.num_generations, self.config.scale_rewards)
        return adv.advantages, {"frac_reward_zero_std": float(adv.zero_std.float().mean())}

    def loss(self, policy: Any, reference: Any, batch: Batch) -> tuple[torch.Tensor, dict]:
        cfg, fields = self.config, rollout_fields(batch)
        tokens = token_inputs(policy, batch)
        loss, metrics = grpo_loss(
            tokens.logps,
            fields.old_logps,
            fields.advantages,
            tokens.mask,
            loss_type=cfg.loss_type,
            epsilon=cfg.epsilon,
            epsilon_high=cfg.epsilon_high,
            beta=cfg.beta,
            ref_logps=fields.ref_logps,
            bias_correction_kl=cfg.use_bias_correction_kl,
            max_completion_length=fields.max_new_tokens,
            num_items=fields.num_items,
            sequence_ids=tokens.sequence_ids,
            num_sequences=batch.num_sequences,
        )
        return loss, {**metrics, **common_metrics(tokens, batch)}
