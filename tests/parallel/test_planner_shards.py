"""The planner's TP arithmetic (``megatron/planner.py``) against the sharded model on gloo ranks:
each rank's parameter count, and the bytes its forward saves for backward (exact)."""

from __future__ import annotations

import torch

from megatron import planner
from megatron.config import ModelConfig
from megatron.model import GPTModel
from megatron.model.layout import SequenceLayout
from megatron.parallel import ParallelState

SHAPE = dict(num_layers=2, hidden_size=64, num_attention_heads=4, num_kv_heads=4, vocab_size=120,
             make_vocab_size_divisible_by=32, max_position_embeddings=64, ffn_hidden_size=96)  # fmt: skip
VARIANTS = [
    dict(norm="rmsnorm", activation="swiglu"),
    dict(norm="layernorm", activation="gelu", parallel_residual=True, rotary_pct=0.25,
         qkv_bias=True, proj_bias=True, mlp_bias=True),
]  # fmt: skip


def _shard_worker(rank, world):
    out = []
    for variant in VARIANTS:
        m = ModelConfig(**SHAPE, **variant)
        model = GPTModel(m, ParallelState.build(world), seed=0).train()
        params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        seen: dict[int, int] = {}

        def pack(t, params=params, seen=seen):
            ptr = t.untyped_storage().data_ptr()
            if ptr not in params:
                seen[ptr] = t.untyped_storage().nbytes()
            return t

        tokens = torch.randint(0, 120, (2, 16), generator=torch.Generator().manual_seed(0))
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(tokens, SequenceLayout.causal(2, 16), targets=tokens)
        out.append((sum(p.numel() for p in model.parameters()), sum(seen.values())))
    return out


def test_per_rank_parameters_and_activations(pool):
    tp = pool.world_size
    work = planner.Workload(seq_length=16, rows_per_sample=1, global_batch=2, precision="fp32",
                            reference_model=False)  # fmt: skip
    grid = planner.Grid(tp=tp, pp=1, dp=1, zero=0, micro_batch=2, checkpointing=False)
    for per_rank in pool.run(_shard_worker):
        for variant, (params, saved) in zip(VARIANTS, per_rank, strict=True):
            m = ModelConfig(**SHAPE, **variant)
            assert params == planner.stage_params(m, tp=tp)[0], variant
            assert saved == planner.activations(m, work, grid, accumulation=1), variant
