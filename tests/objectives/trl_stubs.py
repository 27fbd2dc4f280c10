"""Run TRL 1.16's own loss code on chosen per-token log-probs, without building a trainer.

TRL has no free-standing loss functions, so the trainers' methods are called unbound on an object
made with ``object.__new__`` (no ``__init__``: no model loading, no datasets) that carries only
the attributes those methods read. The model is a stub returning prepared outputs:

- DPO: ``DPOTrainer._compute_loss`` with ``precompute_ref_logps=True`` (reference sums come from
  the inputs); the stub's ``log_probs`` are the per-token log-probs, 0 off the completion (as the
  fused LM head returns for label -100).
- CPO / ORPO: ``get_batch_loss_metrics`` with a stub returning fixed logits; the caller derives its
  own per-token log-probs from the same logits.
- KTO: ``KTOTrainer._compute_loss`` with ``precompute_ref_logps=True`` (``ref_logps`` and
  ``ref_KL_logps`` in the inputs); ``_compute_kl_logps`` is replaced on the object by one returning
  the policy's KL-sequence sums (TRL runs it under ``no_grad``: the sums are given, not derived).
- Reward: ``RewardTrainer.compute_loss`` with a stub model returning ``logits [2P, 1]``.
"""

from __future__ import annotations

import types
from collections import defaultdict
from typing import Any

import torch


class _Accelerator:
    device = torch.device("cpu")

    def gather_for_metrics(self, x: Any) -> Any:
        return x

    def gather(self, x: Any) -> Any:
        return x


