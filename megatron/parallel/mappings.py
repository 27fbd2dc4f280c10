"""Autograd-aware communication at tensor-parallel region boundaries (Megatron-LM's mappings).

| function                               | forward                  | backward                 |
|----------------------------------------|--------------------------|--------------------------|
| copy_to_tensor_parallel_region         | identity                 | all-reduce               |
| reduce_from_tensor_parallel_region     | all-reduce               | identity                 |
| scatter_to_tensor_parallel_region      | keep own last-dim split  | all-gather last dim      |
| gather_from_tensor_parallel_region     | all-gather last dim      | keep own last-dim split  |

Every function is the identity when ``group`` is ``None`` or has one rank, so the same model code
runs serially.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def _size(group: dist.ProcessGroup | None) -> int:
    return 1 if group is None else dist.get_world_size(group)


def _all_reduce(x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    if _size(group) == 1:
        return x
    x = x.contiguous()
    dist.all_reduce(x, group=group)
    return x


def _split_last(x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    n = _size(group)
    if n == 1:
        return x
    if x.shape[-1] % n:
        raise ValueError(f"last dimension {x.shape[-1]} is not divisible by the TP size {n}")
    return x.chunk(n, dim=-1)[dist.get_rank(group)].contiguous()


def _gather_last(x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    n = _size(group)
    if n == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(n)]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=-1)


class _Copy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, g):
        return _all_reduce(g.clone(), ctx.group), None


class _Reduce(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        return _all_reduce(x.clone(), group)

    @staticmethod
    def backward(ctx, g):
        return g, None


class _Scatter(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _split_last(x, group)

    @staticmethod
    def backward(ctx, g):
        return _gather_last(g, ctx.group), None


class _Gather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _gather_last(x, group)

    @staticmethod
    def backward(ctx, g):
        return _split_last(g, ctx.group), None


def copy_to_tensor_parallel_region(
    x: torch.Tensor, group: dist.ProcessGroup | None
) -> torch.Tensor:
    """Enter a TP region with a replicated input: identity forward, all-reduce of grads backward."""
    return x if _size(group) == 1 else _Copy.apply(x, group)


def reduce_from_tensor_parallel_region(
    x: torch.Tensor, group: dist.ProcessGroup | None
) -> torch.Tensor:
    """Leave a TP region by summing partial results: all-reduce forward, identity backward."""
    return x if _size(group) == 1 else _Reduce.apply(x, group)


def scatter_to_tensor_parallel_region(
    x: torch.Tensor, group: dist.ProcessGroup | None
) -> torch.Tensor:
    """Keep this rank's slice of the last dimension; backward all-gathers the gradient."""
    return x if _size(group) == 1 else _Scatter.apply(x, group)


def gather_from_tensor_parallel_region(
    x: torch.Tensor, group: dist.ProcessGroup | None
) -> torch.Tensor:
    """All-gather the last dimension across TP ranks; backward keeps this rank's slice."""
    return x if _size(group) == 1 else _Gather.apply(x, group)


def all_reduce_no_grad(
    x: torch.Tensor, group: dist.ProcessGroup | None, op: dist.ReduceOp = dist.ReduceOp.SUM
) -> torch.Tensor:
    """In-place all-reduce outside autograd (statistics, max for log-sum-exp)."""
    if _size(group) > 1:
        dist.all_reduce(x, op=op, group=group)
    return x
