"""One optimizer step without pipeline parallelism: micro-batches through the DeepSpeed engine.

The step is objective-agnostic: the model gives per-token log-probs of the batch's targets and
the registered objective turns them (and, when it needs them, reference log-probs) into a loss.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from megatron.model.attention import SequenceLayout


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {
        k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()
    }


def _layout(batch: dict[str, Any]) -> SequenceLayout | None:
    if "position_ids" not in batch:
        return None
    return SequenceLayout(batch["position_ids"], batch.get("segment_ids"))


def micro_batch_loss(
    engine: Any, objective: Any, batch: dict[str, Any]
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Forward one micro-batch and evaluate the objective on it."""
    policy = engine(batch["tokens"], _layout(batch), batch["targets"])
    return objective.loss(policy, None, batch)


def average_metrics(
    values: list[dict[str, torch.Tensor]], group: dist.ProcessGroup | None
) -> dict[str, float]:
    """Mean of each metric over micro-batches, then over the data-parallel group."""
    keys = sorted(values[0])
    stacked = torch.stack(
        [torch.stack([v[k].detach().float().cpu() for k in keys]) for v in values]
    )
    mean = stacked.mean(dim=0)
    if dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(mean, group=group)
        mean /= dist.get_world_size(group)
    return dict(zip(keys, mean.tolist(), strict=True))


def _plain_grad_norm(engine: Any) -> float | None:
    """TP-aware global grad norm where DeepSpeed does not record one (fp32 without ZeRO)."""
    if engine.zero_optimization() or engine.fp16_enabled() or engine.bfloat16_enabled():
        return None
    mpu = engine.mpu
    first = mpu.get_model_parallel_rank() == 0
    # Replicated parameters are counted once (on TP rank 0); shards on every rank.
    sq = sum(
        (
            p.grad.detach().float().norm() ** 2
            for p in engine.module.parameters()
            if p.grad is not None and (first or getattr(p, "tensor_model_parallel", False))
        ),
        torch.zeros(()),
    )
    if dist.is_initialized() and mpu.get_model_parallel_world_size() > 1:
        dist.all_reduce(sq, group=mpu.get_model_parallel_group())
    return float(sq.sqrt())


def train_step(
    engine: Any, objective: Any, micro_batches: list[dict[str, Any]], device: torch.device
) -> tuple[list[dict[str, torch.Tensor]], float | None]:
    """Forward/backward every micro-batch; the engine steps the optimizer at the boundary.

    Returns:
        Per-micro-batch metrics (with ``loss``), detached, and the pre-clipping gradient norm.
    """
    engine.train()
    out, grad_norm = [], None
    for i, mb in enumerate(micro_batches):
        loss, metrics = micro_batch_loss(engine, objective, to_device(mb, device))
        engine.backward(loss)
        if i == len(micro_batches) - 1:
            grad_norm = _plain_grad_norm(engine)
        engine.step()
        out.append({"loss": loss.detach(), **metrics})
    if grad_norm is None and engine.get_global_grad_norm() is not None:
        grad_norm = float(engine.get_global_grad_norm())
    return out, grad_norm


@torch.no_grad()
def eval_step(
    engine: Any, objective: Any, micro_batches: list[dict[str, Any]], device: torch.device
) -> list[dict[str, torch.Tensor]]:
    """Forward only, in eval mode."""
    engine.eval()
    out = []
    for mb in micro_batches:
        loss, metrics = micro_batch_loss(engine, objective, to_device(mb, device))
        out.append({"loss": loss.detach(), **metrics})
    return out
