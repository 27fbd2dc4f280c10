"""Tensor-parallel layers (Megatron-LM, arXiv:1909.08053, section 3).

Weights are initialised *whole* from the caller's RNG and then sliced, so a model built at any
TP size holds the same numbers as the unsharded model (the grid-invariance test relies on it).
The transient full tensor costs one layer's weight in host memory; models at scale are normally
loaded from converted checkpoints instead.

Sharded parameters carry ``tensor_model_parallel = True`` (plus ``partition_dim``), which is what
DeepSpeed's TP-aware gradient-norm reads.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from megatron.parallel.mappings import (
    copy_to_tensor_parallel_region,
    gather_from_tensor_parallel_region,
    reduce_from_tensor_parallel_region,
    scatter_to_tensor_parallel_region,
)
from megatron.parallel.state import ParallelState

InitMethod = Callable[[torch.Tensor], torch.Tensor]
# Layers default to N(0, 0.02^2) (GPT-2 / Megatron-LM) when no init_method is given.


def normal_init(std: float) -> InitMethod:
    """``N(0, std^2)`` initialiser drawing from the default torch generator.

    A tensor on the meta device (a model built to receive loaded weights) is left as it is:
    there is nothing to draw, and torch runs ``normal_`` on meta tensors through its Python
    decompositions, whose first use imports torch._dynamo (~2-3 s of start-up per rank)."""
    return lambda t: t if t.is_meta else nn.init.normal_(t, mean=0.0, std=std)


def _mark(param: nn.Parameter, dim: int) -> None:
    param.tensor_model_parallel = True
    param.partition_dim = dim
    param.partition_stride = 1


def shard_rows(
    full: torch.Tensor, parts: Sequence[int], tp_size: int, tp_rank: int
) -> torch.Tensor:
    """This rank's rows of ``full`` when its rows are a concatenation of ``parts``.

    Each part is split evenly across the TP ranks and the rank's slices are concatenated in part
    order, e.g. SwiGLU's ``[gate; up]`` becomes ``[gate_r; up_r]`` on rank r.
    """
    out, start = [], 0
    for p in parts:
        if p % tp_size:
            raise ValueError(f"partition size {p} is not divisible by the TP size {tp_size}")
        k = p // tp_size
        out.append(full[start + tp_rank * k : start + (tp_rank + 1) * k])
        start += p
    if full.is_meta:  # nothing to copy; see normal_init for why no meta op runs here
        return full.new_empty((sum(o.shape[0] for o in out), *full.shape[1:]))
    return torch.cat(out, dim=0)


class ColumnParallelLinear(nn.Module):
    """Y = XA + b with A = [A_1 ... A_p] split by columns across the p TP ranks.

    Rank i computes Y_i = X A_i + b_i. The input enters through
    ``copy_to_tensor_parallel_region`` (gradients of X are summed across ranks). With
    ``gather_output`` the Y_i are all-gathered, otherwise each rank keeps its shard (the usual case:
    a row-parallel layer follows).

    Args:
        input_size: columns of X (``h``).
        output_size: total columns of Y over all ranks.
        state: the parallel grid.
        bias: add a (sharded) bias.
        gather_output: all-gather Y along its last dimension.
        init_method: initialiser applied to the *full* ``[output_size, input_size]`` weight.
        output_parts: sizes of concatenated blocks of the output (e.g. ``[ffn, ffn]`` for SwiGLU's
            gate and up); each block is sharded separately. Default: one block.
        dtype: parameter dtype.
    """

    def __init__(
        self,
        input_size: int,
        output_size: int,
        *,
        state: ParallelState,
        bias: bool = True,
        gather_output: bool = False,
        init_method: InitMethod | None = None,
        output_parts: Sequence[int] | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        self.group, self.gather_output = state.tp_group, gather_output
        self.parts = list(output_parts) if output_parts else [output_size]
        if sum(self.parts) != output_size:
            raise ValueError(f"output_parts {self.parts} do not sum to {output_size}")
        full = (init_method or normal_init(0.02))(
            torch.empty(output_size, input_size, dtype=torch.float32)
        )
        shard = shard_rows(full, self.parts, state.tp_size, state.tp_rank)
        self.weight = nn.Parameter(shard.to(dtype).contiguous())  # [out/p, h]
        _mark(self.weight, 0)
        self.bias = None
        if bias:
            self.bias = nn.Parameter(torch.zeros(shard.shape[0], dtype=dtype))
            _mark(self.bias, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[..., h] -> [..., out/p]`` (or ``[..., out]`` with ``gather_output``)."""
        x = copy_to_tensor_parallel_region(x, self.group)
        y = F.linear(x, self.weight, self.bias)
        return gather_from_tensor_parallel_region(y, self.group) if self.gather_output else y


