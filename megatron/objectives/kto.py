"""Kahneman-Tversky Optimization (``objective.name: kto``) on unpaired (prompt, completion, label) data.

Paper: KTO, Ethayarajh et al., arXiv:2402.01306, Eq. 7-8. With the implicit reward
``r(x, y) = log pi(y|x) - log pi_ref(y|x)`` (token sums over the completion) and the reference
point ``z0 = max(0, KL_hat)``:

    desirable   (label 1):  L = w_D (1 - sigma(beta (r - z0)))
    undesirable (label 0):  L = w_U (1 - sigma(beta (z0 - r)))

``L`` is averaged over the micro-batch's examples (weights inside the mean, as TRL). ``KL_hat`` is
the mean of ``log pi(y'|x) - log pi_ref(y'|x)`` over *mismatched* pairs: each example's prompt
with another example's completion ``y'`` (the paper, Sec. 4.1; TRL). The mismatch comes from the
dataset (:class:`megatron.data.datasets.UnpairedDataset`: a fixed permutation cycle, so any
micro-batch size works, 1 included — GPT-NeoX instead takes the other half of the batch's
*matched* pairs and needs micro-batch > 1). ``KL_hat`` is detached and averaged over the
data-parallel group (sum / count over every rank's KL sequences of the micro-batch; TRL gathers
the per-process means, the same with equal per-rank counts), then clamped at 0.

``loss_type: apo_zero_unpaired`` (APO, D'Oosterlinck et al., arXiv:2408.06266, the unpaired
form of Eq. 7): desirable ``1 - sigma(beta r)``, undesirable ``sigma(beta r)``; it uses no KL
term, so its batches carry no KL sequences.

The KTO paper (Sec. 4.2) recommends ``desirable_weight * n_D / (undesirable_weight * n_U)`` in
``[1, 4/3]``; each step logs the number of examples of each kind (``count/*``) to check it.

Reference implementation checked: TRL 1.16.0 ``trl/trainer/kto_trainer.py``
``KTOTrainer._compute_loss`` and ``kto_config.py``; the tests run TRL's own ``_compute_loss`` on
the same per-token log-probs.

Departures from TRL 1.16:

- TRL rotates completions by one *within* each batch; here the mismatch is drawn from the whole
  dataset (deterministic per example, so a reference cache can hold its log-probs).
- Examples whose completion has no target token are left out of the loss and metric means.
- ``reference_free`` (not in TRL): reference log-probs are 0.
- The KL sequences are forwarded without gradient as a sub-batch of their own (TRL: a separate
  ``no_grad`` forward too); under pipeline parallelism they share the examples' forward (and its
  backward, contributing no gradient), since that engine forwards one batch per micro-batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

from megatron.data.batch import KL_SEQUENCES, Batch
from megatron.objectives.logprobs import sequence_log_probs
from megatron.objectives.pairs import masked_mean, raise_section_problems, zero_invalid
from megatron.objectives.registry import Objective, register_objective

LOSS_TYPES = ("kto", "apo_zero_unpaired")
KL_LOSS_TYPES = frozenset(LOSS_TYPES[:1])
"""Loss types with the KL reference point (their batches carry KL sequences)."""


@dataclass(kw_only=True, frozen=True)
class KTOConfig:
    """Hyper-parameters of the ``kto`` objective (names and defaults as TRL 1.16's ``KTOConfig``)."""

    beta: float = 0.1
    """Inverse temperature of the implicit reward ``beta * log(pi / pi_ref)``."""
    loss_type: Literal["kto", "apo_zero_unpaired"] = "kto"
    """``kto`` (paper Eq. 7-8, with the KL reference point) or ``apo_zero_unpaired`` (no KL term)."""
    desirable_weight: float = 1.0
    """Weight ``w_D`` of desirable (label 1) examples' losses."""
    undesirable_weight: float = 1.0
    """Weight ``w_U`` of undesirable (label 0) examples' losses."""
    reference_free: bool = False
    """Use no reference model: reference log-probs are 0."""

    def __post_init__(self) -> None:
        problems = []
        if not self.beta > 0:
            problems.append(("beta", f"must be > 0 (got {self.beta})"))
        if self.loss_type not in LOSS_TYPES:
            problems.append(
                ("loss_type", f"must be one of {', '.join(LOSS_TYPES)} (got {self.loss_type!r})")
            )
        for name in ("desirable_weight", "undesirable_weight"):
            if not getattr(self, name) > 0:
                problems.append((name, f"must be > 0 (got {getattr(self, name)})"))
        raise_section_problems("KTOConfig", problems)


@register_objective("kto")
class KTO(Objective):
    """KTO / unpaired APO-zero over ``unpaired`` batches (see the module docstring)."""

    Config = KTOConfig
    batch_kind = "unpaired"

    def __init__(self, config: KTOConfig) -> None:
        super().__init__(config)
        self.needs_reference_model = not config.reference_free

    @property
    def uses_kl(self) -> bool:
        """Whether the loss has the KL reference point (and batches carry KL sequences)."""
        return self.config.loss_type in KL_LOSS_TYPES

    @property
    def side_batches(self) -> tuple[str, ...]:
        """The KL sequences' sub-batch, forwarded without gradient (see the registry)."""
        return (KL_SEQUENCES,) if self.uses_kl else ()

    def collate_options(self, pipeline: bool = False) -> dict[str, Any]:
        """KL sequences only for ``kto``; their own sub-batch except under pipeline parallelism
        (whose engine forwards one batch per micro-batch: they follow the examples there)."""
        return {"with_kl": self.uses_kl, "separate_kl": self.uses_kl and not pipeline}

    def data_warnings(self, dataset: Any, max_rows: int = 200_000) -> list[str]:
        """The KTO paper's (Sec. 4.2) balance rule, as TRL 1.16 checks it: ``desirable_weight *
        n_D / (undesirable_weight * n_U)`` should lie in ``[1, 4/3]``.

        Labels are counted over the whole dataset, or a seeded random sample of ``max_rows``.
        """
        n = len(dataset)
        sampled = n > max_rows
        rows = np.random.default_rng(0).choice(n, max_rows, replace=False) if sampled else range(n)
        labels = [bool(dataset[int(i)]["label"]) for i in rows]
        n_d = sum(labels)
        n_u = len(labels) - n_d
        cfg = self.config
        if n_d == 0 or n_u == 0:
            kind = "desirable" if n_d == 0 else "undesirable"
            return [f"objective.kto: the training data has no {kind} examples"]
        ratio = cfg.desirable_weight * n_d / (cfg.undesirable_weight * n_u)
        if 1.0 <= ratio <= 4 / 3:
            return []
        d_lo, d_hi = cfg.undesirable_weight * n_u / n_d, 4 / 3 * cfg.undesirable_weight * n_u / n_d
        return [
            f"objective.desirable_weight * desirable / (undesirable_weight * undesirable) = "
            f"{cfg.desirable_weight} * {n_d} / ({cfg.undesirable_weight} * {n_u}) = {ratio:.3f}"
            f"{' (sampled)' if sampled else ''}; the KTO paper recommends [1, 4/3]: e.g. "
            f"desirable_weight in [{d_lo:.3g}, {d_hi:.3g}]"
        ]

    def reference_cache_params(self) -> dict[str, Any]:
        """The KL sequences are part of what is cached."""
        return {"with_kl": self.uses_kl}

    def _split(
        self,
        token_logps: torch.Tensor,
        batch: Batch,
        kl_token_logps: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(completion sums [n], completion counts [n], kl sums [n], kl counts [n])``.

        The KL sequences come from ``kl_token_logps`` over ``batch.sub_batches[KL_SEQUENCES]`` when
        the batch has that sub-batch, else from the sequences ``n .. 2n-1`` of the batch itself.

        Raises:
            ValueError: the batch has extra targets (unpaired batches are never prefix-shared; an
                empty ``extra_targets`` is accepted).
        """
        for part in (batch, *batch.sub_batches.values()):
            if part.extra_targets is not None and part.extra_targets.index.numel():
                raise ValueError(
                    "kto: unpaired batches cannot be prefix-shared (the batch has extra targets); "
                    "use data.layout: padded or packed"
                )
        sums, counts = sequence_log_probs(token_logps, batch)
        n = batch.kl_start
        if not self.uses_kl:
            empty = sums.new_zeros(n)
            return sums[:n], counts[:n], empty, empty
        sub = batch.sub_batches.get(KL_SEQUENCES)
        if sub is not None:
            if kl_token_logps is None:
                raise ValueError(f"the batch's KL sub-batch {KL_SEQUENCES!r} was not forwarded")
            kl, kl_counts = sequence_log_probs(kl_token_logps, sub)
            return sums[:n], counts[:n], kl, kl_counts
        return sums[:n], counts[:n], sums[n : 2 * n], counts[n : 2 * n]

    @staticmethod
    def _kl_tokens(outputs: dict[str, Any] | None) -> torch.Tensor | None:
        kl = (outputs or {}).get(KL_SEQUENCES)
        return None if kl is None else kl["token_logps"].detach()

    def reference_log_probs(
        self,
        token_logps: torch.Tensor,
        batch: Batch,
        *,
        extra_logps: torch.Tensor | None = None,
        side: dict[str, Any] | None = None,
    ) -> dict[str, torch.Tensor]:
        """``{"completion_logps": [n], "kl_logps": [n]}`` fp32 reference sums (detached).

        ``side[KL_SEQUENCES]`` holds ``{"token_logps": ...}`` of that sub-batch when the batch has
        it. ``extra_logps`` is accepted for the common signature; a batch with extra targets is
        refused (see :meth:`_split`).
        """
        completion, _, kl, _ = self._split(token_logps.detach(), batch, self._kl_tokens(side))
        return {"completion_logps": completion, "kl_logps": kl}

    def _reference(
        self, reference: dict[str, torch.Tensor] | None, like: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.config.reference_free:
            return torch.zeros_like(like), torch.zeros_like(like)
        if reference is None:
            raise ValueError("kto needs reference log-probs (or objective.reference_free: true)")
        return (
            reference["completion_logps"].to(like.dtype),
            reference["kl_logps"].to(like.dtype),
        )

    def dp_means(
        self,
        policy: dict[str, torch.Tensor],
        reference: dict[str, torch.Tensor] | None,
        batch: Batch,
    ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """``{"kl": (sum, count)}`` of ``log pi(y'|x) - log pi_ref(y'|x)`` over the KL sequences."""
        if not self.uses_kl:
            return {}
        _, _, kl, kl_counts = self._split(
            policy["token_logps"].detach(), batch, self._kl_tokens(policy)
        )
        _, ref_kl = self._reference(reference, kl)
        valid = kl_counts > 0
        diff = zero_invalid(kl - ref_kl, valid)
        return {"kl": (diff.sum(), valid.sum().float())}

    def loss(
        self,
        policy: dict[str, torch.Tensor],
        reference: dict[str, torch.Tensor] | None,
        batch: Batch,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Mean weighted KTO loss over the micro-batch's examples.

        Args:
            policy: ``{"token_logps": [b, s] fp32, ...}``, plus ``{KL_SEQUENCES: {"token_logps":
                ...}}`` of that sub-batch when the batch has it.
            reference: ``{"completion_logps": [n], "kl_logps": [n]}`` from
                :meth:`reference_log_probs` (``None`` when ``reference_free``).
            batch: unpaired batch: ``loss_mask``, ``sequence_ids``, ``num_sequences``,
                ``labels [n]`` bool, ``kl_start`` (n); optionally ``dp_means["kl"]`` (0-d, the
                data-parallel mean set by :func:`megatron.objectives.registry.evaluate`).

        Returns:
            ``(loss 0-d fp32, metrics)``: ``kl`` (the clamped reference point), and as
            ``(sum, count)`` ratios (averaged over the examples of the whole step, as TRL):
            ``rewards/chosen``, ``rewards/rejected`` (``beta * r`` over desirable / undesirable
            examples), ``logps/chosen``, ``logps/rejected``; as ``(total,)``: ``count/chosen``,
            ``count/rejected`` (examples of each kind in the step). All detached.
        """
        cfg = self.config
        completion, counts, _, _ = self._split(
            policy["token_logps"], batch, self._kl_tokens(policy)
        )
        ref_completion, _ = self._reference(reference, completion)
        labels = batch.labels.to(device=completion.device, dtype=torch.bool)
        valid = counts > 0
        logratios = zero_invalid(completion - ref_completion, valid)
        if self.uses_kl:
            means = batch.dp_means
            if means is None:  # a single process: this micro-batch's own mean
                total, n_kl = self.dp_means(policy, reference, batch)["kl"]
                kl = total / n_kl.clamp(min=1.0)
            else:
                kl = means["kl"]
            kl = kl.detach().to(logratios.dtype).clamp(min=0)
            chosen_losses = 1 - torch.sigmoid(cfg.beta * (logratios - kl))
            rejected_losses = 1 - torch.sigmoid(cfg.beta * (kl - logratios))
        else:
            kl = torch.zeros((), dtype=logratios.dtype, device=logratios.device)
            chosen_losses = 1 - torch.sigmoid(cfg.beta * logratios)
            rejected_losses = torch.sigmoid(cfg.beta * logratios)
        losses = torch.where(
            labels,
            cfg.desirable_weight * chosen_losses,
            cfg.undesirable_weight * rejected_losses,
        )
        loss = masked_mean(losses, valid)
        chosen, rejected = valid & labels, valid & ~labels
        rewards = (cfg.beta * logratios).detach()
        logps = zero_invalid(completion.detach(), valid)
        n_chosen, n_rejected = chosen.sum().float(), rejected.sum().float()
        metrics = {
            "kl": kl.detach(),
            "rewards/chosen": (zero_invalid(rewards, chosen).sum(), n_chosen),
            "rewards/rejected": (zero_invalid(rewards, rejected).sum(), n_rejected),
            "logps/chosen": (zero_invalid(logps, chosen).sum(), n_chosen),
            "logps/rejected": (zero_invalid(logps, rejected).sum(), n_rejected),
            "count/chosen": (n_chosen,),
            "count/rejected": (n_rejected,),
        }
        return loss, metrics
