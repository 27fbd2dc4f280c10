"""Policy-gradient losses for online RL: GRPO's clipped token loss, RLOO's sequence-level one,
GPT-NeoX's REINFORCE.

Pure tensor functions (no model, no sampling) that the ``grpo`` / ``rloo`` / ``reinforce``
objectives are built on; the advantages they take come from :mod:`megatron.rollout.advantages`.

Shapes: B completions (``G`` per prompt), T completion tokens. Per-token inputs are ``[B, T]``
with ``mask [B, T]`` (1 on a completion's tokens, 0 on padding) — or any ``[b, s]`` grid of a
training micro-batch (padded or packed rows) with ``sequence_ids [b, s]`` naming the completion
each token belongs to (-1: none) and ``num_sequences`` = B; per-sequence values (advantages) are
``[B]``.

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

  With ``bias_correction_kl`` (TRL's ``use_bias_correction_kl``, default on) the KL term is
  multiplied by the ratio: the same value on-policy, and the k3 estimator's gradient is then
  unbiased for samples of the old policy.
* **RLOO** (Ahmadian et al., arXiv:2402.14740): PPO's clip on the *sequence* log-prob ratio, mean
  over sequences.
* **REINFORCE** as GPT-NeoX (``train_impl: reinforce``): ``-A * log pi`` per token plus
  ``kl_div_beta`` times a per-token penalty against the reference (``abs`` |d|, ``mse`` d^2/2,
  ``kl`` d, with d = logp - ref; ``full``: the exact KL over the vocabulary at each position,
  given as a per-token tensor), token mean over the micro-batch.

Reference implementation: TRL 1.16 (``GRPOTrainer._compute_loss``, ``RLOOTrainer._compute_loss``)
and GPT-NeoX (``megatron/training.py`` reinforce branch of ``forward_step``, commit ea7aefd),
checked against TRL's code and hand-worked values in ``tests/objectives/test_policy_gradient.py``.
Departures: none in the GRPO/RLOO math; the reductions take the token counts as arguments
(``num_items`` for ``dapo``) where TRL reads them from its trainer. REINFORCE: NeoX divides the
micro-batch's token sum by its token count *and* by the number of sequences (an effective
learning rate that falls as 1 / micro-batch size); we follow the token mean (NeoX x B), so a
NeoX config carries over with ``optimizer.lr`` divided by its micro-batch size.
"""

from __future__ import annotations

import torch

from megatron.objectives.registry import Max, Min

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")


def k3_kl(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """Per-token ``exp(ref - logp) - (ref - logp) - 1`` (>= 0; unbiased for KL(pi || ref))."""
    delta = ref_logps - logps
    return torch.exp(delta) - delta - 1


KL_IMPLS = ("abs", "mse", "kl", "full")


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1.0)


def _only(mask: torch.Tensor, *tensors: torch.Tensor | None) -> list[torch.Tensor | None]:
    """Each tensor with 0 outside ``mask``: a grid's padding and prompt positions hold any value
    (and an exp of their differences could overflow); ``where`` also keeps their gradient 0."""
    keep = mask > 0
    return [None if t is None else torch.where(keep, t, 0.0) for t in tensors]


def _per_token(values: torch.Tensor, like: torch.Tensor, sequence_ids: torch.Tensor | None):
    """Per-sequence ``[B]`` values as a per-token tensor shaped like ``like``."""
    if sequence_ids is None:
        return values.unsqueeze(1)  # [B] -> [B, 1]: rows are sequences
    return values[sequence_ids.clamp(min=0)]  # [b, s]


def _sequences(
    x: torch.Tensor,
    mask: torch.Tensor,
    sequence_ids: torch.Tensor | None,
    num_sequences: int | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sums [B], counts [B])`` of ``x * mask`` over each sequence's tokens."""
    if sequence_ids is None:
        return (x * mask).sum(-1), mask.sum(-1)
    ids = sequence_ids.clamp(min=0).reshape(-1)
    zeros = x.new_zeros(int(num_sequences))
    return zeros.index_add(0, ids, (x * mask).reshape(-1)), zeros.index_add(
        0, ids, mask.reshape(-1)
    )


