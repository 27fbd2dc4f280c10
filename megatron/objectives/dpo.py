"""Direct Preference Optimization and its variants (``objective.name: dpo``).

Paper: DPO, Rafailov et al., arXiv:2305.18290. With per-sequence log-probs ``log pi(y|x)`` (token
sums over the completion), log-ratios ``rho_w = log pi(y_w) - log pi_ref(y_w)`` and
``rho_l = log pi(y_l) - log pi_ref(y_l)``, and ``Delta = rho_w - rho_l``:

    L_sigmoid = -(1 - eps) log sigma(beta Delta) - eps log sigma(-beta Delta)

(``eps = label_smoothing``: cDPO, Mitchell 2023, "A note on DPO with noisy preferences"). The other
``loss_type`` values are TRL 1.16's, each a per-pair loss averaged over the micro-batch's pairs,
summed over ``loss_type`` with ``loss_weights`` (RPO, arXiv:2404.19733, is ``[sigmoid, sft]`` with
weights ``[1, alpha]``):

- ``hinge`` (SLiC, arXiv:2305.10425): ``relu(1 - beta Delta)``;
- ``ipo`` (arXiv:2310.12036, Eq. 17): ``(Delta_avg - 1/(2 beta))^2``, ``Delta_avg`` built from
  per-token means ``rho / n`` (``n`` = completion tokens, clamped to >= 1), as TRL does;
- ``exo_pair`` (arXiv:2402.00856, Eq. 16): ``q_w (log q_w - log(1-eps)) + q_l (log q_l - log eps)``
  with ``q_w = sigma(beta Delta)``, ``q_l = sigma(-beta Delta)``;
- ``nca_pair`` (arXiv:2402.05369): ``-log sigma(r_w) - 1/2 log sigma(-r_w) - 1/2 log sigma(-r_l)``,
  ``r = beta rho``;
- ``robust`` (arXiv:2403.00409): ``[-(1-eps) log sigma(beta Delta) + eps log sigma(-beta Delta)]
  / (1 - 2 eps)``;
- ``bco_pair`` (arXiv:2404.04656): ``-log sigma(r_w) - log sigma(-r_l)``;
- ``sppo_hard`` (arXiv:2405.00675): ``(rho_w - 1/(2 beta))^2 + (rho_l + 1/(2 beta))^2``;
- ``aot`` / ``aot_unpaired`` (arXiv:2406.05882): the smoothed sigmoid loss on
  ``sort(log pi(y_w) - log pi(y_l)) - sort(log pi_ref(y_w) - log pi_ref(y_l))`` (paired), or on
  ``sort(rho_w) - sort(rho_l)`` (unpaired), sorting across the micro-batch;
- ``apo_zero`` / ``apo_down`` (arXiv:2408.06266, Eqs. 7/8): ``1 - sigma(r_w) + sigma(r_l)`` /
  ``sigma(r_w) + 1 - sigma(beta Delta)``;
- ``discopop`` (arXiv:2406.08414, Eq. 5): with ``z = beta Delta``, ``m = sigma(z / tau)``:
  ``-log sigma(z) (1 - m) + exp(-z) m``;
- ``sft``: token-mean NLL over every chosen target token of the micro-batch (logged ``nll_loss``);
- ``sigmoid_norm``: ``-log sigma(beta (rho_w / n_w - rho_l / n_l))`` (length-normalised DPO).

``f_divergence_type`` (f-DPO, arXiv:2309.16240) replaces ``rho`` by ``f'(pi/pi_ref)`` in
``Delta`` (the "scores"): forward KL ``1 - exp(-rho)``, Jensen-Shannon ``log 2 + log sigma(rho)``,
alpha-divergence ``(exp((a-1) rho) - 1)/(a-1)`` (exponent clamped to <= 80, reverse KL when
``a = 1``); only the loss types built on ``Delta`` accept it. ``use_weighting`` (WPO,
arXiv:2406.11827, Eq. 2) multiplies each pair's loss by ``w_w w_l``, ``w = exp(mean_t(log p_t -
log sum_v p_v^2))`` (no gradient). ``ld_alpha`` (LD-DPO, arXiv:2409.06411) down-weights the tokens
of the longer completion beyond the shorter one's length in both policy and reference log-probs
(:func:`megatron.objectives.logprobs.ld_pair_log_probs`).

Reference implementation checked: TRL 1.16.0, ``trl/trainer/dpo_trainer.py``
``DPOTrainer._compute_loss`` and ``compute_ref_log_probs``, ``trl/trainer/dpo_config.py``; the
tests run TRL's own ``_compute_loss`` on the same per-token log-probs.

Departures from TRL 1.16:

- ``sigmoid`` applies ``label_smoothing`` (cDPO). TRL 1.16 ignores ``label_smoothing`` for
  ``sigmoid`` (it only reaches ``robust``, ``exo_pair``, ``aot*``); older TRL applied it as here.
  A ``label_smoothing`` that no listed loss type uses is an error rather than ignored.
- ``reference_free`` (not in TRL 1.16; as TRL <= 0.x): reference log-probs are taken as 0.
- Pairs with an all-masked completion are left out of the loss and metric means (TRL would
  average them in; it never builds them). ``aot*`` sorts the valid pairs only.
- ``discopop`` computes ``exp(-z) m`` as ``exp(-z + log sigma(z/tau))``: equal, but without the
  ``inf * 0 = NaN`` TRL gives for ``z < -88``.
- ``robust`` with ``label_smoothing`` outside [0, 0.5) is an error (TRL warns).
- The loss is the mean over this micro-batch's pairs; the engine averages micro-batches and
  data-parallel ranks with equal weight (TRL: same per device batch, then DDP averaging).

Left out of TRL 1.16's ``DPOConfig``: everything outside the loss (``precompute_ref_log_probs``,
``sync_ref_model`` / TR-DPO, padding, truncation: trainer and data layers), and the logged
``logits/*``, ``entropy``, ``mean_token_accuracy``, which need the logits. TRL 1.16's ``bco_pair``
keeps no running reward mean (older TRL and the BCO paper subtract one), so this objective keeps
no state either: the loss is a pure function of the micro-batch, identical on every rank layout.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F

from megatron.data.batch import Batch
from megatron.objectives.logprobs import (
    PairLogProbs,
    ld_pair_log_probs,
    pair_log_probs,
    sequence_log_probs,
    split_pairs,
)
from megatron.objectives.pairs import (
    masked_mean,
    raise_section_problems,
    reward_metrics,
    zero_invalid,
)
from megatron.objectives.registry import Objective, register_objective

DPOLossType = Literal[
    "sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
    "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm",
]  # fmt: skip
FDivergence = Literal["reverse_kl", "forward_kl", "js_divergence", "alpha_divergence"]

# Loss types built on the chosen-rejected score difference (TRL's f_divergence_loss_types).
F_DIVERGENCE_LOSS_TYPES = frozenset(
    {"sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop", "sft"}
)
LABEL_SMOOTHING_LOSS_TYPES = frozenset({"sigmoid", "robust", "exo_pair", "aot", "aot_unpaired"})
SORTING_LOSS_TYPES = frozenset({"aot", "aot_unpaired"})


@dataclass(kw_only=True, frozen=True)
class DPOConfig:
    """Hyper-parameters of the ``dpo`` objective (names and defaults as TRL 1.16's ``DPOConfig``)."""

    beta: float = 0.1
    """Inverse temperature of the implicit reward ``beta * log(pi / pi_ref)``; for ``ipo`` the regularisation ``tau``."""
    loss_type: list[DPOLossType] = field(default_factory=lambda: ["sigmoid"])
    """Loss types, summed with ``loss_weights`` (e.g. ``[sigmoid, sft]`` for RPO). Always a list."""
    loss_weights: list[float] | None = None
    """Weight of each ``loss_type`` entry (same length); ``null`` weighs each 1.0."""
    label_smoothing: float = 0.0
    """Label noise ``eps`` in [0, 1): cDPO for ``sigmoid``, flip rate for ``robust`` (< 0.5), EXO's ``eps`` (> 0), ``aot*``."""
    f_divergence_type: FDivergence = "reverse_kl"
    """f-DPO divergence; anything but ``reverse_kl`` only for sigmoid, sigmoid_norm, hinge, ipo, exo_pair, robust, discopop, sft."""
    f_alpha_divergence_coef: float = 0.5
    """``alpha`` of ``alpha_divergence`` (1.0 reduces to reverse KL)."""
    reference_free: bool = False
    """Use no reference model: reference log-probs are 0 (implicit reward ``beta * log pi``)."""
    use_weighting: bool = False
    """WPO pair weights (needs the model's per-token ``log_sum_sq_probs``); not with ``aot*``."""
    ld_alpha: float | None = None
    """LD-DPO weight in [0, 1] of the tokens past the shorter completion's length; ``null``: plain sums."""
    discopop_tau: float = 0.05
    """Temperature ``tau`` > 0 of the ``discopop`` mixing coefficient."""

    def __post_init__(self) -> None:
        raise_section_problems("DPOConfig", _config_problems(self))


def _config_problems(cfg: DPOConfig) -> list[tuple[str, str]]:
    """TRL 1.16's ``DPOConfig`` / ``DPOTrainer.__init__`` checks, as (field, message) pairs."""
    out: list[tuple[str, str]] = []
    types = cfg.loss_type
    if not isinstance(types, list) or not types:
        return [("loss_type", f"must be a non-empty list of loss types (got {types!r})")]
    unknown = [x for x in types if x not in LOSSES]
    if unknown:
        out.append(("loss_type", f"unknown {unknown}; choices: {', '.join(LOSSES)}"))
    if cfg.loss_weights is not None and len(cfg.loss_weights) != len(types):
        out.append(
            (
                "loss_weights",
                f"has {len(cfg.loss_weights)} entries but loss_type has {len(types)}",
            )
        )
    if not cfg.beta > 0:
        out.append(("beta", f"must be > 0 (got {cfg.beta})"))
    if not 0.0 <= cfg.label_smoothing < 1.0:
        out.append(("label_smoothing", f"must be in [0, 1) (got {cfg.label_smoothing})"))
    elif cfg.label_smoothing > 0 and not LABEL_SMOOTHING_LOSS_TYPES & set(types):
        out.append(
            (
                "label_smoothing",
                f"({cfg.label_smoothing}) is used by none of loss_type {types}; it applies to "
                f"{', '.join(sorted(LABEL_SMOOTHING_LOSS_TYPES))}",
            )
        )
    if "robust" in types and not cfg.label_smoothing < 0.5:
        out.append(("label_smoothing", f"must be < 0.5 for robust (got {cfg.label_smoothing})"))
    if "exo_pair" in types and cfg.label_smoothing == 0.0:
        out.append(("label_smoothing", "must be > 0 for exo_pair (the EXO paper uses 1e-3)"))
    unsupported = sorted(set(types) - F_DIVERGENCE_LOSS_TYPES)
    if cfg.f_divergence_type != "reverse_kl" and unsupported:
        out.append(
            (
                "f_divergence_type",
                f"{cfg.f_divergence_type!r} has no valid generalisation for loss_type {unsupported}",
            )
        )
    if cfg.use_weighting and SORTING_LOSS_TYPES & set(types):
        out.append(("use_weighting", "is not defined for aot/aot_unpaired (they sort pairs)"))
    if cfg.ld_alpha is not None and not 0.0 <= cfg.ld_alpha <= 1.0:
        out.append(("ld_alpha", f"must be in [0, 1] or null (got {cfg.ld_alpha})"))
    if not cfg.discopop_tau > 0:
        out.append(("discopop_tau", f"must be > 0 (got {cfg.discopop_tau})"))
    return out


# ----------------------------------------------------------------------------- per-pair terms
@dataclass(frozen=True)
class DPOTerms:
    """Everything a DPO loss type reads; ``[P]`` fp32, invalid pairs already zeroed."""

    chosen_logps: torch.Tensor
    rejected_logps: torch.Tensor
    ref_chosen_logps: torch.Tensor
    ref_rejected_logps: torch.Tensor
    chosen_scores: torch.Tensor
    """f-divergence scores of the chosen (``rho_w`` for reverse KL)."""
    rejected_scores: torch.Tensor
    chosen_counts: torch.Tensor
    rejected_counts: torch.Tensor
    valid: torch.Tensor
    """``[P]`` bool."""
    nll: torch.Tensor
    """0-d token-mean NLL of the chosen targets."""

    @property
    def chosen_logratios(self) -> torch.Tensor:
        """``rho_w = log pi(y_w) - log pi_ref(y_w)``."""
        return self.chosen_logps - self.ref_chosen_logps

    @property
    def rejected_logratios(self) -> torch.Tensor:
        """``rho_l = log pi(y_l) - log pi_ref(y_l)``."""
        return self.rejected_logps - self.ref_rejected_logps

    @property
    def delta_score(self) -> torch.Tensor:
        """``Delta``: chosen minus rejected f-divergence score."""
        return self.chosen_scores - self.rejected_scores


def f_divergence_scores(logratios: torch.Tensor, kind: str, alpha: float) -> torch.Tensor:
    """``f'(pi / pi_ref)`` of f-DPO as a function of ``rho = log(pi / pi_ref)`` (``[P]`` fp32)."""
    if kind == "reverse_kl" or (kind == "alpha_divergence" and abs(alpha - 1.0) < 1e-6):
        return logratios
    if kind == "forward_kl":
        return 1 - torch.exp(-logratios)
    if kind == "js_divergence":
        return math.log(2) + F.logsigmoid(logratios)
    if kind == "alpha_divergence":
        t = ((alpha - 1.0) * logratios).clamp(max=80.0)  # exp stays finite in fp32 (TRL's clamp)
        return (torch.exp(t) - 1.0) / (alpha - 1.0)
    raise ValueError(f"unknown f_divergence_type {kind!r}")


def _smoothed_sigmoid(z: torch.Tensor, eps: float) -> torch.Tensor:
    return -F.logsigmoid(z) * (1 - eps) - F.logsigmoid(-z) * eps


def _sigmoid(t: DPOTerms, c: DPOConfig) -> torch.Tensor:
    return _smoothed_sigmoid(c.beta * t.delta_score, c.label_smoothing)


def _hinge(t: DPOTerms, c: DPOConfig) -> torch.Tensor:
    return torch.relu(1 - c.beta * t.delta_score)


def _normalised_delta(t: DPOTerms) -> torch.Tensor:
    chosen = t.chosen_scores / t.chosen_counts.clamp(min=1.0)
    return chosen - t.rejected_scores / t.rejected_counts.clamp(min=1.0)


def _ipo(t: DPOTerms, c: DPOConfig) -> torch.Tensor:
    return (_normalised_delta(t) - 1 / (2 * c.beta)) ** 2


def _sigmoid_norm(t: DPOTerms, c: DPOConfig) -> torch.Tensor:
    return -F.logsigmoid(c.beta * _normalised_delta(t))


def _exo_pair(t: DPOTerms, c: DPOConfig) -> torch.Tensor:
    z, eps = c.beta * t.delta_score, c.label_smoothing
    chosen = torch.sigmoid(z) * (F.logsigmoid(z) - math.log1p(-eps))
    return chosen + torch.sigmoid(-z) * (F.logsigmoid(-z) - math.log(eps))


def _nca_pair(t: DPOTerms, c: DPOConfig) -> torch.Tensor:
    rw, rl = c.beta * t.chosen_logratios, c.beta * t.rejected_logratios
    return -F.logsigmoid(rw) - 0.5 * F.logsigmoid(-rw) - 0.5 * F.logsigmoid(-rl)


def _robust(t: DPOTerms, c: DPOConfig) -> torch.Tensor:
    z, eps = c.beta * t.delta_score, c.label_smoothing
    return (-(1 - eps) * F.logsigmoid(z) + eps * F.logsigmoid(-z)) / (1 - 2 * eps)


def _bco_pair(t: DPOTerms, c: DPOConfig) -> torch.Tensor:
    return -F.logsigmoid(c.beta * t.chosen_logratios) - F.logsigmoid(-c.beta * t.rejected_logratios)


def _sppo_hard(t: DPOTerms, c: DPOConfig) -> torch.Tensor:
    half = 0.5 / c.beta
    return (t.chosen_logratios - half) ** 2 + (t.rejected_logratios + half) ** 2


def _sorted_valid(x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``x`` sorted ascending over the valid pairs, invalid entries (0) moved to the end."""
    order = torch.argsort(torch.where(valid, x, torch.inf), stable=True)
    return x.gather(0, order)


def _aot_loss(a: torch.Tensor, b: torch.Tensor, t: DPOTerms, c: DPOConfig) -> torch.Tensor:
    # Invalid pairs sit at the end of both sorted tensors; zero them so masked_mean drops them
    # (masked_mean reads t.valid, which has the same number of True entries).
    n_valid = t.valid.sum()
    head = torch.arange(a.numel(), device=a.device) < n_valid
    delta = zero_invalid(_sorted_valid(a, t.valid) - _sorted_valid(b, t.valid), head)
    loss = _smoothed_sigmoid(c.beta * delta, c.label_smoothing)
    # The first n_valid sorted entries move to the valid positions, for the caller's masked mean
    # (after sorting, entry i belongs to no particular pair).
    return torch.zeros_like(loss).masked_scatter(t.valid, loss)


def _aot(t: DPOTerms, c: DPOConfig) -> torch.Tensor:
    policy = t.chosen_logps - t.rejected_logps
    reference = t.ref_chosen_logps - t.ref_rejected_logps
    return _aot_loss(policy, reference, t, c)


def _aot_unpaired(t: DPOTerms, c: DPOConfig) -> torch.Tensor:
    return _aot_loss(t.chosen_logratios, t.rejected_logratios, t, c)


def _apo_zero(t: DPOTerms, c: DPOConfig) -> torch.Tensor:
    chosen = 1 - torch.sigmoid(c.beta * t.chosen_logratios)
    return chosen + torch.sigmoid(c.beta * t.rejected_logratios)


def _apo_down(t: DPOTerms, c: DPOConfig) -> torch.Tensor:
    margin = t.chosen_logratios - t.rejected_logratios
    return torch.sigmoid(c.beta * t.chosen_logratios) + 1 - torch.sigmoid(c.beta * margin)


def _discopop(t: DPOTerms, c: DPOConfig) -> torch.Tensor:
    z = c.beta * t.delta_score
    modulation = torch.sigmoid(z / c.discopop_tau)
    # exp(-z) * sigmoid(z / tau), in log space so that it stays finite for very negative z
    exp_term = torch.exp(-z + F.logsigmoid(z / c.discopop_tau))
    return -F.logsigmoid(z) * (1 - modulation) + exp_term


def _sft(t: DPOTerms, c: DPOConfig) -> torch.Tensor:
    return t.nll.expand(t.valid.shape)


LOSSES: dict[str, Callable[[DPOTerms, DPOConfig], torch.Tensor]] = {
    "sigmoid": _sigmoid,
    "hinge": _hinge,
    "ipo": _ipo,
    "exo_pair": _exo_pair,
    "nca_pair": _nca_pair,
    "robust": _robust,
    "bco_pair": _bco_pair,
    "sppo_hard": _sppo_hard,
    "aot": _aot,
    "aot_unpaired": _aot_unpaired,
    "apo_zero": _apo_zero,
    "apo_down": _apo_down,
    "discopop": _discopop,
    "sft": _sft,
    "sigmoid_norm": _sigmoid_norm,
}
"""Per-pair loss of each ``loss_type``: ``(terms, config) -> [P]``."""


# ----------------------------------------------------------------------------- the objective
def wpo_weights(
    token_logps: torch.Tensor,
    log_sum_sq_probs: torch.Tensor,
    batch: Batch,
    extra_logps: torch.Tensor | None = None,
    extra_log_sum_sq_probs: torch.Tensor | None = None,
) -> torch.Tensor:
    """WPO pair weights ``w_w * w_l`` (``[P]`` fp32, no gradient).

    ``w = exp(mean over target tokens of (log p_t - log sum_v p_v^2))``, TRL 1.16's
    ``use_weighting`` (token count clamped to >= 1); the extra targets of prefix-shared rows are
    target tokens too.

    Args:
        token_logps: ``[b, s]`` policy log-probs of the targets.
        log_sum_sq_probs: ``[b, s]`` ``log sum_v p_v^2`` of the policy at each position.
        batch: a pair batch.
        extra_logps: ``[k]`` policy log-probs of the batch's extra targets, if it has any.
        extra_log_sum_sq_probs: ``[k]`` ``log sum_v p_v^2`` at the extra targets' hidden states.
    """
    extra = None
    if extra_logps is not None:
        if extra_log_sum_sq_probs is None:
            raise ValueError("wpo_weights: extra_logps need their extra_log_sum_sq_probs")
        extra = extra_logps - extra_log_sum_sq_probs
    with torch.no_grad():
        sums, counts = sequence_log_probs(token_logps - log_sum_sq_probs, batch, extra)
        chosen, rejected = split_pairs(torch.exp(sums / counts.clamp(min=1.0)))
    return chosen * rejected


@register_objective("dpo")
class DPO(Objective):
    """DPO and TRL 1.16's variants (sigmoid, IPO, RPO, EXO, NCA, robust, BCO, SPPO, AOT, APO, DiscoPOP, WPO, LD-DPO, f-DPO)."""

    Config = DPOConfig
    batch_kind = "pair"
    needs_reference_model = True

    def __init__(self, config: DPOConfig) -> None:
        super().__init__(config)
        # why: the class attribute is the documented default; a reference-free run needs none,
        # so the trainer must read this attribute on the instance.
        self.needs_reference_model = not config.reference_free

    @property
    def model_outputs(self) -> frozenset[str]:
        """WPO (``use_weighting``) also reads ``log sum_v p_v^2`` per token."""
        extra = {"log_sum_sq_probs"} if self.config.use_weighting else set()
        return frozenset({"token_logps", "log_z", *extra})

    @classmethod
    def check_config(cls, run_config: Any) -> list[str]:
        """``aot``/``aot_unpaired`` sort within a micro-batch: they need >= 2 pairs in it."""
        params, micro = run_config.objective.params, run_config.training.micro_batch_size
        sorting = sorted(SORTING_LOSS_TYPES & set(params.loss_type))
        if sorting and micro < 2:
            return [
                f"training.micro_batch_size ({micro}) must be >= 2 for objective.loss_type "
                f"{sorting}: they sort log-ratios across the pairs of a micro-batch"
            ]
        return []

    def sequence_log_probs(
        self,
        token_logps: torch.Tensor,
        batch: Batch,
        extra_logps: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Per-sequence log-probs ``[2P]`` fp32 as this objective reduces them (sum, or LD-DPO).

        The reference log-probs must be reduced the same way: see :meth:`reference_log_probs`.

        Args:
            token_logps: ``[b, s]`` log-probs of the targets.
            batch: the pair batch.
            extra_logps: ``[k]`` log-probs of its extra targets (prefix-shared rows), if any.
        """
        if self.config.ld_alpha is None:
            return sequence_log_probs(token_logps, batch, extra_logps)[0]
        return ld_pair_log_probs(token_logps, batch, self.config.ld_alpha, extra_logps)

    def reference_cache_params(self) -> dict[str, Any]:
        """LD-DPO reduces token log-probs differently; the reference must match."""
        return {"ld_alpha": self.config.ld_alpha}

    def reference_log_probs(
        self,
        token_logps: torch.Tensor,
        batch: Batch,
        *,
        extra_logps: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """The ``reference`` argument of :meth:`loss` from the reference model's token log-probs.

        Args:
            token_logps: ``[b, s]`` reference log-probs of the targets (no gradient needed).
            batch: the pair batch.
            extra_logps: ``[k]`` reference log-probs of its extra targets (prefix-shared rows).

        Returns:
            ``{"chosen_logps": [P], "rejected_logps": [P]}`` fp32, detached: per example, the
            same values whatever the batch's layout.
        """
        extra = None if extra_logps is None else extra_logps.detach()
        chosen, rejected = split_pairs(self.sequence_log_probs(token_logps.detach(), batch, extra))
        return {"chosen_logps": chosen, "rejected_logps": rejected}

    def terms(
        self,
        policy: dict[str, torch.Tensor],
        reference: dict[str, torch.Tensor] | None,
        batch: Batch,
    ) -> DPOTerms:
        """Per-pair quantities of the micro-batch (invalid pairs zeroed), see :class:`DPOTerms`."""
        cfg = self.config
        token_logps, extra_logps = policy["token_logps"], policy.get("extra_logps")
        raw: PairLogProbs = pair_log_probs(token_logps, batch, extra_logps)
        valid = raw.valid
        if cfg.ld_alpha is None:
            chosen, rejected = raw.chosen_sums, raw.rejected_sums
        else:
            ld = ld_pair_log_probs(token_logps, batch, cfg.ld_alpha, extra_logps)
            chosen, rejected = split_pairs(ld)
        if cfg.reference_free:
            ref_chosen, ref_rejected = torch.zeros_like(chosen), torch.zeros_like(rejected)
        elif reference is None:
            raise ValueError("dpo needs reference log-probs (or objective.reference_free: true)")
        else:
            ref_chosen = reference["chosen_logps"].to(chosen.dtype)
            ref_rejected = reference["rejected_logps"].to(rejected.dtype)
        chosen, ref_chosen = zero_invalid(chosen, valid), zero_invalid(ref_chosen, valid)
        rejected, ref_rejected = zero_invalid(rejected, valid), zero_invalid(ref_rejected, valid)
        kind, alpha = cfg.f_divergence_type, cfg.f_alpha_divergence_coef
        return DPOTerms(
            chosen_logps=chosen,
            rejected_logps=rejected,
            ref_chosen_logps=ref_chosen,
            ref_rejected_logps=ref_rejected,
            chosen_scores=f_divergence_scores(chosen - ref_chosen, kind, alpha),
            rejected_scores=f_divergence_scores(rejected - ref_rejected, kind, alpha),
            chosen_counts=raw.chosen_counts,
            rejected_counts=raw.rejected_counts,
            valid=valid,
            nll=raw.chosen_nll(),
        )

    def loss(
        self,
        policy: dict[str, torch.Tensor],
        reference: dict[str, torch.Tensor] | None,
        batch: Batch,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Weighted sum over ``loss_type`` of the mean per-pair loss.

        Args:
            policy: ``{"token_logps": [b, s] fp32, ...}``; with ``use_weighting`` also
                ``"log_sum_sq_probs": [b, s] fp32`` (``log sum_v p_v^2`` per position). A batch
                with extra targets (prefix-shared rows) also needs ``"extra_logps": [k]`` (and
                with ``use_weighting`` ``"extra_log_sum_sq_probs": [k]``).
            reference: ``{"chosen_logps": [P], "rejected_logps": [P]}`` fp32 per-sequence
                reference log-probs reduced by :meth:`reference_log_probs`; ``None`` when
                ``reference_free``.
            batch: pair batch: ``loss_mask [b, s]`` fp32, ``sequence_ids [b, s]`` int64,
                ``num_sequences`` (2P), optional ``extra_targets``.

        Returns:
            ``(loss 0-d fp32, metrics)``: TRL's ``rewards/*`` (``beta * rho``), ``logps/*``
            (the policy log-probs used) and, with ``sft``, ``nll_loss``; all detached.
        """
        cfg = self.config
        t = self.terms(policy, reference, batch)
        weights = cfg.loss_weights or [1.0] * len(cfg.loss_type)
        pair_weight = None
        if cfg.use_weighting:
            pair_weight = wpo_weights(
                policy["token_logps"],
                policy["log_sum_sq_probs"],
                batch,
                policy.get("extra_logps"),
                policy.get("extra_log_sum_sq_probs"),
            )
        loss = torch.zeros((), dtype=torch.float32, device=t.valid.device)
        for loss_type, weight in zip(cfg.loss_type, weights, strict=True):
            per_pair = LOSSES[loss_type](t, cfg)
            if pair_weight is not None:
                per_pair = per_pair * pair_weight
            loss = loss + weight * masked_mean(per_pair, t.valid)
        metrics = reward_metrics(
            cfg.beta * t.chosen_logratios,
            cfg.beta * t.rejected_logratios,
            t.chosen_logps,
            t.rejected_logps,
            t.valid,
        )
        if "sft" in cfg.loss_type:
            metrics["nll_loss"] = t.nll.detach()
        return loss, metrics
