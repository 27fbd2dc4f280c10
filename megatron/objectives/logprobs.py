"""Per-token log-probabilities of the targets, from final hidden states (TP-aware, chunked).

Shapes: b batch, s sequence, h hidden, v padded vocabulary, p TP size.

The ``lm_head`` (or tied embedding) shard ``[v/p, h]`` is applied ``chunk_size`` tokens at a time
and the log-sum-exp is all-reduced across TP ranks
(:func:`megatron.parallel.chunked_vocab_parallel_log_probs`), so ``[b*s, v]`` logits are never
materialised; logits are accumulated in fp32 whatever the parameter dtype.
"""

from __future__ import annotations

import torch

from megatron.parallel.cross_entropy import chunked_vocab_parallel_log_probs


def token_log_probs(
    model: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor, chunk_size: int = 4096
) -> dict[str, torch.Tensor]:
    """``log p(targets)`` for every position.

    Args:
        model: a :class:`megatron.model.GPTModel` (for its output weight, TP group and vocab).
        hidden: ``[b, s, h]`` final hidden states.
        targets: ``[b, s]`` int64 next-token ids (any valid id where the loss mask is 0).
        chunk_size: tokens per chunk of the vocabulary projection.

    Returns:
        ``{"token_logps": [b, s] fp32, "log_z": [b, s] fp32}``.
    """
    b, s, h = hidden.shape
    logps, log_z = chunked_vocab_parallel_log_probs(
        hidden.reshape(b * s, h),  # [b, s, h] -> [b*s, h]
        model.output_weight(),
        targets.reshape(b * s),
        model.state.tp_group,
        vocab_size=model.cfg.vocab_size,
        chunk_size=chunk_size,
    )
    return {"token_logps": logps.view(b, s), "log_z": log_z.view(b, s)}
