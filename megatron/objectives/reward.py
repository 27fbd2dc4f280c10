"""Bradley-Terry reward modelling (``objective.name: reward``) on pairwise data.

The model (``model.head: value``) maps each sequence ``prompt + completion`` to a scalar reward
``r``: its ``value_head`` applied to the final hidden state of one token, the sequence's last
token (``score_token: last``, what Hugging Face's ``*ForSequenceClassification`` reads: the last
non-pad token) or its last EOS token (``score_token: eos``). With ``r_w``, ``r_l`` the rewards of
a pair's chosen and rejected completions and ``m`` the pair's margin (when the data has one and
``use_margin``):

    L = mean_pairs -log sigma(r_w - r_l - m)                       Bradley-Terry, with margin
      + center_rewards_coefficient * mean_pairs (r_w + r_l)^2      (Eisenstein et al., 2023,
                                                                    arXiv:2312.09244)
      + z_loss_coefficient * mean_pairs logsumexp(r_w, r_l)^2      (z-loss, PaLM arXiv:2204.02311,
                                                                    on the pair's 2-way softmax)

Bradley-Terry preference model as in InstructGPT (arXiv:2203.02155, Eq. 1); the margin term is
Llama 2's (arXiv:2307.09288, Eq. 2). Both auxiliary terms only pin down the reward's free offset
(Bradley-Terry is invariant to adding a constant), so they leave the ranking loss unchanged.

Value-head initialisation: ``N(0, 1/(h + 1))`` (Stiennon et al., arXiv:2009.01325), the rest of the
model from the ``checkpoint.load`` (``finetune: true``) of an SFT or converted Hugging Face model,
whose ``lm_head`` is dropped (see :func:`megatron.training.checkpointing.load_weights`).

Reference implementation checked: TRL 1.16.0 ``trl/trainer/reward_trainer.py``
``RewardTrainer.compute_loss`` (loss, margin, ``center_rewards_coefficient``; metrics
``accuracy``, ``margin``, ``mean_reward``, ``min_reward``, ``max_reward``); the tests run it on
the same rewards.

Departures from TRL 1.16: ``z_loss_coefficient`` and ``score_token: eos`` are additions;
metrics are averaged per micro-batch, then over data-parallel ranks (TRL: the same); this
objective also logs ``reward_std`` (over the micro-batch's ``2P`` rewards, unbiased) instead of
the min/max.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F

from megatron.data.batch import Batch
from megatron.objectives.logprobs import split_pairs
from megatron.objectives.pairs import raise_section_problems
from megatron.objectives.registry import Objective, register_objective


@dataclass(kw_only=True, frozen=True)
class RewardConfig:
    """Hyper-parameters of the ``reward`` objective."""

    score_token: Literal["last", "eos"] = "last"
    """Token whose value is the reward: the sequence's ``last`` token (as HF's *ForSequenceClassification) or its last ``eos`` token."""
    use_margin: bool = True
    """Subtract the pair's ``margin`` from the data inside the sigmoid (when every dataset has one)."""
    center_rewards_coefficient: float | None = None
    """Weight of ``mean (r_w + r_l)^2`` (TRL's name; 0.01 in Eisenstein et al.); ``null``: off."""
    z_loss_coefficient: float = 0.0
    """Weight of ``mean logsumexp(r_w, r_l)^2``; 0: off."""

    def __post_init__(self) -> None:
        problems = []
        if self.score_token not in ("last", "eos"):
            problems.append(("score_token", f"must be 'last' or 'eos' (got {self.score_token!r})"))
        c = self.center_rewards_coefficient
        if c is not None and not c >= 0:
            problems.append(("center_rewards_coefficient", f"must be >= 0 or null (got {c})"))
        if not self.z_loss_coefficient >= 0:
            problems.append(("z_loss_coefficient", f"must be >= 0 (got {self.z_loss_coefficient})"))
        raise_section_problems("RewardConfig", problems)


def sequence_rewards(values: torch.Tensor, batch: Batch) -> torch.Tensor:
    """``[N]`` fp32: each sequence's value at its ``score_index`` (flat ``row * s + column``)."""
    return values.reshape(-1).float().index_select(0, batch.score_index.to(values.device))


@register_objective("reward")
class Reward(Objective):
    """Bradley-Terry reward model over ``pair`` batches (see the module docstring)."""

    Config = RewardConfig
    batch_kind = "pair"
    model_head = "value"

    def collate_options(self, pipeline: bool = False) -> dict[str, Any]:
        return {"score_token": self.config.score_token}

    def loss(
        self,
        policy: dict[str, torch.Tensor],
        reference: Any,
        batch: Batch,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Bradley-Terry loss (+ optional centering and z-loss) of a pair micro-batch.

        Args:
            policy: ``{"values": [b, s] fp32}`` (the value head at every position).
            reference: unused (``None``).
            batch: pair batch with ``score_index [2P]`` int64 (chosen ``0..P-1`` then rejected)
                and, with margins, ``margin [P]`` fp32.

        Returns:
            ``(loss 0-d fp32, metrics)``: ``accuracy`` (``r_w > r_l``, strict), ``margin``
            (``mean r_w - r_l``), ``mean_reward``, ``reward_std``, ``rewards/chosen``,
            ``rewards/rejected``; all detached.
        """
        cfg = self.config
        rewards = sequence_rewards(policy["values"], batch)
        chosen, rejected = split_pairs(rewards)
        diff = chosen - rejected
        if cfg.use_margin and batch.margin is not None:
            diff = diff - batch.margin.to(diff)
        loss = -F.logsigmoid(diff).mean()
        if cfg.center_rewards_coefficient is not None:
            loss = loss + cfg.center_rewards_coefficient * ((chosen + rejected) ** 2).mean()
        if cfg.z_loss_coefficient:
            z = torch.logaddexp(chosen, rejected)
            loss = loss + cfg.z_loss_coefficient * (z**2).mean()
        r = rewards.detach()
        c, j = chosen.detach(), rejected.detach()
        metrics = {
            "accuracy": (c > j).float().mean(),
            "margin": (c - j).mean(),
            "mean_reward": r.mean(),
            "reward_std": r.std() if r.numel() > 1 else torch.zeros_like(r.mean()),
            "rewards/chosen": c.mean(),
            "rewards/rejected": j.mean(),
        }
        return loss, metrics