def _padded(seqs: list[list[float]]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(values [n, L-1], completion_mask [n, L])``: one masked prompt token, then the sequence."""
    width = max(len(s) for s in seqs) + 1
    values = torch.zeros(len(seqs), width)
    mask = torch.zeros(len(seqs), width + 1)
    for i, seq in enumerate(seqs):
        values[i, : len(seq)] = torch.tensor(seq, dtype=torch.float32)
        mask[i, 1 : len(seq) + 1] = 1.0
    return values, mask


def trl_dpo(
    chosen: list[list[float]],
    rejected: list[list[float]],
    ref_chosen: list[float],
    ref_rejected: list[float],
    *,
    beta: float,
    loss_type: list[str],
    loss_weights: list[float] | None = None,
    label_smoothing: float = 0.0,
    f_divergence_type: str = "reverse_kl",
    f_alpha_divergence_coef: float = 0.5,
    use_weighting: bool = False,
    ld_alpha: float | None = None,
    discopop_tau: float = 0.05,
    log_sum_sq_probs: list[list[float]] | None = None,
) -> tuple[float, dict[str, float]]:
    """TRL 1.16 ``DPOTrainer._compute_loss`` on these per-token log-probs: ``(loss, metrics)``."""
    from trl.trainer.dpo_trainer import DPOTrainer

    trainer = object.__new__(DPOTrainer)
    attrs = {
        "accelerator": _Accelerator(),
        "model": types.SimpleNamespace(training=True),
        "aux_loss_enabled": False,
        "ld_alpha": ld_alpha,
        "precompute_ref_logps": True,
        "f_divergence_type": f_divergence_type,
        "f_alpha_divergence_coef": f_alpha_divergence_coef,
        "loss_types": list(loss_type),
        "loss_weights": loss_weights or [1.0] * len(loss_type),
        "beta": beta,
        "label_smoothing": label_smoothing,
        "use_weighting": use_weighting,
        "args": types.SimpleNamespace(discopop_tau=discopop_tau),
        "_metrics": {"train": defaultdict(list), "eval": defaultdict(list)},
        "_total_train_tokens": 0,
        "_tp_size": 1,
    }
    for key, value in attrs.items():
        setattr(trainer, key, value)
    log_probs, completion_mask = _padded(chosen + rejected)
    zeros = torch.zeros_like(log_probs)
    outputs = types.SimpleNamespace(
        log_probs=log_probs,
        entropy=zeros,
        mean_logits=zeros,
        is_top1=zeros.bool(),
        log_sum_sq_probs=_padded(log_sum_sq_probs)[0] if log_sum_sq_probs else None,
    )
    n, width = completion_mask.shape
    inputs = {
        "input_ids": torch.zeros(n, width, dtype=torch.long),
        "attention_mask": torch.ones(n, width, dtype=torch.long),
        "completion_mask": completion_mask,
        "ref_chosen_logps": torch.tensor(ref_chosen),
        "ref_rejected_logps": torch.tensor(ref_rejected),
    }
    loss = DPOTrainer._compute_loss(trainer, lambda **kw: outputs, inputs, False)
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    return float(loss), metrics


def pair_logits(
    prompt_len: int, chosen_lens: list[int], rejected_lens: list[int], vocab: int, seed: int
) -> dict[str, torch.Tensor]:
    """A padded CPO/ORPO batch (``chosen_*``/``rejected_*`` ids, masks, labels) plus ``logits``.

    Every sequence is ``prompt_len`` prompt tokens then its completion; labels are -100 on the
    prompt and the padding. ``logits`` ``[2P, L, vocab]`` are what the stub model returns.
    """
    g = torch.Generator().manual_seed(seed)
    lens = chosen_lens + rejected_lens
    width = prompt_len + max(lens)
    out: dict[str, torch.Tensor] = {}
    for side, side_lens in (("chosen", chosen_lens), ("rejected", rejected_lens)):
        ids = torch.randint(1, vocab, (len(side_lens), width), generator=g)
        attn = torch.zeros(len(side_lens), width, dtype=torch.long)
        for i, n in enumerate(side_lens):
            attn[i, : prompt_len + n] = 1
        labels = ids.masked_fill(attn == 0, -100)
        labels[:, :prompt_len] = -100
        out |= {f"{side}_input_ids": ids, f"{side}_attention_mask": attn, f"{side}_labels": labels}
    out["logits"] = torch.randn(len(lens), width, vocab, generator=g) * 2
    return out


def token_logps_from_logits(data: dict[str, torch.Tensor]) -> list[list[float]]:
    """Per-sequence target log-probs (chosen then rejected) of ``data["logits"]``."""
    labels = torch.cat([data["chosen_labels"], data["rejected_labels"]])[:, 1:]
    logps = torch.log_softmax(data["logits"][:, :-1], -1)  # fp32, as TRL
    per_token = logps.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return [row[lab != -100].tolist() for row, lab in zip(per_token, labels, strict=True)]


def trl_pairwise(
    trainer_cls: type, data: dict[str, torch.Tensor], **attrs: Any
) -> tuple[float, dict]:
    """``trainer_cls.get_batch_loss_metrics`` (CPO or ORPO) with a stub model returning logits."""
    trainer = object.__new__(trainer_cls)
    base = {
        "accelerator": _Accelerator(),
        "is_encoder_decoder": False,
        "pad_token_id": 0,
        "padding_value": 0,
        "aux_loss_enabled": False,
    }
    for key, value in (base | attrs).items():
        setattr(trainer, key, value)
    batch = {k: v for k, v in data.items() if k != "logits"}

    def model(input_ids: torch.Tensor, **kwargs: Any) -> types.SimpleNamespace:
        return types.SimpleNamespace(logits=data["logits"])

    loss, metrics = trainer_cls.get_batch_loss_metrics(trainer, model, batch)
    return float(loss), {k: float(v) for k, v in metrics.items()}


def _metrics_of(trainer: Any) -> dict[str, float]:
    return {k: float(v[-1]) for k, v in trainer._metrics["train"].items()}


def trl_kto(
    completions: list[list[float]],
    labels: list[bool],
    ref_logps: list[float],
    kl_logps: list[float] | None,
    ref_kl_logps: list[float] | None,
    *,
    beta: float,
    loss_type: str,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> tuple[float, dict[str, float]]:
    """TRL 1.16 ``KTOTrainer._compute_loss`` on these per-token log-probs: ``(loss, metrics)``.

    ``kl_logps`` / ``ref_kl_logps``: per-example sums over the KL (mismatched) sequences, or None
    for ``apo_zero_unpaired`` (TRL's ``calculate_KL`` is False there).
    """
    from trl.trainer.kto_trainer import KTOTrainer

    calculate_kl = kl_logps is not None
    trainer = object.__new__(KTOTrainer)
    attrs = {
        "accelerator": _Accelerator(),
        "model": types.SimpleNamespace(training=True),
        "aux_loss_enabled": False,
        "precompute_ref_logps": True,
        "calculate_KL": calculate_kl,
        "loss_type": loss_type,
        "beta": beta,
        "desirable_weight": desirable_weight,
        "undesirable_weight": undesirable_weight,
        "_metrics": {"train": defaultdict(list), "eval": defaultdict(list)},
        "_total_train_tokens": 0,
        "_tp_size": 1,
        # the KL forward, stubbed: the policy's KL-sequence sums
        "_compute_kl_logps": lambda model, batch: torch.tensor(kl_logps) if calculate_kl else None,
    }
    for key, value in attrs.items():
        setattr(trainer, key, value)
    log_probs, completion_mask = _padded(completions)
    zeros = torch.zeros_like(log_probs)
    outputs = types.SimpleNamespace(log_probs=log_probs, entropy=zeros, mean_logits=zeros)
    n, width = completion_mask.shape
    inputs = {
        "input_ids": torch.zeros(n, width, dtype=torch.long),
        "attention_mask": torch.ones(n, width, dtype=torch.long),
        "completion_mask": completion_mask,
        "label": torch.tensor(labels, dtype=torch.bool),
        "ref_logps": torch.tensor(ref_logps),
    }
    if calculate_kl:
        inputs["ref_KL_logps"] = torch.tensor(ref_kl_logps)
    loss = KTOTrainer._compute_loss(trainer, lambda **kw: outputs, inputs, False)
    return float(loss), _metrics_of(trainer)


def trl_reward(
    chosen: list[float],
    rejected: list[float],
    *,
    margin: list[float] | None = None,
    center_rewards_coefficient: float | None = None,
) -> tuple[float, dict[str, float]]:
    """TRL 1.16 ``RewardTrainer.compute_loss`` on these rewards (the stub model's logits)."""
    from trl.trainer.reward_trainer import RewardTrainer

    trainer = object.__new__(RewardTrainer)
    attrs = {
        "accelerator": _Accelerator(),
        "model": types.SimpleNamespace(training=True),
        "args": types.SimpleNamespace(center_rewards_coefficient=center_rewards_coefficient),
        "_metrics": {"train": defaultdict(list), "eval": defaultdict(list)},
        "_total_train_tokens": 0,
        "_tp_size": 1,
    }
    for key, value in attrs.items():
        setattr(trainer, key, value)
    logits = torch.tensor(chosen + rejected).unsqueeze(-1)  # [2P, 1]
    inputs: dict[str, Any] = {"attention_mask": torch.ones(logits.shape[0], 4, dtype=torch.long)}
    if margin is not None:
        inputs["margin"] = torch.tensor(margin)
    loss = RewardTrainer.compute_loss(
        trainer, lambda **kw: types.SimpleNamespace(logits=logits), inputs
    )
    return float(loss), _metrics_of(trainer)
