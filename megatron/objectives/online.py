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
from megatron.errors import FieldChecks
from megatron.objectives.registry import Max, Objective


@dataclass(frozen=True)
class RolloutStats:
    """Per-completion statistics of a whole rollout (``[N]`` each, every rank's completions in
    rollout order), for :meth:`OnlineObjective.advantages`.

    Attributes:
        old_sums: the sampling policy's sequence log-probs (over the trained tokens), or ``None``.
        ref_sums: the reference model's, or ``None``.
        old_ref_tokens: tokens those two sums run over.
    """

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

    @property
    def needs_reference_logps(self) -> bool:
        """Whether the rollout computes reference log-probs (objectives with a KL term on them)."""
        return bool(self.needs_reference_model)

    needs_reference_hidden: bool = False
    """Whether the training step gives the policy's forward the reference's hidden states (the
    exact KL over the vocabulary, REINFORCE's ``kl_impl: full``)."""

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
        return out


def policy_checks(config: Any) -> FieldChecks:
    """The field checks GRPO's and RLOO's configs share (``num_generations``, ``epsilon``,
    ``epsilon_high``, ``beta``, ``num_iterations``); the caller adds its own and calls
    ``done()``."""
    checks = FieldChecks(config)
    checks.at_least("num_generations", 1)
    checks.fraction("epsilon")
    checks.at_least("epsilon_high", 0)
    checks.at_least("beta", 0)
    checks.at_least("num_iterations", 1)
    return checks


def rollout_fields(batch: Batch) -> RolloutFields:
    """The batch's :class:`RolloutFields`, or a clear error for a batch without them."""
    if batch.rollout is None:
        raise ValueError(
            "an online RL objective trains on rollout batches (megatron.rollout.source), not on "
            "dataset rows; this batch carries no advantages"
        )
    return batch.rollout


def flat_outputs(batch: Batch, grid: torch.Tensor, extra: torch.Tensor | None) -> torch.Tensor:
    """``[b * s + k]``: per-token values of the grid flattened, then of the extra targets."""
    if batch.extra_targets is None:
        return grid.reshape(-1)
    if extra is None:
        extra = grid.new_zeros(batch.extra_targets.index.numel())
    return torch.cat([grid.reshape(-1), extra])


def scored_tokens(batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mask [b * s + k] fp32, sequence_ids [b * s + k] int64)`` of the batch's scored tokens,
    in :func:`flat_outputs` order (1 / the completion on a trained target, 0 / -1 elsewhere)."""
    ids = batch.sequence_ids.reshape(-1)
    mask = ((batch.loss_mask.reshape(-1) > 0) & (ids >= 0)).float()
    extra = batch.extra_targets
    if extra is not None:
        ids = torch.cat([ids, extra.sequence_ids])
        mask = torch.cat([mask, (extra.sequence_ids >= 0).float()])
    return mask, torch.where(mask > 0, ids, -1)


@dataclass(frozen=True)
class TokenInputs:
    """An online objective's per-token inputs over a batch's scored tokens, flat ``[n]``
    (:func:`flat_outputs` order: the grid, then the extra targets of prefix-shared spans).

    Attributes:
        logps: the policy's log-probs (with gradient).
        entropy: the policy's entropies (no gradient), or ``None``.
        mask: fp32, 1 on the completions' trained tokens.
        sequence_ids: int64 completion of each token (-1: none).
    """

    logps: torch.Tensor
    entropy: torch.Tensor | None
    mask: torch.Tensor
    sequence_ids: torch.Tensor


def token_inputs(policy: dict[str, torch.Tensor], batch: Batch) -> TokenInputs:
    """The policy's outputs over ``batch``'s scored tokens (see :class:`TokenInputs`)."""
    mask, ids = scored_tokens(batch)
    logps = flat_outputs(batch, policy["token_logps"], policy.get("extra_logps"))
    entropy = None
    if "entropy" in policy:
        entropy = flat_outputs(batch, policy["entropy"], policy.get("extra_entropy"))
    return TokenInputs(logps, entropy, mask, ids)


def common_metrics(inputs: TokenInputs, batch: Batch) -> dict[str, Any]:
    """``entropy`` and, where the batch carries the sampler's log-probs,
    ``sampling/logp_difference/{mean,max}`` (see the module docstring)."""
    mask = inputs.mask
    count, keep = mask.sum().clamp(min=1.0), mask > 0
    metrics: dict[str, Any] = {}
    if inputs.entropy is not None:
        metrics["entropy"] = torch.where(keep, inputs.entropy.detach(), 0.0).sum() / count
    sampler = batch.rollout.sampler_logps if batch.rollout is not None else None
    if sampler is not None and bool(mask.any()):
        diff = torch.where(keep, (inputs.logps.detach() - sampler).abs(), 0.0)
        metrics["sampling/logp_difference/mean"] = diff.sum() / count
        metrics["sampling/logp_difference/max"] = Max(diff.max())
    return metrics
