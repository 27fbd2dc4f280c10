"""What the online RL objectives (``grpo``, ``rloo``, ``reinforce``) share: the contract with the
rollout source, and the per-token inputs of their losses.

An online objective reads ``prompt`` data (``batch_kind = "prompt"``): the trainer then feeds it
from a :class:`megatron.rollout.source.RolloutSource` instead of a dataset. The source samples
``num_generations`` completions per prompt, scores them, asks :meth:`OnlineObjective.advantages`
for each completion's advantage (over the whole rollout, identically on every rank) and trains on
the completions as sequence batches carrying :class:`megatron.data.batch.RolloutFields`. What an
objective declares:

* ``num_generations`` (G) and ``num_iterations`` (mu: passes over each rollout);
* ``needs_old_logps(passes)``: whether the sampling policy's log-probs must be computed at the
  rollout (``passes`` = optimizer steps per rollout; the policy moves after the first);
* ``needs_reference_model``: whether reference log-probs are computed at the rollout;
* ``advantages(rewards, stats)``: ``[N]`` advantages and metrics from the rollout's rewards and
  per-completion statistics (:class:`RolloutStats`);
* ``mask_truncated_completions``: completions that hit ``rollout.max_new_tokens`` without EOS
  are not trained on (their rewards still count in the advantages, as in TRL);
* ``state_dict`` / ``load_state_dict``: state carried across rollouts (REINFORCE's moving
  baseline), saved with checkpoints.

Every online objective's metrics include ``entropy`` (the policy's per-token entropy, a masked
mean) and, on batches still from the sampling policy, ``sampling/logp_difference/{mean,max}``:
the generation backend's reported log-probs against the training forward's (~1e-6 for the
built-in decoder in fp32).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from megatron.data.batch import Batch, RolloutFields
from megatron.objectives.registry import Max, Objective


@dataclass(frozen=True)
class RolloutStats:
    """Per-completion statistics of a whole rollout (``[N]`` each, every rank's completions in
    rollout order), for :meth:`OnlineObjective.advantages`.

    Attributes:
        lengths: completion tokens (an emitted EOS counts).
        old_sums: the sampling policy's sequence log-probs (over the trained tokens), or ``None``.
        ref_sums: the reference model's, or ``None``.
        old_ref_tokens: tokens those two sums run over.
    """

    lengths: torch.Tensor
    old_sums: torch.Tensor | None = None
    ref_sums: torch.Tensor | None = None
    old_ref_tokens: torch.Tensor | None = None


class OnlineObjective(Objective):
    """Base class of the online RL objectives (see the module docstring)."""

    batch_kind: ClassVar[str] = "prompt"
    console_metrics = (
        "reward",
        "reward_std",
        "rewards/*/mean",
        "frac_reward_zero_std",
        "completions/mean_length",
        "completions/clipped_ratio",
        "kl",
        "entropy",
        "clip_ratio/region_mean",
        "sampling/logp_difference/max",
        "time/rollout",
        "time/update",
    )
    group_baseline: ClassVar[bool] = True
    """Whether the advantages compare completions of one prompt (then G >= 2 is required)."""

    @property
    def model_outputs(self) -> frozenset[str]:
        return frozenset({"token_logps", "log_z", "entropy"})

    @property
    def num_generations(self) -> int:
        return int(self.config.num_generations)

    @property
    def num_iterations(self) -> int:
        return int(getattr(self.config, "num_iterations", 1))

    @property
    def mask_truncated_completions(self) -> bool:
        return bool(getattr(self.config, "mask_truncated_completions", False))

    def needs_old_logps(self, passes: int) -> bool:
        """Whether the rollout computes the sampling policy's log-probs (``passes``: optimizer
        steps taken on one rollout; after the first the policy is no longer the sampler)."""
        return passes > 1

    def advantages(
        self, rewards: torch.Tensor, stats: RolloutStats
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """``[N]`` advantages of the rollout's completions (rewards NaN where no reward applied)."""
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        """State carried across rollouts (plain data), saved with checkpoints."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""

    @classmethod
    def check_config(cls, run_config: Any) -> list[str]:
        cfg, out = run_config.objective.params, []
        g = int(cfg.num_generations)
        if cls.group_baseline and g < 2:
            out.append(
                f"objective.num_generations ({g}) must be >= 2: {cls.name}'s baseline compares "
                "the completions of one prompt"
            )
        if g < 1:
            out.append(f"objective.num_generations ({g}) must be >= 1")
        return out


def rollout_fields(batch: Batch) -> RolloutFields:
    """The batch's :class:`RolloutFields`, or a clear error for a batch without them."""
    if batch.rollout is None:
        raise ValueError(
            "an online RL objective trains on rollout batches (megatron.rollout.source), not on "
            "dataset rows; this batch carries no advantages"
        )
    return batch.rollout


def token_mask(batch: Batch) -> torch.Tensor:
    """``[b, s]`` fp32: 1 on the completions' trained target tokens."""
    return ((batch.loss_mask > 0) & (batch.sequence_ids >= 0)).float()


def common_metrics(
    policy: dict[str, torch.Tensor], batch: Batch, mask: torch.Tensor
) -> dict[str, Any]:
    """``entropy`` and, where the batch carries the sampler's log-probs,
    ``sampling/logp_difference/{mean,max}`` (see the module docstring)."""
    count, keep = mask.sum().clamp(min=1.0), mask > 0
    metrics: dict[str, Any] = {}
    if "entropy" in policy:
        metrics["entropy"] = torch.where(keep, policy["entropy"].detach(), 0.0).sum() / count
    sampler = batch.rollout.sampler_logps if batch.rollout is not None else None
    if sampler is not None and bool(mask.any()):
        diff = torch.where(keep, (policy["token_logps"].detach() - sampler).abs(), 0.0)
        metrics["sampling/logp_difference/mean"] = diff.sum() / count
        metrics["sampling/logp_difference/max"] = Max(diff.max())
    return metrics
