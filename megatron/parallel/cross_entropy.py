"""Vocab-parallel log-probabilities and cross-entropy, without gathering the vocabulary.

With the logits of ``n`` tokens split by vocabulary across ``p`` TP ranks (rank i holds columns
``[i*v/p, (i+1)*v/p)``), the per-token log-probability of the target ``y`` is

    log p(y) = z_y - log Z,    log Z = m + log sum_i sum_{j in shard i} exp(z_j - m),

with ``m`` the all-reduced maximum. Only three ``[n]`` vectors cross the TP group (max, sum of
exponentials, target logit), never ``[n, v]``. Gradients: d log p(y) / dz = onehot(y) - softmax(z);
d log Z / dz = softmax(z).

Columns at or beyond the true vocabulary size (padding added so ``v`` divides by TP x 128) are
excluded from Z, so padded models give exactly the unpadded model's probabilities.

Two entry points:

* :func:`vocab_parallel_log_probs` from a logits shard (Megatron-LM's
  ``vocab_parallel_cross_entropy`` algorithm);
* :func:`chunked_vocab_parallel_log_probs` from hidden states and the ``lm_head`` shard, in chunks
  of tokens with recomputation in backward, so at most ``chunk x v/p`` logits exist at once and
  none are kept for backward (the "never full fp32 logits" contract of ARCHITECTURE.md).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatron.parallel.mappings import all_reduce_no_grad, copy_to_tensor_parallel_region

# Default chunk: ~256 MiB of fp32 logits (a few such temporaries exist at once in a chunk).
_CHUNK_BYTES = 256 * 2**20


def _rank(group: dist.ProcessGroup | None) -> int:
    return 0 if group is None else dist.get_rank(group)


def _shard_stats(
    logits: torch.Tensor,
    target: torch.Tensor,
    vocab_start: int,
    vocab_size: int | None,
    group: dist.ProcessGroup | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """fp32 ``(masked logits [n, v/p], log Z [n], target logit [n])`` for one chunk."""
    logits = logits.float()
    width = logits.shape[-1]
    if vocab_size is not None and vocab_start + width > vocab_size:
        logits = logits.clone()
        logits[:, max(vocab_size - vocab_start, 0) :] = float("-inf")
    m = logits.max(dim=-1).values
    all_reduce_no_grad(m, group, dist.ReduceOp.MAX)
    sum_exp = (logits - m.unsqueeze(-1)).exp_().sum(dim=-1)  # one [n, v/p] temporary
    all_reduce_no_grad(sum_exp, group)
    log_z = m + torch.log(sum_exp)
    local = target - vocab_start
    inside = (local >= 0) & (local < width)
    picked = logits.gather(-1, local.clamp(0, width - 1).unsqueeze(-1)).squeeze(-1)
    target_logit = torch.where(inside, picked, torch.zeros_like(picked))
    all_reduce_no_grad(target_logit, group)
    return logits, log_z, target_logit


def _grad_logits(
    logits: torch.Tensor,
    log_z: torch.Tensor,
    target: torch.Tensor,
    vocab_start: int,
    g_logp: torch.Tensor,
    g_logz: torch.Tensor,
) -> torch.Tensor:
    """``g_logp * (onehot - p) + g_logz * p`` for one shard, fp32 ``[n, v/p]``."""
    grad = (logits - log_z.unsqueeze(-1)).exp_()  # probabilities, then scaled in place
    grad.mul_((g_logz - g_logp).unsqueeze(-1))
    local = target - vocab_start
    inside = (local >= 0) & (local < logits.shape[-1])
    rows = torch.nonzero(inside).squeeze(-1)
    grad[rows, local[rows]] += g_logp[rows]
    return grad


class _VocabParallelLogProbs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, group, vocab_start, vocab_size):
        masked, log_z, target_logit = _shard_stats(logits, target, vocab_start, vocab_size, group)
        ctx.save_for_backward(masked, log_z, target)
        ctx.vocab_start, ctx.in_dtype = vocab_start, logits.dtype
        return target_logit - log_z, log_z

    @staticmethod
    def backward(ctx, g_logp, g_logz):
        masked, log_z, target = ctx.saved_tensors
        grad = _grad_logits(masked, log_z, target, ctx.vocab_start, g_logp.float(), g_logz.float())
        return grad.to(ctx.in_dtype), None, None, None, None


def vocab_parallel_log_probs(
    logits: torch.Tensor,
    target: torch.Tensor,
    group: dist.ProcessGroup | None = None,
    vocab_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log p(target) from a vocabulary-sharded logits tensor.

    Args:
        logits: ``[n, v/p]`` (any float dtype) — this rank's vocabulary columns.
        target: ``[n]`` int64 global token ids (any id; ignored positions can hold 0).
        group: the TP group (``None`` for serial).
        vocab_size: true vocabulary size; columns at or beyond it are excluded.

    Returns:
        ``(log_probs [n] fp32, log_z [n] fp32)``, identical on every TP rank.
    """
    vocab_start = _rank(group) * logits.shape[-1]
    return _VocabParallelLogProbs.apply(logits, target, group, vocab_start, vocab_size)


