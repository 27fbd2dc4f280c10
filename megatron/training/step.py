"""One optimizer step without pipeline parallelism: micro-batches through the DeepSpeed engine.

The step is objective-agnostic: the model gives per-token log-probs of the batch's targets and
the registered objective turns them (and, when it needs them, reference log-probs) into a loss.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from megatron.data.batch import Batch
from megatron.objectives.registry import Max, Min, loss_with_dp_means


def forward_outputs(
    model: Any, batch: Batch, kl_reference: tuple[torch.Tensor, torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """The model's per-token outputs for ``batch`` (its targets and extra targets, if any);
    ``kl_reference``: a reference's hidden states and output rows (the ``kl`` output)."""
    extra = batch.extra_targets
    kwargs = {} if kl_reference is None else {"kl_reference": kl_reference}
    if extra is None:
        return model(batch.tokens, batch.layout, batch.targets, **kwargs)
    return model(batch.tokens, batch.layout, batch.targets, extra.index, extra.targets, **kwargs)


def side_outputs(model: Any, objective: Any, batch: Batch) -> dict[str, Any]:
    """``{name: model outputs}`` of the batch's side sub-batches, forwarded without gradient."""
    out = {}
    for name in objective.side_batches:
        sub = batch.sub_batches.get(name)
        if sub is not None:
            with torch.no_grad():
                out[name] = forward_outputs(model, sub)
    return out


