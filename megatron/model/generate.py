"""Greedy decoding for :class:`~megatron.model.gpt.GPTModel`, with a key/value cache.

Shapes: b batch (1 here), s new tokens in this call, t cached + new tokens, h hidden, np query
heads on this TP rank, nkp kv heads on this rank, hn head dim, v vocabulary.

The cache path re-uses the model's own layer modules (norms, ``linear_qkv``, rotary,
``linear_proj``, MLP) and only re-implements the attention wiring of
:class:`~megatron.model.transformer.SelfAttention` for incremental inputs, so the model and its
training numerics are untouched. A prompt is run through once (prefill, causal attention over the
prompt); each later token attends to the cached keys/values of every earlier position. Sliding
window attention keeps only the last ``sliding_window - 1`` positions in the cache. Decoding runs
in eval mode (no dropout) under ``torch.no_grad``. The TP layers do their own collectives, so TP > 1
should work, but only TP = 1 is tested; pipeline-parallel models are not supported.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from megatron.model.attention import SequenceLayout, sdpa_attention
from megatron.model.gpt import GPTModel
from megatron.model.transformer import SelfAttention, TransformerLayer


@dataclass
class KVCache:
    """Keys and values of the positions decoded so far.

    Attributes:
        layers: per layer ``(k, v)``, each ``[b, t, nkp, hn]`` (rotary already applied to ``k``;
            only the last ``sliding_window - 1`` positions when the model has a window).
        position: number of positions seen (the next token's rotary position).
    """

    layers: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    position: int = 0


def _attention_step(
    attn: SelfAttention,
    x: torch.Tensor,
    positions: torch.Tensor,
    past: tuple[torch.Tensor, torch.Tensor] | None,
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """Self-attention of ``x [b, s, h]`` at ``positions [b, s]`` over the cache + itself."""
    b, s, _ = x.shape
    qkv = attn.linear_qkv(x)  # [b, s, (np + 2 nkp) hn]
    qkv = qkv.view(b, s, attn.nkp, attn.q_per_kv + 2, attn.hn)  # [b, s, nkp, q/kv + 2, hn]
    q = qkv[:, :, :, : attn.q_per_kv].reshape(b, s, attn.np, attn.hn)  # [b, s, np, hn]
    k, v = qkv[:, :, :, attn.q_per_kv], qkv[:, :, :, attn.q_per_kv + 1]  # [b, s, nkp, hn]
    cos, sin = attn.rotary.cos_sin(positions, q.dtype)
    q, k = attn.rotary.rotate(q, cos, sin), attn.rotary.rotate(k, cos, sin)
    if past is None:
        # Prefill: the same causal (optionally windowed) attention as the training forward.
        layout = SequenceLayout(position_ids=positions)
        ctx = sdpa_attention(q, k, v, layout, window=attn.window)  # [b, s, np, hn]
    else:
        if s != 1:
            raise ValueError(f"incremental steps take one token at a time, got {s}")
        k = torch.cat([past[0], k], dim=1)  # [b, t, nkp, hn]
        v = torch.cat([past[1], v], dim=1)
        groups = attn.np // attn.nkp
        qh = q.transpose(1, 2)  # [b, s, np, hn] -> [b, np, 1, hn]
        kh = k.transpose(1, 2).repeat_interleave(groups, dim=1)  # [b, np, t, hn]
        vh = v.transpose(1, 2).repeat_interleave(groups, dim=1)
        # The newest token may attend to every cached position: no mask needed.
        ctx = F.scaled_dot_product_attention(qh, kh, vh).transpose(1, 2)  # [b, 1, np, hn]
    if attn.window is not None:
        # the next token sees itself and the window - 1 positions before it
        keep = max(k.shape[1] - (attn.window - 1), 0)
        k, v = k[:, keep:], v[:, keep:]
    out = attn.linear_proj(ctx.reshape(b, s, attn.np * attn.hn))  # [b, s, h]
    return out, (k, v)


def _layer_step(
    layer: TransformerLayer,
    x: torch.Tensor,
    positions: torch.Tensor,
    past: tuple[torch.Tensor, torch.Tensor] | None,
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """:meth:`TransformerLayer.forward` (eval mode) with the cached attention."""
    attn, kv = _attention_step(layer.self_attention, layer.input_norm(x), positions, past)
    if layer.parallel_residual:
        return x + attn + layer.mlp(layer.post_attention_norm(x)), kv
    h = x + attn
    return h + layer.mlp(layer.post_attention_norm(h)), kv


@torch.no_grad()
def forward_with_cache(
    model: GPTModel, tokens: torch.Tensor, cache: KVCache | None
) -> tuple[torch.Tensor, KVCache]:
    """Logits of the last position and the updated cache.

    Args:
        model: the model (put in eval mode by the caller).
        tokens: ``[b, s]`` int64: the whole prompt when ``cache is None`` (prefill), else the one
            newest token ``[b, 1]``.
        cache: the cache returned by the previous call, or ``None``.

    Returns:
        ``(logits [b, v] fp32, cache)``.
    """
    start = 0 if cache is None else cache.position
    b, s = tokens.shape
    positions = torch.arange(start, start + s, device=tokens.device).unsqueeze(0).expand(b, s)
    x = model.embedding(tokens)  # [b, s, h]
    new_cache = KVCache(position=start + s)
    for i, layer in enumerate(model.layers):
        x, kv = _layer_step(layer, x, positions, None if cache is None else cache.layers[i])
        new_cache.layers.append(kv)
    hidden = model.final_norm(x[:, -1:])  # [b, 1, h]
    return model.logits(hidden)[:, -1].float(), new_cache


@torch.no_grad()
def greedy_generate(
    model: GPTModel,
    prompt_ids: Sequence[int] | torch.Tensor,
    max_new_tokens: int,
    eos_id: int | None = None,
    use_cache: bool = True,
) -> list[int]:
    """Greedy (argmax) continuation of one prompt.

    Args:
        model: a :class:`GPTModel` (switched to eval mode here; restored afterwards).
        prompt_ids: the prompt's token ids (non-empty), a sequence or ``[s]`` int tensor.
        max_new_tokens: most tokens to generate.
        eos_id: stop after generating this id (it is included in the result); ``None``: never.
        use_cache: decode incrementally with the key/value cache (one token per step); ``False``
            re-runs the full forward on the whole sequence for every token (the reference).

    Returns:
        The generated ids (without the prompt).
    """
    device = model.embedding.weight.device
    ids = torch.as_tensor(list(map(int, prompt_ids)), dtype=torch.long, device=device)
    if ids.numel() == 0:
        raise ValueError("greedy_generate needs a non-empty prompt")
    was_training = model.training
    model.eval()
    try:
        out: list[int] = []
        seq = ids.unsqueeze(0)  # [1, s]
        cache: KVCache | None = None
        step_input = seq
        for _ in range(max_new_tokens):
            if use_cache:
                logits, cache = forward_with_cache(model, step_input, cache)
            else:
                logits = model.logits(model(seq)[:, -1:])[:, -1]  # [1, v]
            nxt = int(logits.argmax(-1)[0])
            out.append(nxt)
            if eos_id is not None and nxt == eos_id:
                break
            step_input = torch.tensor([[nxt]], dtype=torch.long, device=device)
            seq = torch.cat([seq, step_input], dim=1)
        return out
    finally:
        model.train(was_training)
