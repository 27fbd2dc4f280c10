"""AdamW with decoupled weight decay (arXiv:1711.05101) and the learning-rate schedule.

Biases and norm weights (1-D parameters) get no weight decay, as in Megatron-LM and nanoGPT.

Schedule (step ``t`` counted from 1 at the first optimizer step, ``W`` warm-up steps, ``D`` decay
steps, ``lr`` peak, ``m`` min_lr):

* warm-up: ``lr * t / W`` for ``t <= W``;
* then ``constant``: ``lr``; ``linear``: ``m + (lr - m) * (1 - r)``; ``cosine``:
  ``m + (lr - m) * (1 + cos(pi r)) / 2``, with ``r = min((t - W) / (D - W), 1)``.

The rate is a pure function of the step, so resuming needs only the step counter.
"""

from __future__ import annotations

import math
from typing import Any

import torch


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Two AdamW groups: matrices with ``weight_decay``, 1-D params (biases, norms) without."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(model: torch.nn.Module, opt_cfg: Any) -> torch.optim.Optimizer:
    """torch ``AdamW`` from the ``optimizer`` config section (fused kernels are not required)."""
    return torch.optim.AdamW(
        param_groups(model, opt_cfg.weight_decay),
        lr=opt_cfg.lr,
        betas=tuple(opt_cfg.betas),
        eps=opt_cfg.eps,
    )


def warmup_steps(sched_cfg: Any, train_iters: int) -> int:
    """Warm-up length in steps from ``warmup_iters`` or ``warmup_fraction`` (default 0)."""
    if sched_cfg.warmup_iters is not None:
        return int(sched_cfg.warmup_iters)
    if sched_cfg.warmup_fraction is not None:
        return int(round(sched_cfg.warmup_fraction * train_iters))
    return 0


def learning_rate(step: int, peak: float, sched_cfg: Any, train_iters: int) -> float:
    """Learning rate for optimizer step ``step`` (1-based), see the module docstring."""
    w = warmup_steps(sched_cfg, train_iters)
    if w > 0 and step <= w:
        return peak * step / w
    if sched_cfg.style == "constant":
        return peak
    d = sched_cfg.decay_iters or train_iters
    r = min(max(step - w, 0) / max(d - w, 1), 1.0)
    m = sched_cfg.min_lr
    if sched_cfg.style == "linear":
        return m + (peak - m) * (1.0 - r)
    return m + (peak - m) * 0.5 * (1.0 + math.cos(math.pi * r))


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Write ``lr`` into every param group (the DeepSpeed wrapper shares them)."""
    for group in optimizer.param_groups:
        group["lr"] = lr
