"""Simple Preference Optimization (``objective.name: simpo``), reference-free.

Paper: SimPO, Meng, Xia and Chen, arXiv:2405.14734 (Eq. 6):

    L = -log sigma(beta / |y_w| log pi(y_w|x) - beta / |y_l| log pi(y_l|x) - gamma)

i.e. the sigmoid loss on token-mean log-probs with a target margin ``gamma``, no reference model.
``label_smoothing`` gives the conservative form ``-(1-eps) log sigma(z) - eps log sigma(-z)``,
``cpo_alpha > 0`` adds the chosen NLL (CPO-SimPO), ``alpha != 0`` the AlphaPO reward shape
(arXiv:2501.03884); see :mod:`megatron.objectives.cpo`, which computes it.

Reference implementation checked: TRL 1.16.0, which runs SimPO as its experimental CPO trainer
with ``loss_type="simpo"`` (``trl/experimental/cpo/cpo_trainer.py`` ``CPOTrainer.cpo_loss``,
``get_batch_logps(average_log_prob=True)``); the tests compare with it.

Departures: from TRL, those of :mod:`megatron.objectives.cpo`, and ``cpo_alpha`` defaults to 0
here (pure SimPO; TRL's ``CPOConfig`` defaults it to 1.0 for every loss type). Defaults of
``beta`` and ``simpo_gamma`` are TRL's (0.1, 0.5); the paper tunes them per model, with ``beta``
an order of magnitude larger, so set both explicitly for real runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch

from megatron.data.batch import Batch
from megatron.objectives.cpo import cpo_config_problems, cpo_loss
from megatron.objectives.pairs import raise_section_problems
from megatron.objectives.registry import Objective, register_objective


@dataclass(kw_only=True, frozen=True)
class SimPOConfig:
    """Hyper-parameters of the ``simpo`` objective (TRL 1.16 ``CPOConfig`` names)."""

    beta: float = 0.1
    """Scale ``beta`` > 0 of the length-normalised log-prob reward."""
    simpo_gamma: float = 0.5
    """Target reward margin ``gamma``."""
    label_smoothing: float = 0.0
    """Label noise ``eps`` in [0, 0.5] (conservative loss)."""
    cpo_alpha: float = 0.0
    """Weight >= 0 of an NLL term on the chosen completions (0: SimPO; > 0: CPO-SimPO)."""
    alpha: float = 0.0
    """AlphaPO reward shape: 0 uses log-probs as rewards, otherwise ``(1 - p^-alpha) / alpha``."""

    @property
    def loss_type(self) -> Literal["simpo"]:
        """Always ``simpo`` (read by the shared CPO code)."""
        return "simpo"

    def __post_init__(self) -> None:
        raise_section_problems("SimPOConfig", cpo_config_problems(self))


@register_objective("simpo")
class SimPO(Objective):
    """SimPO (arXiv:2405.14734): sigmoid loss on token-mean log-probs with a target margin, no reference."""

    Config = SimPOConfig
    batch_kind = "pair"
    needs_reference_model = False

    def loss(
        self, policy: dict[str, torch.Tensor], reference: Any, batch: Batch
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """See :func:`megatron.objectives.cpo.cpo_loss`; ``reference`` is unused (``None``).

        Args:
            policy: ``{"token_logps": [b, s] fp32, ...}`` (and ``"extra_logps": [k]`` for a
                batch with extra targets).
            reference: unused.
            batch: pair batch (``loss_mask``, ``sequence_ids``, ``num_sequences`` = 2P).

        Returns:
            ``(loss, metrics)``: ``rewards/*`` are ``beta *`` token-mean log-probs, ``logps/*`` the
            token means, ``nll_loss`` the chosen NLL; detached.
        """
        return cpo_loss(self.config, policy, batch)