def micro_batch_loss(
    engine: Any,
    objective: Any,
    batch: Batch,
    reference: Any = None,
    dp_group: dist.ProcessGroup | None = None,
    split: str = "train",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Forward one micro-batch and evaluate the objective on it.

    The collator's ``batch.stats`` (scalar floats, e.g. ``packing_efficiency``) are reported
    with the objective's metrics. ``reference`` is a
    :class:`megatron.training.reference.ReferenceProvider` (or ``None``), asked for the rows of
    ``split``; ``dp_group`` reduces the objective's data-parallel means
    (:func:`megatron.objectives.registry.loss_with_dp_means`).
    """
    ref = reference(batch, split) if reference is not None else None
    side = side_outputs(engine, objective, batch)  # e.g. KTO's KL sequences, no gradient
    kl_reference = None
    if getattr(objective, "needs_reference_hidden", False):  # the exact KL to the reference
        kl_reference = reference.kl_inputs(batch)
    policy = {**forward_outputs(engine, batch, kl_reference), **side}
    loss, metrics = loss_with_dp_means(objective, policy, ref, batch, dp_group)
    for key, value in batch.stats.items():
        metrics[key] = torch.as_tensor(value, dtype=torch.float32)
    return loss, metrics


def detach_metrics(metrics: dict[str, Any]) -> dict[str, Any]:
    """Metrics detached and on the CPU (a ``(sum, count)`` pair stays a pair, a
    :class:`~megatron.objectives.registry.Max` / ``Min`` stays one)."""
    out: dict[str, Any] = {}
    for k, v in metrics.items():
        if isinstance(v, Max | Min):
            out[k] = type(v)(torch.as_tensor(v.value).detach().float().cpu())
        elif isinstance(v, tuple):
            out[k] = tuple(torch.as_tensor(x).detach().float().cpu() for x in v)
        else:
            out[k] = torch.as_tensor(v).detach().float().cpu()
    return out


def average_metrics(
    values: list[dict[str, Any]], group: dist.ProcessGroup | None
) -> dict[str, float]:
    """Each metric over micro-batches, then over the data-parallel group.

    A 0-d value is averaged with equal weight per micro-batch; a ``(sum, count)`` pair is summed
    everywhere and divided at the end (omitted when the count is 0 on every rank); a ``(total,)``
    1-tuple is summed everywhere (a count over the whole step); a ``Max`` / ``Min`` takes the
    extreme (omitted where a micro-batch does not give it).
    """
    values = [detach_metrics(v) for v in values]
    extremes = _extremes(values, group)
    values = [{k: x for k, x in v.items() if not isinstance(x, Max | Min)} for v in values]
    plain = sorted(k for k in values[0] if not isinstance(values[0][k], tuple))
    summed = sorted(k for k in values[0] if isinstance(values[0][k], tuple))
    mean = torch.stack([torch.stack([v[k] for k in plain]) for v in values]).mean(dim=0)
    totals = torch.zeros(len(summed), 2)
    for v in values:
        for i, k in enumerate(summed):
            totals[i, : len(v[k])] += torch.stack(v[k])
    if dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(mean, group=group)
        mean /= dist.get_world_size(group)
        if summed:
            dist.all_reduce(totals, group=group)
    out = dict(zip(plain, mean.tolist(), strict=True))
    for i, k in enumerate(summed):
        if len(values[0][k]) == 1:
            out[k] = float(totals[i, 0])
        elif totals[i, 1] > 0:
            out[k] = float(totals[i, 0] / totals[i, 1])
    out.update(extremes)
    return out


def _extremes(values: list[dict[str, Any]], group: dist.ProcessGroup | None) -> dict[str, float]:
    """The ``Max`` / ``Min`` metrics of :func:`average_metrics`: every rank must list the same
    keys (they come from one objective), a micro-batch without the key is skipped."""
    keys = sorted({k for v in values for k, x in v.items() if isinstance(x, Max | Min)})
    if not keys:
        return {}
    # a max of -x is a min of x: one all-reduce for both
    sign = {k: next(1.0 if isinstance(v[k], Max) else -1.0 for v in values if k in v) for k in keys}
    best = torch.full((len(keys),), -torch.inf)
    for v in values:
        for i, k in enumerate(keys):
            if k in v:
                best[i] = torch.maximum(best[i], sign[k] * v[k].value)
    if dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(best, op=dist.ReduceOp.MAX, group=group)
    return {k: sign[k] * float(best[i]) for i, k in enumerate(keys) if torch.isfinite(best[i])}


class GradNormMeter:
    """Global gradient norm and clipping where DeepSpeed records no norm (fp32 without ZeRO).

    DeepSpeed clips in that mode but discards the norm, so the derived DeepSpeed config turns its
    clipping off there and this step pre-hook on the torch optimizer does both: it sees the final
    (accumulated, data-parallel-reduced) gradients just before the update, computes the norm —
    parameters replicated across TP ranks counted on TP rank 0 only, a tied embedding only on its
    first stage, squares summed over the model-parallel (TP x PP) group — and scales the gradients
    by ``max_norm / (norm + 1e-6)`` when that is below 1 (DeepSpeed's and Megatron's rule).
    """

    def __init__(
        self,
        module: torch.nn.Module,
        group: dist.ProcessGroup | None,
        tp_rank: int,
        max_norm: float,
    ):
        self.all_params = [p for p in module.parameters() if p.requires_grad]
        self.params = [
            p
            for p in module.parameters()
            if (tp_rank == 0 or getattr(p, "tensor_model_parallel", False))
            and not getattr(p, "tied_duplicate", False)
        ]
        self.group, self.max_norm = group, max_norm
        self.value: float | None = None

    def __call__(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        # on the parameters' device: NCCL reduces CUDA tensors only, and one host sync (the
        # float() below) instead of one per parameter
        device = self.all_params[0].device if self.all_params else torch.device("cpu")
        sq = torch.zeros((), dtype=torch.float32, device=device)
        for p in self.params:
            if p.grad is not None:
                sq += p.grad.detach().float().norm().square()
        if dist.is_initialized() and self.group is not None and dist.get_world_size(self.group) > 1:
            dist.all_reduce(sq, group=self.group)
        self.value = float(sq.sqrt())
        coef = self.max_norm / (self.value + 1e-6)
        if self.max_norm > 0 and coef < 1.0:
            for p in self.all_params:
                if p.grad is not None:
                    p.grad.detach().mul_(coef)


def grad_norm_meter(
    engine: Any, optimizer: Any, module: torch.nn.Module, state: Any, max_norm: float
) -> GradNormMeter | None:
    """A :class:`GradNormMeter` hooked on ``optimizer`` when DeepSpeed computes no norm."""
    if engine.zero_optimization() or engine.fp16_enabled() or engine.bfloat16_enabled():
        return None
    meter = GradNormMeter(module, state.mp_group, state.tp_rank, max_norm)
    optimizer.register_step_pre_hook(meter)
    return meter


def train_step(
    engine: Any,
    objective: Any,
    micro_batches: list[Batch],
    device: torch.device,
    reference: Any = None,
    dp_group: dist.ProcessGroup | None = None,
) -> list[dict[str, torch.Tensor]]:
    """Forward/backward every micro-batch; the engine steps the optimizer at the boundary.

    Returns:
        Per-micro-batch metrics (with ``loss``), detached.
    """
    engine.train()
    out = []
    for mb in micro_batches:
        loss, metrics = micro_batch_loss(engine, objective, mb.to(device), reference, dp_group)
        engine.backward(loss)
        engine.step()
        out.append({"loss": loss.detach(), **detach_metrics(metrics)})
    return out


@torch.no_grad()
def eval_step(
    engine: Any,
    objective: Any,
    micro_batches: list[Batch],
    device: torch.device,
    reference: Any = None,
    dp_group: dist.ProcessGroup | None = None,
    split: str = "valid",
) -> list[dict[str, torch.Tensor]]:
    """Forward only, in eval mode (reference values of ``split``)."""
    engine.eval()
    out = []
    for mb in micro_batches:
        loss, metrics = micro_batch_loss(
            engine, objective, mb.to(device), reference, dp_group, split
        )
        out.append({"loss": loss.detach(), **detach_metrics(metrics)})
    return out
