"""Odds Ratio Preference Optimization (``objective.name: orpo``), reference-free.

Paper: ORPO, Hong, Lee and Thorne, arXiv:2403.07691 (Eqs. 4-7):

    L = NLL(y_w) - beta * mean_pairs log sigma(log odds(y_w) - log odds(y_l)),
    log odds(y) = l - log(1 - exp(l)),  l = token-mean log pi(y|x)

(``beta`` is the paper's ``lambda``). ``NLL`` is the token-mean negative log-likelihood of every
chosen target token of the micro-batch; ``log(1 - exp(l))`` is computed stably (``log1p(-exp(l))``
below ``-ln 2``, ``log(-expm1(l))`` above, TRL's ``log1mexp``). Logged: TRL's ``rewards/*``
(``beta * l``), ``logps/*`` (``l``), ``nll_loss``, ``log_odds_ratio`` (mean ``log sigma(.)``) and
``log_odds_chosen`` (mean log-odds difference).

Reference implementation checked: TRL 1.16.0, ``trl/experimental/orpo/orpo_trainer.py``
``ORPOTrainer.odds_ratio_loss``, ``log1mexp``, ``concatenated_forward`` and
``get_batch_loss_metrics``; the tests run TRL's ``get_batch_loss_metrics`` on logits built to give
the same log-probs.

Departures:

- TRL 1.16 computes the NLL over the prompt *and* the chosen completion (its labels are every
  attended token); here, as in the paper, over the loss-masked completion tokens only. The two agree
  when the prompt is one token (the tests use that to compare).
- Token means use the token count clamped to >= 1; pairs with an all-masked completion are left out
  of the means (TRL divides by 0, and ``log(1 - exp(0))`` is ``-inf``).
- A token-mean log-prob of exactly 0 (probability 1) is clamped to ``-1e-6`` before
  ``log(1 - exp(l))`` so that the loss stays finite (TRL gives inf).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from megatron.data.batch import Batch
from megatron.objectives.logprobs import pair_log_probs
from megatron.objectives.pairs import (
    masked_mean,
    raise_section_problems,
    reward_metrics,
    zero_invalid,
)
from megatron.objectives.registry import Objective, register_objective

_LOG_HALF = -0.6931471805599453


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """``log(1 - exp(x))`` for ``x < 0``, stable on both sides of ``-ln 2`` (same shape/dtype)."""
    # Both branches are evaluated; clamp each one's input into its safe range so that neither
    # produces NaN in the unselected branch (which would leak into the gradient).
    low = torch.log1p(-torch.exp(torch.clamp(x, max=_LOG_HALF)))
    high = torch.log(-torch.expm1(torch.clamp(x, min=_LOG_HALF)))
    return torch.where(x < _LOG_HALF, low, high)


@dataclass(kw_only=True, frozen=True)
class ORPOConfig:
    """Hyper-parameters of the ``orpo`` objective (name and default as TRL 1.16's ``ORPOConfig``)."""

    beta: float = 0.1
    """Weight ``lambda`` >= 0 of the odds-ratio term relative to the NLL."""

    def __post_init__(self) -> None:
        problems = [] if self.beta >= 0 else [("beta", f"must be >= 0 (got {self.beta})")]
        raise_section_problems("ORPOConfig", problems)


def orpo_loss(
    beta: float,
    token_logps: torch.Tensor,
    batch: Batch,
    extra_logps: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """ORPO loss of a pair micro-batch.

    Args:
        beta: odds-ratio weight (the paper's ``lambda``).
        token_logps: ``[b, s]`` fp32 policy log-probs of the targets.
        batch: pair batch (``loss_mask``, ``sequence_ids``, ``num_sequences`` = 2P, optional
            ``extra_targets``).
        extra_logps: ``[k]`` fp32 policy log-probs of the batch's extra targets, if any.

    Returns:
        ``(loss 0-d fp32, metrics)``, metrics detached.
    """
    lp = pair_log_probs(token_logps, batch, extra_logps)
    valid = lp.valid
    chosen = zero_invalid(lp.chosen_means, valid).clamp(max=-1e-6)
    rejected = zero_invalid(lp.rejected_means, valid).clamp(max=-1e-6)
    log_odds = (chosen - rejected) - (log1mexp(chosen) - log1mexp(rejected))
    ratio = F.logsigmoid(log_odds)
    nll = lp.chosen_nll()
    loss = nll - beta * masked_mean(ratio, valid)
    metrics = reward_metrics(beta * chosen, beta * rejected, chosen, rejected, valid)
    metrics["nll_loss"] = nll.detach()
    metrics["log_odds_ratio"] = masked_mean(ratio.detach(), valid)
    metrics["log_odds_chosen"] = masked_mean(log_odds.detach(), valid)
    return loss, metrics


@register_objective("orpo")
class ORPO(Objective):
    """ORPO (arXiv:2403.07691): NLL on the chosen plus a log odds-ratio pair loss, no reference."""

    Config = ORPOConfig
    batch_kind = "pair"
    needs_reference_model = False

    def loss(
        self, policy: dict[str, torch.Tensor], reference: Any, batch: Batch
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """See :func:`orpo_loss`; ``reference`` is unused (``None``)."""
        return orpo_loss(self.config.beta, policy["token_logps"], batch, policy.get("extra_logps"))
