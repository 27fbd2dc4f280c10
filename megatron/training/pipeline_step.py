"""One optimizer step with pipeline parallelism (DeepSpeed's ``PipelineEngine.train_batch``).

Micro-batches are split into the first stage's inputs ``(tokens, position_ids, segment_ids,
targets)`` and the last stage's labels (every other batch field, in a fixed key order, read back
by :class:`megatron.model.pipeline.PipelineLoss`). The engine runs its 1F1B schedule over the
step's micro-batches, reduces gradients across data-parallel ranks and steps the optimizer. The
objective's metrics exist only on the last stage; they are broadcast along the pipeline so every
rank reports the same values.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from megatron.model.pipeline import PipelineLoss, pack_segments
from megatron.parallel.state import ParallelState
from megatron.training.step import detach_metrics

_INPUT_KEYS = ("tokens", "position_ids", "segment_ids", "targets")


def label_keys(batch: dict[str, Any]) -> list[str]:
    """The batch fields that travel to the last stage as labels, in order."""
    return sorted(k for k in batch if k not in _INPUT_KEYS and k != "stats")


def to_pipeline(batch: dict[str, Any], keys: list[str]) -> tuple[tuple, tuple]:
    """``(inputs, labels)`` tuples of tensors for the pipeline engine."""
    tokens = batch["tokens"]
    pos = batch.get("position_ids")
    if pos is None:
        pos = torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens).contiguous()
    seg = pack_segments(batch.get("segment_ids"), tokens)
    labels = tuple(torch.as_tensor(batch[k]) for k in keys)
    return (tokens, pos, seg, batch["targets"]), labels


def _collect(
    loss_fn: PipelineLoss, micro_batches: list[dict[str, Any]], state: ParallelState
) -> list[dict[str, torch.Tensor]]:
    values = [loss_fn.metrics] if loss_fn.metrics else [None]
    if state.pp_size > 1:
        dist.broadcast_object_list(values, src=state.pp_ranks[-1], group=state.pp_group)
    out = []
    for metrics, mb in zip(values[0], micro_batches, strict=True):
        stats = {k: torch.as_tensor(v, dtype=torch.float32) for k, v in mb.get("stats", {}).items()}
        out.append({**detach_metrics(metrics), **stats})
    loss_fn.metrics = []
    return out


def pipeline_train_step(
    engine: Any,
    loss_fn: PipelineLoss,
    micro_batches: list[dict[str, Any]],
    state: ParallelState,
) -> list[dict[str, torch.Tensor]]:
    """Forward/backward every micro-batch through the pipeline and step the optimizer.

    Returns:
        Per-micro-batch metrics (with ``loss``), identical on every rank of the pipeline.
    """
    loss_fn.keys = label_keys(micro_batches[0])
    loss_fn.metrics = []
    engine.train_batch(iter([to_pipeline(mb, loss_fn.keys) for mb in micro_batches]))
    return _collect(loss_fn, micro_batches, state)


@torch.no_grad()
def pipeline_eval_step(
    engine: Any,
    loss_fn: PipelineLoss,
    micro_batches: list[dict[str, Any]],
    state: ParallelState,
) -> list[dict[str, torch.Tensor]]:
    """Forward only through the pipeline (``eval_batch``)."""
    loss_fn.keys = label_keys(micro_batches[0])
    loss_fn.metrics = []
    data = iter([to_pipeline(mb, loss_fn.keys) for mb in micro_batches])
    engine.eval_batch(data, num_micro_batches=len(micro_batches))
    return _collect(loss_fn, micro_batches, state)
