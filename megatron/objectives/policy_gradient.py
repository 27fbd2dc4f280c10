"""Policy-gradient losses for online RL: GRPO's clipped token loss, RLOO's sequence-level one.

Pure tensor functions (no model, no sampling) that the ``grpo`` / ``rloo`` objectives are built on;
the advantages they take come from :mod:`megatron.rollout.advantages`.

Shapes: B completions (``G`` per prompt, the prompt's completions adjacent), T completion tokens.
Per-token inputs are ``[B, T]`` with ``mask [B, T]`` (1 on a completion's tokens, 0 on padding).

* **GRPO** (Shao et al., arXiv:2402.03300, "DeepSeekMath"): PPO's clipped surrogate per token,
  the ratio ``exp(logp - logp_old)`` clipped to ``[1 - epsilon, 1 + epsilon_high]`` (DAPO's
  asymmetric clip, arXiv:2503.14476), plus ``beta`` times the k3 estimator of KL to a frozen
  reference, ``exp(ref - logp) - (ref - logp) - 1`` (Schulman, "Approximating KL divergence",
  2020). Token losses are reduced by ``loss_type``:
  ``grpo`` (mean over each sequence's tokens, then over sequences), ``bnpo`` (mean over the local
  batch's tokens), ``dr_grpo`` (sum / (B * max_completion_length), Liu et al. arXiv:2503.20783)
  or ``dapo`` (sum / the active tokens of the whole accumulated global batch, arXiv:2503.14476).
* **RLOO** (Ahmadian et al., arXiv:2402.14740): PPO's clip on the *sequence* log-prob ratio, mean
  over sequences.

Reference implementation: TRL 1.16 (``GRPOTrainer._compute_loss``, ``RLOOTrainer._compute_loss``),
checked against that code in ``tests/objectives/test_policy_gradient.py``. Departures: none in
the math; the reductions take the token counts as arguments (``num_items`` for ``dapo``) where
TRL reads them from its trainer.
"""

from __future__ import annotations

import torch

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")


def k3_kl(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """Per-token ``exp(ref - logp) - (ref - logp) - 1`` (>= 0; unbiased for KL(pi || ref))."""
    delta = ref_logps - logps
    return torch.exp(delta) - delta - 1


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1.0)


def grpo_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    loss_type: str = "dapo",
    epsilon: float = 0.2,
    epsilon_high: float | None = None,
    beta: float = 0.0,
    ref_logps: torch.Tensor | None = None,
    max_completion_length: int | None = None,
    num_items: float | torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GRPO's loss on one micro-batch, and its metrics.

    Args:
        logps: ``[B, T]`` the policy's log-probs of the sampled tokens (with gradient).
        old_logps: ``[B, T]`` the sampling policy's (``num_iterations > 1``), or ``None``:
            the current ones, detached (ratio 1, gradient = plain policy gradient).
        advantages: ``[B]``.
        mask: ``[B, T]`` 1 on completion tokens.
        loss_type: see the module docstring.
        epsilon: lower clip; ``epsilon_high`` the upper one (default ``epsilon``).
        beta: weight of the k3 KL to ``ref_logps`` (needed when > 0).
        max_completion_length: ``dr_grpo``'s constant denominator (per sequence).
        num_items: ``dapo``'s denominator: active tokens of the accumulated global batch
            divided by the number of data-parallel ranks (the loss is summed over micro-batches
            and averaged over ranks); default: this micro-batch's tokens.

    Returns:
        ``(loss, metrics)``: ``kl`` (beta > 0), ``clip_ratio/{low,high,region}_mean`` (masked
        token means, as TRL's).
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    high = epsilon if epsilon_high is None else epsilon_high
    mask = mask.to(logps.dtype)
    old = logps.detach() if old_logps is None else old_logps
    ratio = torch.exp(logps - old)  # [B, T]
    adv = advantages.unsqueeze(1)  # [B, 1]
    clipped = torch.clamp(ratio, 1 - epsilon, 1 + high)
    token_loss = -torch.min(ratio * adv, clipped * adv)
    metrics: dict[str, torch.Tensor] = {}
    if beta != 0.0:
        if ref_logps is None:
            raise ValueError("grpo_loss: beta > 0 needs ref_logps")
        kl = k3_kl(logps, ref_logps)
        token_loss = token_loss + beta * kl
        metrics["kl"] = _masked_mean(kl, mask).detach()
    if loss_type == "grpo":
        loss = ((token_loss * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    elif loss_type == "bnpo":
        loss = _masked_mean(token_loss, mask)
    elif loss_type == "dr_grpo":
        if max_completion_length is None:
            raise ValueError("grpo_loss: loss_type dr_grpo needs max_completion_length")
        loss = (token_loss * mask).sum() / (token_loss.shape[0] * max_completion_length)
    else:  # dapo
        denominator = mask.sum() if num_items is None else torch.as_tensor(num_items)
        loss = (token_loss * mask).sum() / denominator.clamp(min=1.0)
    low = ((ratio < 1 - epsilon) & (adv < 0)).to(mask.dtype)
    up = ((ratio > 1 + high) & (adv > 0)).to(mask.dtype)
    metrics["clip_ratio/low_mean"] = _masked_mean(low, mask).detach()
    metrics["clip_ratio/high_mean"] = _masked_mean(up, mask).detach()
    metrics["clip_ratio/region_mean"] = _masked_mean(torch.maximum(low, up), mask).detach()
    return loss, metrics


def rloo_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    epsilon: float = 0.2,
    epsilon_high: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """RLOO's loss: PPO's clip on the sequence log-prob ratio, mean over sequences.

    Args:
        logps: ``[B, T]`` the policy's per-token log-probs (with gradient).
        old_logps: ``[B]`` the sampling policy's sequence log-probs.
        advantages: ``[B]`` (:func:`rloo_advantages`).
        mask: ``[B, T]`` 1 on completion tokens.
        epsilon: lower clip; ``epsilon_high`` the upper one (default ``epsilon``).
    """
    high = epsilon if epsilon_high is None else epsilon_high
    seq = (logps * mask.to(logps.dtype)).sum(1)
    ratio = torch.exp(seq - old_logps)
    clipped = torch.clamp(ratio, 1 - epsilon, 1 + high)
    loss = -torch.min(ratio * advantages, clipped * advantages).mean()
    low = ((ratio < 1 - epsilon) & (advantages < 0)).float()
    up = ((ratio > 1 + high) & (advantages > 0)).float()
    metrics = {
        "clip_ratio/low_mean": low.mean(),
        "clip_ratio/high_mean": up.mean(),
        "clip_ratio/region_mean": torch.maximum(low, up).mean(),
    }
    return loss, metrics
