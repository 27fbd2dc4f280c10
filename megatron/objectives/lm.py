"""Plain next-token language-modelling objective (``objective.name: lm``).

Loss: token-mean negative log-likelihood over the tokens whose loss mask is 1,

    L = - sum_{b,t} m_{b,t} log p(x_{b,t+1} | x_{b,<=t}) / sum_{b,t} m_{b,t}

computed per micro-batch (Megatron-LM's convention; the engine averages micro-batches and
data-parallel ranks with equal weight). An all-masked micro-batch gives loss 0 with zero gradient
rather than NaN.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from megatron.data.batch import Batch
from megatron.objectives.registry import Objective, register_objective


@dataclass(kw_only=True)
class LMConfig:
    """Hyper-parameters of the ``lm`` objective."""

    z_loss: float = 0.0
    """Weight of the auxiliary z-loss (PaLM, arXiv:2204.02311) on log Z of each target token; 0 disables it."""


@register_objective("lm")
class LanguageModelling(Objective):
    """Next-token prediction over every token of the row whose loss mask is set."""

    Config = LMConfig
    batch_kind = "sequence"
    needs_reference_model = False
    token_nll_metric = "lm/nll"

    def loss(
        self, policy: dict[str, torch.Tensor], reference: Any, batch: Batch
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Token-mean NLL.

        Args:
            policy: ``{"token_logps": [b, s] fp32, "log_z": [b, s] fp32}`` for the shifted targets.
            reference: unused (``None``).
            batch: holds ``loss_mask`` ``[b, s]`` (0/1, already aligned with the targets).

        Returns:
            ``(loss, metrics)``; metrics are detached.
        """
        mask = batch.loss_mask.to(policy["token_logps"].dtype)
        n_tokens = mask.sum()
        denom = n_tokens.clamp(min=1.0)
        nll = -(policy["token_logps"] * mask).sum() / denom
        loss = nll
        metrics = {"lm/nll": nll.detach(), "lm/tokens": n_tokens.detach()}
        if self.config.z_loss > 0:
            z = (policy["log_z"].square() * mask).sum() / denom
            loss = loss + self.config.z_loss * z
            metrics["lm/z_loss"] = z.detach()
        return loss, metrics