def vocab_parallel_cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    group: dist.ProcessGroup | None = None,
    ignore_index: int = -100,
    vocab_size: int | None = None,
) -> torch.Tensor:
    """Per-token cross-entropy ``-log p(target)``, 0 where ``target == ignore_index``.

    Args:
        logits: ``[n, v/p]`` vocabulary shard.
        target: ``[n]`` int64.
        group: TP group.
        ignore_index: targets with this value contribute 0 loss and 0 gradient.
        vocab_size: true vocabulary size (padding columns excluded).

    Returns:
        ``[n]`` fp32 losses (reduce them yourself, like ``reduction='none'``).
    """
    keep = target != ignore_index
    logp, _ = vocab_parallel_log_probs(logits, target.masked_fill(~keep, 0), group, vocab_size)
    return -logp * keep


def _entropy(masked: torch.Tensor, log_z: torch.Tensor, group) -> torch.Tensor:
    """``[n]`` entropy ``log Z - sum_v p_v z_v`` of the softmax over the vocabulary shards."""
    probs = (masked - log_z.unsqueeze(-1)).exp_()  # 0 on the padding columns (z = -inf)
    # why: 0 * -inf is NaN; the padding columns carry no probability
    weighted = probs.mul_(torch.nan_to_num(masked, neginf=0.0)).sum(dim=-1)
    return log_z - all_reduce_no_grad(weighted, group)


class _ChunkedLogProbs(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, hidden, weight, target, group, vocab_start, vocab_size, chunk, with_sq, with_entropy
    ):
        logps, log_zs, sqs, entropies = [], [], [], []
        for s in range(0, hidden.shape[0], chunk):
            # why: upcast in the same expression so the low-precision logits are freed at once
            logits = (hidden[s : s + chunk] @ weight.t()).float()
            masked, log_z, tl = _shard_stats(
                logits, target[s : s + chunk], vocab_start, vocab_size, group
            )
            logps.append(tl - log_z)
            log_zs.append(log_z)
            if with_sq:  # log sum_v p_v^2 (WPO's weights): one more exp and all-reduce
                sq = (masked - log_z.unsqueeze(-1)).mul_(2.0).exp_().sum(dim=-1)
                sqs.append(torch.log(all_reduce_no_grad(sq, group)))
            if with_entropy:  # the policy's entropy (online RL's metric): one more exp
                entropies.append(_entropy(masked, log_z, group))
        log_z = torch.cat(log_zs) if log_zs else hidden.new_zeros(0, dtype=torch.float32)
        logp = torch.cat(logps) if logps else log_z.clone()
        log_sq = torch.cat(sqs) if sqs else torch.zeros_like(log_z)
        entropy = torch.cat(entropies) if entropies else torch.zeros_like(log_z)
        ctx.save_for_backward(hidden, weight, target, log_z)
        ctx.args = (vocab_start, vocab_size, chunk)
        ctx.mark_non_differentiable(log_sq, entropy)
        return logp, log_z, log_sq, entropy

    @staticmethod
    def backward(ctx, g_logp, g_logz, _g_sq, _g_entropy):
        hidden, weight, target, log_z = ctx.saved_tensors
        vocab_start, vocab_size, chunk = ctx.args
        g_logp, g_logz = g_logp.float(), g_logz.float()
        grad_h = torch.empty_like(hidden)
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        for s in range(0, hidden.shape[0], chunk):
            h = hidden[s : s + chunk]
            logits = (h @ weight.t()).float()
            if vocab_size is not None and vocab_start + logits.shape[-1] > vocab_size:
                logits[:, max(vocab_size - vocab_start, 0) :] = float("-inf")
            g = _grad_logits(
                logits,
                log_z[s : s + chunk],
                target[s : s + chunk],
                vocab_start,
                g_logp[s : s + chunk],
                g_logz[s : s + chunk],
            )
            grad_h[s : s + chunk] = (g.to(weight.dtype) @ weight).to(hidden.dtype)
            grad_w += g.t() @ h.float()
        return grad_h, grad_w.to(weight.dtype), None, None, None, None, None, None, None