def clip_metrics(
    low: torch.Tensor,
    high: torch.Tensor,
    mask: torch.Tensor,
    sequence_ids: torch.Tensor | None = None,
    num_sequences: int | None = None,
) -> dict[str, torch.Tensor]:
    """TRL's clip metrics from per-token 0/1 indicators: ``clip_ratio/{low,high,region}_mean``
    (masked token means) and ``clip_ratio/low_min`` / ``high_max`` (the smallest / largest of the
    sequences' own clipped fractions, over sequences with tokens)."""
    metrics = {
        "clip_ratio/low_mean": _masked_mean(low, mask).detach(),
        "clip_ratio/high_mean": _masked_mean(high, mask).detach(),
        "clip_ratio/region_mean": _masked_mean(torch.maximum(low, high), mask).detach(),
    }
    low_sum, counts = _sequences(low, mask, sequence_ids, num_sequences)
    high_sum, _ = _sequences(high, mask, sequence_ids, num_sequences)
    has = counts > 0
    if bool(has.any()):
        metrics["clip_ratio/low_min"] = Min((low_sum[has] / counts[has]).min().detach())
        metrics["clip_ratio/high_max"] = Max((high_sum[has] / counts[has]).max().detach())
    return metrics


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
    bias_correction_kl: bool = True,
    max_completion_length: int | None = None,
    num_items: float | torch.Tensor | None = None,
    sequence_ids: torch.Tensor | None = None,
    num_sequences: int | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GRPO's loss on one micro-batch, and its metrics.

    Args:
        logps: ``[B, T]`` (or a ``[b, s]`` grid) the policy's log-probs of the sampled tokens
            (with gradient).
        old_logps: the sampling policy's, same shape (``num_iterations > 1``, or several
            optimizer steps per rollout), or ``None``: the current ones, detached (ratio 1,
            gradient = plain policy gradient).
        advantages: ``[B]`` per completion.
        mask: 1 on completion tokens, same shape as ``logps``.
        loss_type: see the module docstring.
        epsilon: lower clip; ``epsilon_high`` the upper one (default ``epsilon``).
        beta: weight of the k3 KL to ``ref_logps`` (needed when > 0).
        bias_correction_kl: multiply the KL term by the ratio (TRL's default).
        max_completion_length: ``dr_grpo``'s constant denominator (per sequence).
        num_items: ``dapo``'s denominator: active tokens of the accumulated global batch
            divided by (data-parallel ranks x accumulation steps), since the step averages the
            micro-batch losses over both; default: this micro-batch's tokens.
        sequence_ids: ``[b, s]`` completion of each token of a grid (-1: none); ``None``: rows
            are completions.
        num_sequences: B, with ``sequence_ids``.

    Returns:
        ``(loss, metrics)``: ``kl`` (beta > 0) and :func:`clip_metrics`.
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    high = epsilon if epsilon_high is None else epsilon_high
    mask = mask.to(logps.dtype)
    logps, old_logps, ref_logps = _only(mask, logps, old_logps, ref_logps)
    old = logps.detach() if old_logps is None else old_logps
    ratio = torch.exp(logps - old)
    adv = _per_token(advantages.to(logps.dtype), logps, sequence_ids)
    clipped = torch.clamp(ratio, 1 - epsilon, 1 + high)
    token_loss = -torch.min(ratio * adv, clipped * adv)
    metrics: dict[str, torch.Tensor] = {}
    if beta != 0.0:
        if ref_logps is None:
            raise ValueError("grpo_loss: beta > 0 needs ref_logps")
        kl = k3_kl(logps, ref_logps)
        if bias_correction_kl:
            kl = kl * ratio
        token_loss = token_loss + beta * kl
        metrics["kl"] = _masked_mean(kl, mask).detach()
    n = logps.shape[0] if sequence_ids is None else int(num_sequences)
    if loss_type == "bnpo":
        loss = _masked_mean(token_loss, mask)
    elif loss_type == "dr_grpo":
        if max_completion_length is None:
            raise ValueError("grpo_loss: loss_type dr_grpo needs max_completion_length")
        loss = (token_loss * mask).sum() / (n * max_completion_length)
    elif loss_type == "dapo":
        denominator = mask.sum() if num_items is None else torch.as_tensor(num_items)
        loss = (token_loss * mask).sum() / denominator.clamp(min=1.0)
    else:  # the sequence mean of the GRPO paper (loss_type "grpo")
        sums, counts = _sequences(token_loss, mask, sequence_ids, num_sequences)
        loss = (sums / counts.clamp(min=1.0)).mean()
    low = ((ratio < 1 - epsilon) & (adv < 0)).to(mask.dtype)
    up = ((ratio > 1 + high) & (adv > 0)).to(mask.dtype)
    metrics.update(clip_metrics(low, up, mask, sequence_ids, num_sequences))
    return loss, metrics


def rloo_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    epsilon: float = 0.2,
    epsilon_high: float | None = None,
    sequence_ids: torch.Tensor | None = None,
    num_sequences: int | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """RLOO's loss: PPO's clip on the sequence log-prob ratio, mean over sequences.

    Args:
        logps: ``[B, T]`` (or a ``[b, s]`` grid) the policy's per-token log-probs (with
            gradient).
        old_logps: ``[B]`` the sampling policy's sequence log-probs.
        advantages: ``[B]`` (:func:`rloo_advantages`).
        mask: 1 on completion tokens, same shape as ``logps``.
        epsilon: lower clip; ``epsilon_high`` the upper one (default ``epsilon``).
        sequence_ids: ``[b, s]`` completion of each token of a grid; ``None``: rows.
        num_sequences: B, with ``sequence_ids``.

    Returns:
        ``(loss, metrics)``: TRL's clip metrics over the sequences' indicators.
    """
    high = epsilon if epsilon_high is None else epsilon_high
    mask = mask.to(logps.dtype)
    (logps,) = _only(mask, logps)
    seq, _ = _sequences(logps, mask, sequence_ids, num_sequences)
    ratio = torch.exp(seq - old_logps)
    clipped = torch.clamp(ratio, 1 - epsilon, 1 + high)
    loss = -torch.min(ratio * advantages, clipped * advantages).mean()
    low = ((ratio < 1 - epsilon) & (advantages < 0)).float()
    up = ((ratio > 1 + high) & (advantages > 0)).float()
    metrics = {
        "clip_ratio/low_mean": low.mean(),
        "clip_ratio/low_min": Min(low.min()),
        "clip_ratio/high_mean": up.mean(),
        "clip_ratio/high_max": Max(up.max()),
        "clip_ratio/region_mean": torch.maximum(low, up).mean(),
    }
    return loss, metrics


def reinforce_penalty(logps: torch.Tensor, ref_logps: torch.Tensor, kl_impl: str) -> torch.Tensor:
    """GPT-NeoX's per-token KL penalty of ``d = logp - ref``: ``abs`` |d|, ``mse`` d^2 / 2,
    ``kl`` d (``full`` is the exact KL, computed from the two distributions elsewhere)."""
    d = logps - ref_logps
    if kl_impl == "abs":
        return d.abs()
    if kl_impl == "mse":
        return 0.5 * d.square()
    if kl_impl == "kl":
        return d
    raise ValueError(f"kl_impl {kl_impl!r}: expected one of abs, mse, kl (full is given whole)")


def reinforce_loss(
    logps: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    kl_div_beta: float = 0.0,
    penalty: torch.Tensor | None = None,
    sequence_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """REINFORCE as GPT-NeoX: ``sum_t m_t (-A log pi_t + beta * penalty_t) / sum_t m_t``.

    Args:
        logps: ``[B, T]`` (or a grid) the policy's log-probs of the sampled tokens.
        advantages: ``[B]``.
        mask: 1 on completion tokens.
        kl_div_beta: the penalty's weight (0: none).
        penalty: per-token penalty (:func:`reinforce_penalty`, or the exact KL), with gradient.
        sequence_ids: ``[b, s]`` completion of each token of a grid; ``None``: rows.

    Returns:
        ``(loss, metrics)``; ``kl``: the penalty's masked token mean (NeoX logs its unmasked
        mean over every position).
    """
    mask = mask.to(logps.dtype)
    logps, penalty = _only(mask, logps, penalty)
    adv = _per_token(advantages.to(logps.dtype), logps, sequence_ids)
    token_loss = -adv * logps
    metrics: dict[str, torch.Tensor] = {}
    if kl_div_beta != 0.0:
        if penalty is None:
            raise ValueError("reinforce_loss: kl_div_beta > 0 needs the penalty")
        token_loss = token_loss + kl_div_beta * penalty
        metrics["kl"] = _masked_mean(penalty, mask).detach()
    return _masked_mean(token_loss, mask), metrics
