"""One decoder layer: norms, tensor-parallel self-attention and MLP, residual wiring.

Shapes: b batch, s sequence, h hidden, p TP size, n heads, nk kv heads, np = n/p, nkp = nk/p,
hn head dim (kv_channels), f ffn hidden, t filled key/value cache slots (incremental decoding,
:mod:`megatron.model.kv_cache`).

Covers the Llama family (RMSNorm, SwiGLU, GQA, rotary with scaling, optional qkv bias as in Qwen2)
and GPT-NeoX/Pythia (LayerNorm, GeLU, partial rotary, parallel residual, biases). The fused
``linear_qkv`` stores heads grouped per kv head, ``[q_1 .. q_{n/nk}, k, v]`` for each kv head
(Megatron-LM's layout), so a contiguous column split gives each TP rank whole groups.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from megatron.model.attention import SequenceLayout, sdpa, select_backend
from megatron.model.rotary import RotaryEmbedding
from megatron.parallel.layers import ColumnParallelLinear, RowParallelLinear, normal_init
from megatron.parallel.random import RNGStatesTracker
from megatron.parallel.state import ParallelState

if TYPE_CHECKING:
    from megatron.model.kv_cache import LayerKVCache


class RMSNorm(nn.Module):
    """``x / sqrt(mean(x^2) + eps) * w`` computed in fp32 (arXiv:1910.07467)."""

    def __init__(self, dim: int, eps: float, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def build_norm(cfg: Any, dtype: torch.dtype) -> nn.Module:
    """LayerNorm or RMSNorm over ``h`` per ``model.norm``."""
    if cfg.norm == "rmsnorm":
        return RMSNorm(cfg.hidden_size, cfg.norm_eps, dtype)
    return nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps, bias=cfg.norm_bias, dtype=dtype)


class SelfAttention(nn.Module):
    """Multi-head / grouped-query causal self-attention, heads split across TP ranks."""

    def __init__(
        self, cfg: Any, state: ParallelState, tracker: RNGStatesTracker, dtype: torch.dtype
    ):
        super().__init__()
        self.tracker = tracker
        self.hn, p = cfg.kv_channels, state.tp_size
        self.np, self.nkp = cfg.num_attention_heads // p, cfg.num_kv_heads // p
        self.q_per_kv = cfg.num_attention_heads // cfg.num_kv_heads
        std = cfg.init_method_std
        qkv_out = (cfg.num_attention_heads + 2 * cfg.num_kv_heads) * self.hn
        self.linear_qkv = ColumnParallelLinear(
            cfg.hidden_size,
            qkv_out,
            state=state,
            bias=cfg.qkv_bias,
            init_method=normal_init(std),
            dtype=dtype,
        )
        self.linear_proj = RowParallelLinear(
            cfg.num_attention_heads * self.hn,
            cfg.hidden_size,
            state=state,
            bias=cfg.proj_bias,
            init_method=normal_init(std / math.sqrt(2 * cfg.num_layers)),
            dtype=dtype,
        )
        rot_dim = int(self.hn * cfg.rotary_pct)
        self.rotary = RotaryEmbedding(
            rot_dim, cfg.rotary_base, cfg.rotary_interleaved, cfg.rope_scaling
        )
        self.dropout_p = cfg.attention_dropout
        self.window = cfg.sliding_window
        self.backend_name = cfg.attention_backend

    def forward(
        self, x: torch.Tensor, layout: SequenceLayout, kv_cache: LayerKVCache | None = None
    ) -> torch.Tensor:
        """``[b, s, h] -> [b, s, h]``.

        Args:
            x: ``[b, s, h]`` normed hidden states.
            layout: positions (``position_ids [b, s]``) and attention structure of ``x``.
            kv_cache: this layer's incremental-decoding cache
                (:class:`~megatron.model.kv_cache.LayerKVCache`): the new keys/values are stored
                in it and the queries attend over its filled slots under its mask
                (:mod:`megatron.model.kv_cache`); ``layout`` then only supplies the positions.
                Inference only: no attention dropout on this path.
        """
        b, s, _ = x.shape
        qkv = self.linear_qkv(x)  # [b, s, (np + 2 nkp) hn]
        qkv = qkv.view(b, s, self.nkp, self.q_per_kv + 2, self.hn)  # [b, s, nkp, q/kv + 2, hn]
        q = qkv[:, :, :, : self.q_per_kv].reshape(b, s, self.np, self.hn)  # [b, s, np, hn]
        k, v = qkv[:, :, :, self.q_per_kv], qkv[:, :, :, self.q_per_kv + 1]  # [b, s, nkp, hn]
        cos, sin = layout.memo(
            ("rotary", self.rotary.key, q.dtype),
            lambda: self.rotary.cos_sin(layout.position_ids, q.dtype),
        )
        q, k = self.rotary.rotate(q, cos, sin), self.rotary.rotate(k, cos, sin)
        if kv_cache is not None:
            k, v, mask = kv_cache.update(k, v, self.window)  # [b, t, nkp, hn], [b, 1, s, t]
            # the training path's SDPA call: on CPU the kernel broadcasts the kv heads itself
            ctx = sdpa(q, k, v, mask, 0.0)  # [b, s, np, hn]
            return self.linear_proj(ctx.reshape(b, s, self.np * self.hn))  # [b, s, h]
        attend = select_backend(self.backend_name, q.dtype, q.device, layout)
        p = self.dropout_p if self.training else 0.0
        # why: attention probabilities are sharded by head, so dropout uses the per-TP-rank stream.
        with self.tracker.fork():
            ctx = attend(q, k, v, layout, dropout_p=p, window=self.window)  # [b, s, np, hn]
        return self.linear_proj(ctx.reshape(b, s, self.np * self.hn))  # [b, s, h]


class MLP(nn.Module):
    """``fc2(act(fc1(x)))``; SwiGLU uses ``fc1 = [gate; up]`` and ``silu(gate) * up``."""

    def __init__(self, cfg: Any, state: ParallelState, dtype: torch.dtype) -> None:
        super().__init__()
        f, h, std = cfg.ffn_hidden_size, cfg.hidden_size, cfg.init_method_std
        self.activation = cfg.activation
        gated = self.activation == "swiglu"
        self.linear_fc1 = ColumnParallelLinear(
            h,
            2 * f if gated else f,
            state=state,
            bias=cfg.mlp_bias,
            init_method=normal_init(std),
            output_parts=[f, f] if gated else None,
            dtype=dtype,
        )
        self.linear_fc2 = RowParallelLinear(
            f,
            h,
            state=state,
            bias=cfg.mlp_bias,
            init_method=normal_init(std / math.sqrt(2 * cfg.num_layers)),
            dtype=dtype,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.linear_fc1(x)  # [b, s, f/p] (or [b, s, 2f/p] gated)
        if self.activation == "swiglu":
            gate, up = y.chunk(2, dim=-1)
            y = F.silu(gate) * up
        else:
            y = F.gelu(y, approximate="tanh" if self.activation == "gelu_tanh" else "none")
        return self.linear_fc2(y)  # [b, s, h]


class TransformerLayer(nn.Module):
    """Pre-norm decoder layer.

    Sequential residual: ``h = x + attn(ln1(x)); y = h + mlp(ln2(h))``.
    Parallel residual (GPT-J/NeoX): ``y = x + attn(ln1(x)) + mlp(ln2(x))``.
    """

    def __init__(
        self, cfg: Any, state: ParallelState, tracker: RNGStatesTracker, dtype: torch.dtype
    ):
        super().__init__()
        self.input_norm = build_norm(cfg, dtype)
        self.self_attention = SelfAttention(cfg, state, tracker, dtype)
        self.post_attention_norm = build_norm(cfg, dtype)
        self.mlp = MLP(cfg, state, dtype)
        self.parallel_residual = cfg.parallel_residual
        self.hidden_dropout = cfg.hidden_dropout

    def _drop(self, x: torch.Tensor) -> torch.Tensor:
        # Replicated activations: the default stream, identical on all TP ranks.
        return F.dropout(x, self.hidden_dropout, self.training) if self.hidden_dropout else x

    def forward(
        self, x: torch.Tensor, layout: SequenceLayout, kv_cache: LayerKVCache | None = None
    ) -> torch.Tensor:
        """``[b, s, h] -> [b, s, h]``; ``kv_cache``: see :meth:`SelfAttention.forward`."""
        attn = self._drop(self.self_attention(self.input_norm(x), layout, kv_cache))
        if self.parallel_residual:
            return x + attn + self._drop(self.mlp(self.post_attention_norm(x)))
        h = x + attn
        return h + self._drop(self.mlp(self.post_attention_norm(h)))
