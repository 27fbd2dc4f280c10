"""Tensor parallelism written here: grid state, region mappings, sharded layers, losses, RNG."""

from megatron.parallel.cross_entropy import (
    chunked_vocab_parallel_kl,
    chunked_vocab_parallel_log_probs,
    vocab_parallel_cross_entropy,
    vocab_parallel_log_probs,
)
from megatron.parallel.layers import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding
from megatron.parallel.mappings import (
    copy_to_tensor_parallel_region,
    gather_from_tensor_parallel_region,
    reduce_from_tensor_parallel_region,
    scatter_to_tensor_parallel_region,
)
from megatron.parallel.random import RNGStatesTracker, model_parallel_seed
from megatron.parallel.state import ParallelState

__all__ = [
    "ColumnParallelLinear",
    "ParallelState",
    "RNGStatesTracker",
    "RowParallelLinear",
    "VocabParallelEmbedding",
    "chunked_vocab_parallel_kl",
    "chunked_vocab_parallel_log_probs",
    "copy_to_tensor_parallel_region",
    "gather_from_tensor_parallel_region",
    "model_parallel_seed",
    "reduce_from_tensor_parallel_region",
    "scatter_to_tensor_parallel_region",
    "vocab_parallel_cross_entropy",
    "vocab_parallel_log_probs",
]
