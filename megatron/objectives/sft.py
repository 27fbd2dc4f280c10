"""Supervised fine-tuning (``objective.name: sft``): masked next-token NLL.

Formula (the maximum-likelihood objective of instruction tuning, e.g. InstructGPT's SFT stage,
arXiv:2203.02155): with ``m_t`` the loss mask of target token ``t`` (1 on completion / assistant
tokens) and ``l_t = log p(x_{t+1} | x_{<=t})``,

- ``token_mean``:    ``L = -sum_t m_t l_t / sum_t m_t`` (every trained token weighs the same);
- ``sequence_mean``: ``L = mean_i ( -sum_{t in i} l_t / n_i )`` over the sequences ``i`` of the
  micro-batch that have ``n_i >= 1`` trained tokens (every sequence weighs the same, so long
  answers do not dominate), using ``batch.sequence_ids`` to find each token's sequence.

Reference implementation checked: TRL 1.16.0 ``SFTTrainer`` (``trl/trainer/sft_trainer.py``
``compute_loss``, ``loss_type="nll"``), whose loss is the token mean over ``completion_mask`` /
``assistant_masks`` tokens.

Departures:

- The token mean is taken per micro-batch (Megatron's convention; the engine then averages
  micro-batches and data-parallel ranks with equal weight). TRL (through transformers' Trainer)
  divides the token sum by the token count of the whole gradient-accumulation batch
  (``num_items_in_batch``), so the two differ when micro-batches hold different token counts.
- ``sequence_mean`` has no TRL counterpart.
- A micro-batch without trained tokens gives loss 0 with zero gradient rather than NaN.
- TRL's ``dft`` loss type is not implemented.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch

from megatron.data.batch import Batch
from megatron.objectives.logprobs import sequence_log_probs
from megatron.objectives.registry import Objective, register_objective


@dataclass(kw_only=True, frozen=True)
class SFTConfig:
    """Hyper-parameters of the ``sft`` objective."""

    reduction: Literal["token_mean", "sequence_mean"] = "token_mean"
    """``token_mean``: mean NLL over all trained tokens; ``sequence_mean``: mean over sequences of each one's token-mean NLL."""


def sft_loss(
    token_logps: torch.Tensor, batch: Batch, reduction: str
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Masked NLL of a sequence micro-batch.

    Args:
        token_logps: ``[b, s]`` fp32 log-probs of the targets.
        batch: ``loss_mask [b, s]`` float32; for ``sequence_mean`` also ``sequence_ids [b, s]``
            int64 (-1 where masked) and ``num_sequences`` (int).
        reduction: ``token_mean`` or ``sequence_mean``.

    Returns:
        ``(loss 0-d fp32, metrics)``: ``sft/nll`` (token-mean NLL whatever the reduction, so runs
        compare), ``sft/tokens`` and, for ``sequence_mean``, ``sft/sequences``; detached.
    """
    valid = batch.loss_mask > 0
    logps = torch.where(valid, token_logps.float(), 0.0)
    n_tokens = valid.sum().float()
    token_nll = -logps.sum() / n_tokens.clamp(min=1.0)
    metrics = {"sft/nll": token_nll.detach(), "sft/tokens": n_tokens.detach()}
    if reduction == "token_mean":
        return token_nll, metrics
    sums, counts = sequence_log_probs(token_logps, batch)
    has_tokens = (counts > 0).float()
    per_sequence = -sums / counts.clamp(min=1.0)
    n_sequences = has_tokens.sum()
    loss = (per_sequence * has_tokens).sum() / n_sequences.clamp(min=1.0)
    metrics["sft/sequences"] = n_sequences.detach()
    return loss, metrics


@register_objective("sft")
class SFT(Objective):
    """Supervised fine-tuning: next-token NLL on the loss-masked (completion) tokens."""

    Config = SFTConfig
    batch_kind = "sequence"
    needs_reference_model = False
    token_nll_metric = "sft/nll"

    def loss(
        self, policy: dict[str, torch.Tensor], reference: Any, batch: Batch
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """See :func:`sft_loss`; ``reference`` is unused (``None``)."""
        return sft_loss(policy["token_logps"], batch, self.config.reduction)
