"""What the model returns besides hidden states: per-token outputs requested by name.

Shapes: b batch, s sequence, h hidden, v padded vocabulary, p TP size, k extra targets.

An objective declares the per-token outputs its loss reads (``Objective.model_outputs``); the
model is built with exactly those (``GPTModel(..., outputs=...)``, and the pipeline's last stage
likewise), so no flag travels through the model at run time:

=====================  =======  ==================================================================
name                   head     meaning
=====================  =======  ==================================================================
``token_logps``        lm       ``log p(target)`` per position ``[b, s]`` fp32
``log_z``              lm       log-partition (log-sum-exp of the logits) ``[b, s]`` fp32
``log_sum_sq_probs``   lm       ``log sum_v p_v^2`` ``[b, s]`` fp32, no gradient (WPO's weights)
``entropy``            lm       ``-sum_v p_v log p_v`` ``[b, s]`` fp32, no gradient (online RL)
``kl``                 lm       ``sum_v p_v (log p_v - log q_v)`` ``[b, s]`` fp32 against a reference
                                distribution ``q`` given to the forward (``kl_reference``)
``values``             value    the value head at every position ``[b, s]`` fp32
=====================  =======  ==================================================================

The ``lm`` outputs come from the vocab-parallel ``lm_head`` shard ``[v/p, h]`` applied a chunk of
tokens at a time with the log-sum-exp all-reduced across TP ranks
(:func:`megatron.parallel.chunked_vocab_parallel_log_probs`), so ``[b*s, v]`` logits are never
materialised.

*Extra targets* (``extra_index [k]``, flat ``row * s + column`` indices of hidden states, with
``extra_targets [k]`` token ids) score a hidden state against a token other than the next one: in a
prefix-shared row ``[prompt | chosen | rejected]`` the prompt's last hidden state predicts the first
token of both completions. Their log-probs come back as ``extra_logps [k]`` fp32, and with
``log_sum_sq_probs`` requested also ``extra_log_sum_sq_probs [k]`` fp32 (``log sum_v p_v^2`` at
each extra target's hidden state, for WPO's weights), with ``entropy`` also ``extra_entropy [k]``.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist

from megatron.parallel.cross_entropy import (
    chunked_vocab_parallel_kl,
    chunked_vocab_parallel_log_probs,
)

LM_OUTPUTS = frozenset({"token_logps", "log_z", "log_sum_sq_probs", "entropy", "kl"})
VALUE_OUTPUTS = frozenset({"values"})
HEAD_OUTPUTS = {"lm": LM_OUTPUTS, "value": VALUE_OUTPUTS}
"""What each ``model.head`` can give."""
DEFAULT_OUTPUTS = {"lm": frozenset({"token_logps", "log_z"}), "value": VALUE_OUTPUTS}
"""What each ``model.head`` gives when nothing else is asked for."""


def resolve_outputs(head: str, outputs: Iterable[str] | None) -> frozenset[str]:
    """The per-token outputs a model with ``head`` computes (``None``: the head's defaults).

    Raises:
        ValueError: an unknown output, or one the head cannot produce.
    """
    if head not in DEFAULT_OUTPUTS:
        raise ValueError(f"model.head must be one of {sorted(DEFAULT_OUTPUTS)}, got {head!r}")
    if outputs is None:
        return DEFAULT_OUTPUTS[head]
    wanted = frozenset(outputs)
    allowed = HEAD_OUTPUTS[head]
    bad = sorted(wanted - allowed)
    if bad:
        raise ValueError(
            f"a model.head: {head} model cannot output {bad}; it gives {sorted(allowed)}"
        )
    if not wanted:
        raise ValueError("outputs: ask for at least one output (or None for the defaults)")
    return wanted


def token_log_probs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    group: dist.ProcessGroup | None,
    vocab_size: int,
    outputs: frozenset[str],
    chunk_size: int | None = None,
    extra_index: torch.Tensor | None = None,
    extra_targets: torch.Tensor | None = None,
    kl_reference: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """The ``lm`` outputs of ``hidden`` for ``targets`` (and the extra targets, if any).

    Args:
        hidden: ``[b, s, h]`` final hidden states.
        weight: this rank's ``[v/p, h]`` output projection (``lm_head`` or tied embedding).
        targets: ``[b, s]`` int64 next-token ids (any valid id where nothing is scored).
        group: the TP group.
        vocab_size: the true vocabulary size (padding rows excluded from the softmax).
        outputs: the requested names (a subset of :data:`LM_OUTPUTS`).
        chunk_size: tokens per chunk (``None``: ~256 MiB of fp32 logits per chunk).
        extra_index: ``[k]`` int64 flat indices into the ``b * s`` hidden states, or ``None``.
        extra_targets: ``[k]`` int64 token ids scored at those hidden states.
        kl_reference: ``(ref_hidden [b, s, h], ref_weight [v/p, h])``, a reference model's final
            hidden states at the same tokens and its output rows: ``kl`` (with ``kl`` requested;
            ``extra_kl [k]`` at the extra targets).

    Returns:
        The requested ``[b, s]`` fp32 tensors by name (``token_logps`` and ``log_z`` are always
        computed together), plus ``extra_logps [k]`` fp32 when extra targets are given (and
        ``extra_log_sum_sq_probs [k]`` fp32 when ``log_sum_sq_probs`` is requested too).
    """
    b, s, h = hidden.shape
    flat = hidden.reshape(b * s, h)  # [b, s, h] -> [b*s, h]
    tgt = targets.reshape(b * s)
    k = 0
    if extra_index is not None:
        if extra_targets is None or extra_targets.shape != extra_index.shape:
            raise ValueError("extra_index and extra_targets must be given together, same shape")
        k = int(extra_index.numel())
        if k:
            # why: one pass over [b*s + k] rows keeps a single chunked projection (and its
            # all-reduces); the k extra rows are copies of the hidden states they score.
            flat = torch.cat([flat, flat.index_select(0, extra_index)])  # [b*s + k, h]
            tgt = torch.cat([tgt, extra_targets])
    with_sq, with_entropy = "log_sum_sq_probs" in outputs, "entropy" in outputs
    out = chunked_vocab_parallel_log_probs(
        flat,
        weight,
        tgt,
        group,
        vocab_size=vocab_size,
        chunk_size=chunk_size,
        with_sum_sq=with_sq,
        with_entropy=with_entropy,
    )
    n = b * s
    result = {"token_logps": out[0][:n].view(b, s), "log_z": out[1][:n].view(b, s)}
    if with_sq:
        result["log_sum_sq_probs"] = out[2][:n].view(b, s)
    if with_entropy:
        result["entropy"] = out[-1][:n].view(b, s)
    if "kl" in outputs and kl_reference is not None:
        ref_hidden, ref_weight = kl_reference
        ref_flat = ref_hidden.reshape(b * s, h)  # [b, s, h] -> [b*s, h]
        if k:
            ref_flat = torch.cat([ref_flat, ref_flat.index_select(0, extra_index)])
        kl = chunked_vocab_parallel_kl(
            flat, weight, ref_flat, ref_weight, group, vocab_size, chunk_size
        )
        result["kl"] = kl[:n].view(b, s)
        if extra_index is not None:
            result["extra_kl"] = kl[n : n + k]
    if extra_index is not None:
        result["extra_logps"] = out[0][n : n + k]
        if with_sq:
            result["extra_log_sum_sq_probs"] = out[2][n : n + k]
        if with_entropy:
            result["extra_entropy"] = out[-1][n : n + k]
    return result
