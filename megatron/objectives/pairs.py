"""Helpers shared by the pairwise objectives (``dpo``, ``cpo``, ``simpo``, ``orpo``); registers nothing.

Shapes: P pairs in the micro-batch; every tensor here is ``[P]`` fp32 unless stated otherwise.

Pair losses are averaged over the *valid* pairs only (both sequences have at least one target
token; see :class:`megatron.objectives.logprobs.PairLogProbs`). The per-sequence log-probs of an
invalid pair are replaced by 0 *before* any non-linear function (:func:`zero_invalid`), so neither
the loss nor its gradient can become NaN there; :func:`masked_mean` then drops them. With every
pair valid this is the plain batch mean TRL takes.
"""

from __future__ import annotations

import torch

from megatron.errors import SectionError


def zero_invalid(x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``x`` with the entries of invalid pairs set to 0 (``[P]`` -> ``[P]``)."""
    return torch.where(valid, x, torch.zeros((), dtype=x.dtype, device=x.device))


def masked_mean(x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Mean of ``x [P]`` over the valid pairs (0-d); 0, still attached to the graph, if none is.

    ``x`` must be finite at invalid entries (build it from :func:`zero_invalid` inputs).
    """
    weight = valid.to(x.dtype)
    return (x * weight).sum() / weight.sum().clamp(min=1.0)


def reward_metrics(
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    valid: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """The metrics TRL's preference trainers log, as detached means over the valid pairs.

    ``rewards/accuracies`` is the fraction of pairs with ``chosen_reward > rejected_reward``
    (strict, as TRL: equal rewards count as wrong).

    Args:
        chosen_rewards: ``[P]`` implicit rewards of the chosen completions.
        rejected_rewards: ``[P]`` implicit rewards of the rejected completions.
        chosen_logps: ``[P]`` the chosen log-probs the objective uses (sum or token mean).
        rejected_logps: ``[P]`` the rejected log-probs the objective uses.
        valid: ``[P]`` bool.

    Returns:
        ``rewards/chosen``, ``rewards/rejected``, ``rewards/accuracies``, ``rewards/margins``,
        ``logps/chosen``, ``logps/rejected`` (0-d fp32, detached).
    """
    cr, rr = chosen_rewards.detach(), rejected_rewards.detach()
    return {
        "rewards/chosen": masked_mean(cr, valid),
        "rewards/rejected": masked_mean(rr, valid),
        "rewards/accuracies": masked_mean((cr > rr).float(), valid),
        "rewards/margins": masked_mean(cr - rr, valid),
        "logps/chosen": masked_mean(chosen_logps.detach(), valid),
        "logps/rejected": masked_mean(rejected_logps.detach(), valid),
    }


def raise_section_problems(section: str, problems: list[tuple[str, str]]) -> None:
    """Raise the loader's :class:`~megatron.errors.SectionError` if ``problems`` is non-empty.

    Args:
        section: the Config class name (e.g. ``"DPOConfig"``).
        problems: ``(field name, message)`` pairs.
    """
    if problems:
        raise SectionError(section, problems)