def chunked_vocab_parallel_log_probs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    group: dist.ProcessGroup | None = None,
    vocab_size: int | None = None,
    chunk_size: int | None = None,
    with_sum_sq: bool = False,
    with_entropy: bool = False,
) -> tuple[torch.Tensor, ...]:
    """Per-token log p(target) straight from hidden states through a vocab-parallel ``lm_head``.

    Equivalent to ``vocab_parallel_log_probs(hidden @ weight.T, target)`` but computed
    ``chunk_size`` tokens at a time, recomputing logits in backward: peak extra memory is
    ``chunk_size x v/p`` fp32 instead of ``n x v/p`` logits kept for backward.

    Args:
        hidden: ``[n, h]`` final hidden states (replicated across TP ranks).
        weight: ``[v/p, h]`` this rank's ``lm_head`` (or tied embedding) rows.
        target: ``[n]`` int64 global token ids.
        group: TP group.
        vocab_size: true vocabulary size (padding rows excluded from the softmax).
        chunk_size: tokens per chunk; ``None`` sizes chunks so one fp32 chunk of logits is
            about 256 MiB (512 tokens at a 128k vocabulary shard, the whole batch for small
            vocabularies).
        with_sum_sq: also return ``log sum_v p_v^2`` per token (no gradient), which WPO's pair
            weights need (arXiv:2406.11827).
        with_entropy: also return the entropy of each token's distribution ``[n]`` fp32 (no
            gradient; online RL logs it).

    Returns:
        ``(log_probs [n] fp32, log_z [n] fp32)``, then ``log_sum_sq_probs [n]`` fp32 with
        ``with_sum_sq``, then ``entropy [n]`` fp32 with ``with_entropy``.
    """
    hidden = copy_to_tensor_parallel_region(hidden, group)
    vocab_start = _rank(group) * weight.shape[0]
    if chunk_size is None:
        chunk_size = _CHUNK_BYTES // (4 * max(weight.shape[0], 1))
    logp, log_z, log_sq, entropy = _ChunkedLogProbs.apply(
        hidden,
        weight,
        target,
        group,
        vocab_start,
        vocab_size,
        max(int(chunk_size), 1),
        with_sum_sq,
        with_entropy,
    )
    return (logp, log_z) + (log_sq,) * with_sum_sq + (entropy,) * with_entropy


def _log_softmax_chunk(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    vocab_start: int,
    vocab_size: int | None,
    group: dist.ProcessGroup | None,
) -> torch.Tensor:
    """fp32 ``[n, v/p]`` log-softmax of ``hidden @ weight.T`` over the whole (sharded)
    vocabulary; ``-inf`` on the padding columns."""
    logits = (hidden @ weight.t()).float()
    if vocab_size is not None and vocab_start + logits.shape[-1] > vocab_size:
        logits[:, max(vocab_size - vocab_start, 0) :] = float("-inf")
    m = logits.max(dim=-1).values
    all_reduce_no_grad(m, group, dist.ReduceOp.MAX)
    sum_exp = (logits - m.unsqueeze(-1)).exp().sum(dim=-1)
    all_reduce_no_grad(sum_exp, group)
    return logits - (m + torch.log(sum_exp)).unsqueeze(-1)


