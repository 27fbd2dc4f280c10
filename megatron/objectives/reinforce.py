"""REINFORCE as GPT-NeoX trains it (``objective.name: reinforce``), so a NeoX user's config has a
home.

Sources: Williams (1992), "Simple statistical gradient-following algorithms"; the leave-one-out
baseline of Ahmadian et al. arXiv:2402.14740; GPT-NeoX ``train_impl: reinforce``
(``megatron/training.py`` ``forward_step``, ``megatron/data/online_dataset.py``; read at commit
ea7aefd, whose math is that of the PR that added it, f7a5a6f9).

Advantages (``baseline``): ``loo`` (NeoX's ``reinforce_leave_one_out: true``)
``A_i = r_i - mean_{j != i} r_j`` over the prompt's G completions, not standardised; or
``moving_average`` (NeoX's default) ``A_i = r_i - b``, ``b`` the mean of the group-mean rewards of
the ``baseline_window`` (100) groups before this one (0 for the very first). Loss, per completion
token ``t`` with ``d_t = log pi(o_t) - log pi_ref(o_t)``::

    L = sum_t m_t (-A_i log pi(o_t) + kl_div_beta * k_t) / sum_t m_t

``kl_impl``: ``abs`` ``k = |d|``, ``mse`` ``k = d^2 / 2``, ``kl`` ``k = d`` (as NeoX: the raw
difference, which only shifts the advantage by ``-beta``), ``full`` ``k = KL(pi(.|s_t) ||
pi_ref(.|s_t))``, the exact KL over the vocabulary at each position (NeoX's
``F.kl_div(ref_logp, logp, log_target=True).sum(-1)``; computed vocabulary-parallel in chunks,
:func:`megatron.parallel.chunked_vocab_parallel_kl`, never from full logits; the reference runs
in every training step). The penalty is part of the loss (its gradient flows through the
policy), not of the reward; no ratio, no clipping, one pass per rollout.

Departures from NeoX (tested against hand-worked values in ``tests/objectives/``):

* normalisation: NeoX divides the micro-batch's token sum by its token count *and* by the number
  of completions (``.mean()`` over the batch after a token mean), so its effective learning rate
  falls as 1 / micro-batch size; we take the token mean: a NeoX run's ``lr`` corresponds to ours
  divided by its micro-batch size.
* the moving average spans every rank's groups in rollout order (NeoX keeps one per rank, in its
  data server's order), so the data-parallel layout does not change the advantages.
* the rollouts come from the policy's own weights at each rollout (NeoX's vLLM server shares the
  live weights but buffers samples across updates); the reference model is ``reference.load`` or
  the run's start, never a resumed policy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch

from megatron.data.batch import Batch
from megatron.errors import FieldChecks
from megatron.objectives.online import (
    OnlineObjective,
    RolloutStats,
    common_metrics,
    flat_outputs,
    rollout_fields,
    token_inputs,
)
from megatron.objectives.policy_gradient import KL_IMPLS, reinforce_loss, reinforce_penalty
from megatron.objectives.registry import register_objective
from megatron.rollout.advantages import moving_average_advantages, nanstd, rloo_advantages


@dataclass(kw_only=True, frozen=True)
class ReinforceConfig:
    """Hyper-parameters of the ``reinforce`` objective (GPT-NeoX's names)."""

    num_generations: int = 4
    """Completions sampled per prompt (NeoX's data server example samples 4)."""
    baseline: Literal["loo", "moving_average"] = "moving_average"
    """``loo``: leave-one-out over the prompt's completions (NeoX ``reinforce_leave_one_out: true``); ``moving_average``: the mean of recent groups' mean rewards (NeoX's default)."""
    baseline_window: int = 100
    """Groups the moving average spans (NeoX: 100)."""
    kl_impl: Literal["abs", "mse", "kl", "full"] = "mse"
    """Per-token penalty against the reference: ``abs`` |d|, ``mse`` d^2/2, ``kl`` d (d = log pi - log pi_ref), ``full`` the exact KL over the vocabulary at each position."""
    kl_div_beta: float = 0.1
    """Weight of the penalty (0: no reference model)."""
    mask_truncated_completions: bool = False
    """Do not train on completions that reached rollout.max_new_tokens without EOS."""

    def __post_init__(self) -> None:
        checks = FieldChecks(self)
        checks.at_least("num_generations", 1)
        checks.at_least("baseline_window", 1)
        if self.kl_impl not in KL_IMPLS:
            checks.fail("kl_impl", f"must be one of {KL_IMPLS} (got {self.kl_impl!r})")
        checks.at_least("kl_div_beta", 0)
        checks.done()


@register_objective("reinforce")
class Reinforce(OnlineObjective):
    """REINFORCE with a leave-one-out or moving-average baseline and a per-token KL penalty
    (GPT-NeoX's ``train_impl: reinforce``)."""

    Config = ReinforceConfig

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        self.history: list[float] = []  # recent group-mean rewards (moving_average)

    @property
    def needs_reference_model(self) -> bool:  # type: ignore[override]
        return self.config.kl_div_beta > 0

    @property
    def needs_reference_hidden(self) -> bool:  # type: ignore[override]
        return self.needs_reference_model and self.config.kl_impl == "full"

    @property
    def needs_reference_logps(self) -> bool:  # type: ignore[override]
        return self.needs_reference_model and self.config.kl_impl != "full"

    @property
    def model_outputs(self) -> frozenset[str]:
        extra = {"kl"} if self.needs_reference_hidden else set()
        return super().model_outputs | extra

    def needs_old_logps(self, passes: int) -> bool:
        return False  # no ratio: REINFORCE is on-policy by construction

    @classmethod
    def check_config(cls, run_config: Any) -> list[str]:
        cfg = run_config.objective.params
        g = int(cfg.num_generations)
        if cfg.baseline == "loo" and g < 2:
            return [
                f"objective.num_generations ({g}) must be >= 2 with objective.baseline: loo "
                "(the baseline is the mean of the prompt's other completions)"
            ]
        return []

    def advantages(
        self, rewards: torch.Tensor, stats: RolloutStats
    ) -> tuple[torch.Tensor, dict[str, float]]:
        g, cfg = self.num_generations, self.config
        if cfg.baseline == "loo":
            adv = rloo_advantages(rewards, g)
        else:
            adv, self.history = moving_average_advantages(
                rewards, g, self.history, cfg.baseline_window
            )
        metrics: dict[str, float] = {}
        if g > 1:
            std = nanstd(rewards.view(-1, g), dim=1)
            metrics["frac_reward_zero_std"] = float(
                torch.isclose(std, torch.zeros_like(std)).float().mean()
            )
        if self.history:
            metrics["baseline"] = sum(self.history) / len(self.history)
        return adv, metrics

    def state_dict(self) -> dict[str, Any]:
        return {"history": list(self.history)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history = [float(x) for x in state.get("history", [])]

    def loss(self, policy: Any, reference: Any, batch: Batch) -> tuple[torch.Tensor, dict]:
        cfg, fields = self.config, rollout_fields(batch)
        tokens = token_inputs(policy, batch)
        penalty = None
        if self.needs_reference_hidden:
            if "kl" not in policy:
                raise ValueError("kl_impl full: the step gave the policy no reference (kl output)")
            penalty = flat_outputs(batch, policy["kl"], policy.get("extra_kl"))
        elif cfg.kl_div_beta > 0:
            penalty = reinforce_penalty(tokens.logps, fields.ref_logps, cfg.kl_impl)
        loss, metrics = reinforce_loss(
            tokens.logps,
            fields.advantages,
            tokens.mask,
            kl_div_beta=cfg.kl_div_beta,
            penalty=penalty,
            sequence_ids=tokens.sequence_ids,
        )
        return loss, {**metrics, **common_metrics(tokens, batch)}