class RowParallelLinear(nn.Module):
    """Y = XA + b with A = [A_1; ...; A_p] split by rows and X = [X_1 ... X_p] by columns.

    Rank i computes X_i A_i; the partial products are summed with
    ``reduce_from_tensor_parallel_region``; the (replicated) bias is added once, after the sum.

    Args:
        input_size: total rows of A over all ranks.
        output_size: columns of Y (``h``).
        state: the parallel grid.
        bias: add a replicated bias.
        input_is_parallel: X arrives already split (the output of a column-parallel layer);
            otherwise it is scattered here.
        init_method: initialiser applied to the *full* ``[output_size, input_size]`` weight.
        dtype: parameter dtype.
    """

    def __init__(
        self,
        input_size: int,
        output_size: int,
        *,
        state: ParallelState,
        bias: bool = True,
        input_is_parallel: bool = True,
        init_method: InitMethod | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        self.group, self.input_is_parallel = state.tp_group, input_is_parallel
        if input_size % state.tp_size:
            raise ValueError(f"input size {input_size} is not divisible by TP {state.tp_size}")
        full = (init_method or normal_init(0.02))(
            torch.empty(output_size, input_size, dtype=torch.float32)
        )
        k = input_size // state.tp_size
        shard = full[:, state.tp_rank * k : (state.tp_rank + 1) * k]
        self.weight = nn.Parameter(shard.to(dtype).contiguous())  # [h, in/p]
        _mark(self.weight, 1)
        self.bias = nn.Parameter(torch.zeros(output_size, dtype=dtype)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[..., in/p] -> [..., h]`` (input ``[..., in]`` when not ``input_is_parallel``)."""
        if not self.input_is_parallel:
            x = scatter_to_tensor_parallel_region(x, self.group)
        y = reduce_from_tensor_parallel_region(F.linear(x, self.weight), self.group)
        return y if self.bias is None else y + self.bias


class VocabParallelEmbedding(nn.Module):
    """Embedding E in R^{v x h} split by rows (vocabulary) across TP ranks.

    Rank i owns rows ``[i*v/p, (i+1)*v/p)``; it looks up the tokens in its range, writes zeros for
    the others, and the partial results are summed across ranks. ``v`` must be the padded
    vocabulary (a multiple of ``p``).

    Args:
        num_embeddings: padded vocabulary size ``v``.
        embedding_dim: ``h``.
        state: the parallel grid.
        init_method: initialiser applied to the full ``[v, h]`` table.
        dtype: parameter dtype.
    """

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        *,
        state: ParallelState,
        init_method: InitMethod | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        if num_embeddings % state.tp_size:
            raise ValueError(f"vocabulary {num_embeddings} is not divisible by TP {state.tp_size}")
        self.group = state.tp_group
        self.num_embeddings = num_embeddings
        per = num_embeddings // state.tp_size
        self.vocab_start, self.vocab_end = state.tp_rank * per, (state.tp_rank + 1) * per
        full = (init_method or normal_init(0.02))(
            torch.empty(num_embeddings, embedding_dim, dtype=torch.float32)
        )
        self.weight = nn.Parameter(full[self.vocab_start : self.vocab_end].to(dtype).contiguous())
        _mark(self.weight, 0)
        self.tp_size = state.tp_size

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """``[b, s]`` int64 -> ``[b, s, h]``."""
        if self.tp_size == 1:
            return F.embedding(tokens, self.weight)
        outside = (tokens < self.vocab_start) | (tokens >= self.vocab_end)
        local = (tokens - self.vocab_start).masked_fill(outside, 0)
        out = F.embedding(local, self.weight).masked_fill(outside.unsqueeze(-1), 0.0)
        return reduce_from_tensor_parallel_region(out, self.group)