def _kl_chunk(
    lp: torch.Tensor, lq: torch.Tensor, group: dist.ProcessGroup | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(p [n, v/p], log p - log q [n, v/p], KL [n])``; 0 where ``p`` is 0 (padding columns)."""
    p = lp.exp()
    diff = torch.where(p > 0, lp - lq, torch.zeros_like(lp))
    kl = (p * diff).sum(dim=-1)
    return p, diff, all_reduce_no_grad(kl, group)


class _ChunkedKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, ref_hidden, ref_weight, group, vocab_start, vocab_size, chunk):
        kls = []
        for s in range(0, hidden.shape[0], chunk):
            lp = _log_softmax_chunk(hidden[s : s + chunk], weight, vocab_start, vocab_size, group)
            lq = _log_softmax_chunk(
                ref_hidden[s : s + chunk], ref_weight, vocab_start, vocab_size, group
            )
            kls.append(_kl_chunk(lp, lq, group)[2])
        ctx.save_for_backward(hidden, weight, ref_hidden, ref_weight)
        ctx.args = (group, vocab_start, vocab_size, chunk)
        return torch.cat(kls) if kls else hidden.new_zeros(0, dtype=torch.float32)

    @staticmethod
    def backward(ctx, g_kl):
        hidden, weight, ref_hidden, ref_weight = ctx.saved_tensors
        group, vocab_start, vocab_size, chunk = ctx.args
        g_kl = g_kl.float()
        grad_h = torch.empty_like(hidden)
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        for s in range(0, hidden.shape[0], chunk):
            h = hidden[s : s + chunk]
            lp = _log_softmax_chunk(h, weight, vocab_start, vocab_size, group)
            lq = _log_softmax_chunk(
                ref_hidden[s : s + chunk], ref_weight, vocab_start, vocab_size, group
            )
            p, diff, kl = _kl_chunk(lp, lq, group)
            # d KL / d z_u = p_u (log p_u - log q_u - KL)
            g = p * (diff - kl.unsqueeze(-1)) * g_kl[s : s + chunk].unsqueeze(-1)
            grad_h[s : s + chunk] = (g.to(weight.dtype) @ weight).to(hidden.dtype)
            grad_w += g.t() @ h.float()
        return grad_h, grad_w.to(weight.dtype), None, None, None, None, None, None


def chunked_vocab_parallel_kl(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    ref_hidden: torch.Tensor,
    ref_weight: torch.Tensor,
    group: dist.ProcessGroup | None = None,
    vocab_size: int | None = None,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Per-token exact ``KL(p || q) = sum_v p_v (log p_v - log q_v)`` between the policy's
    distribution ``p = softmax(hidden @ weight.T)`` and a reference's ``q = softmax(ref_hidden @
    ref_weight.T)``, both vocabulary-parallel, ``chunk_size`` tokens at a time with recomputation
    in backward (never ``[n, v]`` logits; as :func:`chunked_vocab_parallel_log_probs`).

    Gradients flow to ``hidden`` and ``weight`` only (the reference is frozen):
    ``d KL / d z_u = p_u (log p_u - log q_u - KL)``.

    Args:
        hidden: ``[n, h]`` the policy's final hidden states (replicated across TP ranks).
        weight: ``[v/p, h]`` this rank's policy output rows.
        ref_hidden: ``[n, h]`` the reference's hidden states at the same tokens.
        ref_weight: ``[v/p, h]`` this rank's reference output rows.
        group: TP group.
        vocab_size: true vocabulary size (padding rows excluded).
        chunk_size: tokens per chunk (``None``: ~256 MiB of fp32 logits per chunk, of which
            there are two here).

    Returns:
        ``[n]`` fp32 KL per token (>= 0).
    """
    hidden = copy_to_tensor_parallel_region(hidden, group)
    vocab_start = _rank(group) * weight.shape[0]
    if chunk_size is None:
        chunk_size = _CHUNK_BYTES // (4 * max(weight.shape[0], 1))
    chunk = max(int(chunk_size), 1)
    return _ChunkedKL.apply(
        hidden, weight, ref_hidden.detach(), ref_weight.detach(), group, vocab_start, vocab_size,
        chunk,
    )  # fmt: skip
