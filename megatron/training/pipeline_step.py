"""One optimizer step with pipeline parallelism (DeepSpeed's ``PipelineEngine.train_batch``).

Each micro-batch is split into the first stage's inputs (:meth:`Batch.pipeline_inputs`: tokens,
layout tensors, targets) and the last stage's labels (:meth:`Batch.pipeline_labels`: the per-example
fields, in the order :meth:`Batch.label_fields` gives), rebuilt there by :class:`PipelineLoss`, the
engine's ``loss_fn``, which evaluates the objective. The engine runs its 1F1B schedule over the
step's micro-batches, reduces gradients across data-parallel ranks and steps the optimizer. The
objective's metrics exist only on the last stage; they are broadcast along the pipeline so every
rank reports the same values.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from megatron.data.batch import Batch
from megatron.model.pipeline import stage_outputs
from megatron.objectives.registry import loss_with_dp_means
from megatron.parallel.state import ParallelState
from megatron.training.step import detach_metrics


class PipelineLoss:
    """DeepSpeed ``loss_fn``: evaluates the objective on the last stage.

    Args:
        objective: the registered objective.
        dp_group: reduces the objective's ``dp_means`` across data-parallel ranks.

    Each step calls :meth:`begin` with the label fields of its micro-batches and the reference
    provider (and split) to read, then the engine calls the object once per micro-batch; the
    step collects the per-micro-batch metrics with :meth:`end` (the pipeline engine itself only
    returns the loss).
    """

    def __init__(self, objective: Any, dp_group: dist.ProcessGroup | None) -> None:
        self.objective = objective
        self.dp_group = dp_group
        self._fields: tuple[str, ...] = ()
        self._reference: Any = None
        self._split = "train"
        self._metrics: list[dict[str, Any]] = []

    def begin(self, fields: tuple[str, ...], reference: Any, split: str) -> None:
        """Start a step whose labels carry ``fields``; reference values come from ``reference``
        (a :class:`~megatron.training.reference.ReferenceProvider` or ``None``) for ``split``."""
        self._fields, self._reference, self._split = fields, reference, split
        self._metrics = []

    def end(self) -> list[dict[str, Any]]:
        """The step's per-micro-batch metrics (empty off the last stage)."""
        metrics, self._metrics = self._metrics, []
        return metrics

    def __call__(self, outputs: Any, labels: tuple[torch.Tensor, ...]) -> torch.Tensor:
        batch = Batch.from_pipeline_labels(labels, self._fields)
        ref = self._reference(batch, self._split) if self._reference is not None else None
        policy = stage_outputs(outputs)
        loss, metrics = loss_with_dp_means(self.objective, policy, ref, batch, self.dp_group)
        self._metrics.append({"loss": loss.detach(), **detach_metrics(metrics)})
        return loss


def _messages(micro_batches: list[Batch]) -> tuple[tuple[str, ...], list[tuple[tuple, tuple]]]:
    fields = micro_batches[0].label_fields()
    return fields, [(mb.pipeline_inputs(), mb.pipeline_labels(fields)) for mb in micro_batches]


def _collect(
    loss_fn: PipelineLoss, micro_batches: list[Batch], state: ParallelState
) -> list[dict[str, torch.Tensor]]:
    metrics = loss_fn.end()
    values = [metrics] if metrics else [None]
    if state.pp_size > 1:
        dist.broadcast_object_list(values, src=state.pp_ranks[-1], group=state.pp_group)
    out = []
    for m, mb in zip(values[0], micro_batches, strict=True):
        stats = {k: torch.as_tensor(v, dtype=torch.float32) for k, v in mb.stats.items()}
        out.append({**detach_metrics(m), **stats})
    return out


def pipeline_train_step(
    engine: Any,
    loss_fn: PipelineLoss,
    micro_batches: list[Batch],
    state: ParallelState,
    reference: Any = None,
) -> list[dict[str, torch.Tensor]]:
    """Forward/backward every micro-batch through the pipeline and step the optimizer.

    Returns:
        Per-micro-batch metrics (with ``loss``), identical on every rank of the pipeline.
    """
    fields, data = _messages(micro_batches)
    loss_fn.begin(fields, reference, "train")
    engine.train_batch(iter(data))
    return _collect(loss_fn, micro_batches, state)


@torch.no_grad()
def pipeline_eval_step(
    engine: Any,
    loss_fn: PipelineLoss,
    micro_batches: list[Batch],
    state: ParallelState,
    reference: Any = None,
    split: str = "valid",
) -> list[dict[str, torch.Tensor]]:
    """Forward only through the pipeline (``eval_batch``)."""
    fields, data = _messages(micro_batches)
    loss_fn.begin(fields, reference, split)
    engine.eval_batch(iter(data), num_micro_batches=len(micro_batches))
    return _collect(loss_fn, micro_batches, state)
