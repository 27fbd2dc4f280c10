"""Contrastive Preference Optimization (``objective.name: cpo``), reference-free.

Paper: CPO, Xu et al., arXiv:2401.08417 (Eq. 3 plus the behaviour-cloning NLL term):

    L = -(1 - eps) log sigma(beta u) - eps log sigma(-beta u) + cpo_alpha * NLL(y_w),
    u = log pi(y_w|x) - log pi(y_l|x)

with sequence log-probs summed over the completion tokens and ``NLL`` the token-mean negative
log-likelihood of every chosen target token of the micro-batch. ``loss_type`` swaps the pair loss,
as TRL's experimental CPO trainer does:

- ``sigmoid``: the above;
- ``hinge`` (SLiC, arXiv:2305.10425): ``relu(1 - beta u)``;
- ``ipo`` (arXiv:2310.12036): ``(u - 1/(2 beta))^2`` with *token-mean* log-probs;
- ``simpo`` (SimPO, arXiv:2405.14734): the smoothed sigmoid on ``beta u - gamma`` with token-mean
  log-probs (``cpo_alpha = 0`` gives SimPO itself; see the ``simpo`` objective).

``alpha != 0`` (AlphaPO, arXiv:2501.03884) replaces each log-prob ``l`` by the reward
``(1 - exp(-alpha l)) / alpha`` (``(1 - p^-alpha) / alpha``) before the difference.
Implicit rewards logged as ``rewards/*`` are ``beta * l`` (``beta *`` AlphaPO reward).

Reference implementation checked: TRL 1.16.0, ``trl/experimental/cpo/cpo_trainer.py``
``CPOTrainer.cpo_loss``, ``get_batch_logps`` (``average_log_prob`` for ipo and simpo),
``concatenated_forward`` (the NLL) and ``get_batch_loss_metrics``; ``cpo_config.py``. The tests run
TRL's ``get_batch_loss_metrics`` on logits built to give the same log-probs.

Departures from TRL 1.16:

- ``label_smoothing > 0`` with ``hinge`` or ``ipo`` is an error (TRL warns and ignores it).
- TRL's ``loss_type: alphapo`` shortcut is not a loss type: set ``loss_type: simpo``,
  ``cpo_alpha: 0`` and ``alpha`` (what the shortcut does).
- AlphaPO rewards use ``exp(-alpha l)`` rather than ``exp(l) ** -alpha``: equal, but finite where
  ``exp(l)`` underflows to 0 (long sequences with summed log-probs).
- Token means use the token count clamped to >= 1, and pairs with an all-masked completion are
  left out of the means (TRL divides by 0 there).
- ``nll_loss`` is logged as the actual chosen NLL also when ``cpo_alpha == 0`` (TRL logs 0).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

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

CPOLossType = Literal["sigmoid", "hinge", "ipo", "simpo"]
MEAN_LOGPS_LOSS_TYPES = frozenset({"ipo", "simpo"})
LABEL_SMOOTHING_LOSS_TYPES = frozenset({"sigmoid", "simpo"})


@dataclass(kw_only=True, frozen=True)
class CPOConfig:
    """Hyper-parameters of the ``cpo`` objective (names and defaults as TRL 1.16's ``CPOConfig``)."""

    beta: float = 0.1
    """Inverse temperature of the pair loss; for ``ipo`` the regularisation ``tau``."""
    loss_type: CPOLossType = "sigmoid"
    """Pair loss: ``sigmoid`` (CPO), ``hinge``, ``ipo`` or ``simpo`` (the last two on token-mean log-probs)."""
    label_smoothing: float = 0.0
    """Label noise ``eps`` in [0, 0.5] (conservative loss); ``sigmoid`` and ``simpo`` only."""
    cpo_alpha: float = 1.0
    """Weight >= 0 of the NLL (behaviour cloning) term on the chosen completions."""
    simpo_gamma: float = 0.5
    """Target reward margin ``gamma`` of the ``simpo`` loss type."""
    alpha: float = 0.0
    """AlphaPO reward shape: 0 uses log-probs as rewards, otherwise ``(1 - p^-alpha) / alpha``."""

    def __post_init__(self) -> None:
        raise_section_problems("CPOConfig", cpo_config_problems(self))


def cpo_config_problems(cfg: Any) -> list[tuple[str, str]]:
    """Checks shared by ``cpo`` and ``simpo`` configs, as (field, message) pairs."""
    out: list[tuple[str, str]] = []
    if cfg.loss_type not in PAIR_LOSSES:
        hint = " (TRL's alphapo: loss_type simpo, cpo_alpha 0, alpha != 0)"
        choices = ", ".join(PAIR_LOSSES)
        out.append(("loss_type", f"unknown {cfg.loss_type!r}; choices: {choices}{hint}"))
    if not cfg.beta > 0:
        out.append(("beta", f"must be > 0 (got {cfg.beta})"))
    if not 0.0 <= cfg.label_smoothing <= 0.5:
        out.append(("label_smoothing", f"must be in [0, 0.5] (got {cfg.label_smoothing})"))
    elif cfg.label_smoothing > 0 and cfg.loss_type not in LABEL_SMOOTHING_LOSS_TYPES:
        out.append(("label_smoothing", f"is not used by loss_type {cfg.loss_type!r}; set it to 0"))
    if not cfg.cpo_alpha >= 0:
        out.append(("cpo_alpha", f"must be >= 0 (got {cfg.cpo_alpha})"))
    return out


def alphapo_rewards(logps: torch.Tensor, alpha: float) -> torch.Tensor:
    """``(1 - p^-alpha) / alpha`` with ``p = exp(logps)``; ``logps`` itself when ``alpha == 0``."""
    if alpha == 0.0:
        return logps
    return (1 - torch.exp(-alpha * logps)) / alpha


def _sigmoid(u: torch.Tensor, beta: float, eps: float, gamma: float) -> torch.Tensor:
    return -F.logsigmoid(beta * u) * (1 - eps) - F.logsigmoid(-beta * u) * eps


def _hinge(u: torch.Tensor, beta: float, eps: float, gamma: float) -> torch.Tensor:
    return torch.relu(1 - beta * u)


def _ipo(u: torch.Tensor, beta: float, eps: float, gamma: float) -> torch.Tensor:
    return (u - 1 / (2 * beta)) ** 2


def _simpo(u: torch.Tensor, beta: float, eps: float, gamma: float) -> torch.Tensor:
    # TRL: logits = u - gamma / beta, then the smoothed sigmoid of beta * logits
    return _sigmoid(u - gamma / beta, beta, eps, gamma)


PAIR_LOSSES: dict[str, Callable[[torch.Tensor, float, float, float], torch.Tensor]] = {
    "sigmoid": _sigmoid,
    "hinge": _hinge,
    "ipo": _ipo,
    "simpo": _simpo,
}
"""Pair loss of each ``loss_type`` as a function of ``(u, beta, label_smoothing, simpo_gamma)``."""


def cpo_pair_losses(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    *,
    loss_type: str,
    beta: float,
    label_smoothing: float,
    simpo_gamma: float,
    alpha: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """TRL's ``CPOTrainer.cpo_loss`` on per-sequence log-probs.

    Args:
        chosen_logps: ``[P]`` fp32 chosen log-probs (token means for ipo/simpo, sums otherwise).
        rejected_logps: ``[P]`` fp32 rejected log-probs, reduced the same way.
        loss_type: ``sigmoid``, ``hinge``, ``ipo`` or ``simpo``.
        beta: inverse temperature.
        label_smoothing: ``eps`` of the smoothed sigmoid (sigmoid, simpo).
        simpo_gamma: SimPO target margin.
        alpha: AlphaPO reward shape (0: log-probs).

    Returns:
        ``(losses [P], chosen_rewards [P], rejected_rewards [P])``; rewards are detached.
    """
    chosen_r, rejected_r = (
        alphapo_rewards(chosen_logps, alpha),
        alphapo_rewards(rejected_logps, alpha),
    )
    losses = PAIR_LOSSES[loss_type](chosen_r - rejected_r, beta, label_smoothing, simpo_gamma)
    return losses, beta * chosen_r.detach(), beta * rejected_r.detach()


def cpo_loss(
    cfg: Any, policy: dict[str, torch.Tensor], batch: Batch
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``mean(pair loss) + cpo_alpha * NLL(chosen)`` for a ``cpo`` or ``simpo`` config.

    Args:
        cfg: a :class:`CPOConfig` or ``SimPOConfig`` (``beta``, ``loss_type``, ``label_smoothing``,
            ``cpo_alpha``, ``simpo_gamma``, ``alpha``).
        policy: ``{"token_logps": [b, s] fp32, ...}``, plus ``"extra_logps": [k]`` for a batch
            with extra targets (prefix-shared rows).
        batch: pair batch (``loss_mask``, ``sequence_ids``, ``num_sequences`` = 2P, optional
            ``extra_targets``).

    Returns:
        ``(loss 0-d fp32, metrics)`` with TRL's ``rewards/*``, ``logps/*`` and ``nll_loss``.
    """
    lp = pair_log_probs(policy["token_logps"], batch, policy.get("extra_logps"))
    valid = lp.valid
    if cfg.loss_type in MEAN_LOGPS_LOSS_TYPES:
        chosen, rejected = lp.chosen_means, lp.rejected_means
    else:
        chosen, rejected = lp.chosen_sums, lp.rejected_sums
    chosen, rejected = zero_invalid(chosen, valid), zero_invalid(rejected, valid)
    losses, chosen_rewards, rejected_rewards = cpo_pair_losses(
        chosen,
        rejected,
        loss_type=cfg.loss_type,
        beta=cfg.beta,
        label_smoothing=cfg.label_smoothing,
        simpo_gamma=cfg.simpo_gamma,
        alpha=cfg.alpha,
    )
    nll = lp.chosen_nll()
    loss = masked_mean(losses, valid)
    if cfg.cpo_alpha != 0:
        loss = loss + cfg.cpo_alpha * nll
    metrics = reward_metrics(chosen_rewards, rejected_rewards, chosen, rejected, valid)
    metrics["nll_loss"] = nll.detach()
    return loss, metrics


@register_objective("cpo")
class CPO(Objective):
    """Contrastive Preference Optimization (arXiv:2401.08417): reference-free pair loss plus NLL on the chosen."""

    Config = CPOConfig
    batch_kind = "pair"
    needs_reference_model = False

    def loss(
        self, policy: dict[str, torch.Tensor], reference: Any, batch: Batch
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """See :func:`cpo_loss`; ``reference`` is unused (``None``)."""
        return cpo_loss(self.config, policy, batch)
