"""Each tensor-parallel layer equals its unsharded twin (outputs and gradients), TP = 2 and 4."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from megatron.parallel import (
    ColumnParallelLinear,
    ParallelState,
    RowParallelLinear,
    VocabParallelEmbedding,
    chunked_vocab_parallel_kl,
    chunked_vocab_parallel_log_probs,
    vocab_parallel_cross_entropy,
    vocab_parallel_log_probs,
)

# Sharded vs unsharded twin, fp32 (error model: tests/numerics.py). Every compared value is a dot
# product of K <= 24 O(1) terms (a row-parallel layer sums its K/TP partial products across
# ranks), a gradient summed over 15 rows, or a log-sum-exp over V <= 64 logits of |z| <~ 10 that
# TP splits into per-shard maxima and sums: other summation orders, random rounding of
# ~sqrt(max(K, V)) u |value| = 8 u |value| <= 5e-6 at |value| <= 10. atol = rtol = 1e-5 (bounds
# |diff| by 1e-5 + 1e-5 |value|) covers that twice; a sharding bug is off by O(|value|).
TOL = dict(atol=1e-5, rtol=1e-5)


def _column(rank, world, gather):
    torch.manual_seed(0)
    x = torch.randn(3, 5, 16, requires_grad=True)
    state = ParallelState.build(world)
    torch.manual_seed(1)
    layer = ColumnParallelLinear(16, 24, state=state, gather_output=gather, output_parts=[8, 16])
    with torch.no_grad():
        layer.bias.copy_(torch.arange(layer.bias.numel()) * 0.01 + rank)
    y = layer(x)
    (y * torch.linspace(-1, 1, y.shape[-1])).sum().backward()
    return y.detach(), x.grad, layer.weight.grad, layer.bias.detach()


def _column_serial(gather_world):
    torch.manual_seed(0)
    x = torch.randn(3, 5, 16, requires_grad=True)
    torch.manual_seed(1)
    layer = ColumnParallelLinear(16, 24, state=ParallelState.single(), output_parts=[8, 16])
    return x, layer


def test_column_parallel_linear(pool):
    world = pool.world_size
    out = pool.run(_column, True)
    x, layer = _column_serial(world)
    # the serial twin uses the concatenation of every rank's bias shard, in part order
    parts = [o[3] for o in out]
    k8, k16 = 8 // world, 16 // world
    bias = torch.cat([p[:k8] for p in parts] + [p[k8:] for p in parts])
    with torch.no_grad():
        layer.bias.copy_(bias)
    y = layer(x)
    # gathered output is [r0 shard | r1 shard ...] where each shard is [gate_r; up_r]
    perm = torch.cat(
        [
            torch.cat(
                [torch.arange(r * k8, (r + 1) * k8), 8 + torch.arange(r * k16, (r + 1) * k16)]
            )
            for r in range(world)
        ]
    )
    y_perm = y[..., perm]
    (y_perm * torch.linspace(-1, 1, 24)).sum().backward()
    for rank, (y_r, gx_r, gw_r, _) in enumerate(out):
        torch.testing.assert_close(y_r, y_perm.detach(), **TOL)
        torch.testing.assert_close(gx_r, x.grad, **TOL)
        rows = perm[rank * (k8 + k16) : (rank + 1) * (k8 + k16)]
        torch.testing.assert_close(gw_r, layer.weight.grad[rows], **TOL)


def _row(rank, world, parallel_input):
    torch.manual_seed(0)
    x = torch.randn(3, 5, 24, requires_grad=True)
    state = ParallelState.build(world)
    torch.manual_seed(1)
    layer = RowParallelLinear(24, 16, state=state, input_is_parallel=parallel_input)
    with torch.no_grad():
        layer.bias.copy_(torch.arange(16) * 0.1)
    inp = x.chunk(world, dim=-1)[rank] if parallel_input else x
    y = layer(inp)
    (y * torch.linspace(-1, 1, 16)).sum().backward()
    return y.detach(), x.grad, layer.weight.grad, layer.bias.grad


@pytest.mark.parametrize("parallel_input", [True, False])
def test_row_parallel_linear(pool, parallel_input):
    world = pool.world_size
    out = pool.run(_row, parallel_input)
    torch.manual_seed(0)
    x = torch.randn(3, 5, 24, requires_grad=True)
    torch.manual_seed(1)
    layer = RowParallelLinear(24, 16, state=ParallelState.single())
    with torch.no_grad():
        layer.bias.copy_(torch.arange(16) * 0.1)
    y = layer(x)
    (y * torch.linspace(-1, 1, 16)).sum().backward()
    k = 24 // world
    gx_full = torch.cat([o[1][..., r * k : (r + 1) * k] for r, o in enumerate(out)], -1)
    for rank, (y_r, gx_r, gw_r, gb_r) in enumerate(out):
        torch.testing.assert_close(y_r, y.detach(), **TOL)
        torch.testing.assert_close(gw_r, layer.weight.grad[:, rank * k : (rank + 1) * k], **TOL)
        torch.testing.assert_close(gb_r, layer.bias.grad, **TOL)
        if not parallel_input:
            torch.testing.assert_close(gx_r, x.grad, **TOL)
    if parallel_input:
        torch.testing.assert_close(gx_full, x.grad, **TOL)


def _embedding(rank, world):
    tokens = torch.tensor([[0, 5, 31, 16], [8, 9, 30, 1]])
    state = ParallelState.build(world)
    torch.manual_seed(3)
    emb = VocabParallelEmbedding(32, 8, state=state)
    y = emb(tokens)
    (y * torch.linspace(-1, 1, 8)).sum().backward()
    return y.detach(), emb.weight.grad


def test_vocab_parallel_embedding(pool):
    world = pool.world_size
    out = pool.run(_embedding)
    tokens = torch.tensor([[0, 5, 31, 16], [8, 9, 30, 1]])
    torch.manual_seed(3)
    emb = VocabParallelEmbedding(32, 8, state=ParallelState.single())
    y = emb(tokens)
    (y * torch.linspace(-1, 1, 8)).sum().backward()
    k = 32 // world
    for rank, (y_r, g_r) in enumerate(out):
        torch.testing.assert_close(y_r, y.detach(), **TOL)
        torch.testing.assert_close(g_r, emb.weight.grad[rank * k : (rank + 1) * k], **TOL)


def _logits_and_targets():
    torch.manual_seed(4)
    logits = torch.randn(10, 64) * 3
    target = torch.randint(0, 60, (10,))
    target[3] = -100
    return logits, target


def _log_probs(rank, world, vocab_size):
    logits, target = _logits_and_targets()
    state = ParallelState.build(world)
    shard = logits.chunk(world, dim=-1)[rank].clone().requires_grad_(True)
    safe = target.clamp(min=0)
    logp, log_z = vocab_parallel_log_probs(shard, safe, state.tp_group, vocab_size)
    ce = vocab_parallel_cross_entropy(shard, target, state.tp_group, vocab_size=vocab_size)
    (logp * torch.linspace(0.5, 1.5, 10)).sum().backward(retain_graph=True)
    g_logp = shard.grad.clone()
    shard.grad = None
    (ce.sum() + 0.1 * log_z.sum()).backward()
    return logp.detach(), log_z.detach(), ce.detach(), g_logp, shard.grad


@pytest.mark.parametrize("vocab_size", [64, 60])
def test_vocab_parallel_log_probs_and_cross_entropy(pool, vocab_size):
    out = pool.run(_log_probs, vocab_size)
    logits, target = _logits_and_targets()
    full = logits.clone().requires_grad_(True)
    ref_logits = full[:, :vocab_size]
    safe = target.clamp(min=0)
    ref_logp = F.log_softmax(ref_logits, -1).gather(-1, safe[:, None]).squeeze(-1)
    ref_ce = F.cross_entropy(ref_logits, target, ignore_index=-100, reduction="none")
    ref_lz = torch.logsumexp(ref_logits, -1)
    (ref_logp * torch.linspace(0.5, 1.5, 10)).sum().backward(retain_graph=True)
    g_logp = full.grad.clone()
    full.grad = None
    (ref_ce.sum() + 0.1 * ref_lz.sum()).backward()
    world = pool.world_size
    for rank, (lp, lz, ce, g1, g2) in enumerate(out):
        torch.testing.assert_close(lp, ref_logp.detach(), **TOL)
        torch.testing.assert_close(lz, ref_lz.detach(), **TOL)
        torch.testing.assert_close(ce, ref_ce.detach(), **TOL)
        assert ce[3] == 0
        torch.testing.assert_close(g1, g_logp.chunk(world, -1)[rank], **TOL)
        torch.testing.assert_close(g2, full.grad.chunk(world, -1)[rank], **TOL)


def _chunked(rank, world, chunk):
    torch.manual_seed(5)
    hidden = torch.randn(13, 16, requires_grad=True)
    weight = torch.randn(64, 16) * 0.5
    target = torch.randint(0, 50, (13,))
    state = ParallelState.build(world)
    w = weight.chunk(world, 0)[rank].clone().requires_grad_(True)
    logp, log_z, log_sq, entropy = chunked_vocab_parallel_log_probs(
        hidden, w, target, state.tp_group, 50, chunk, with_sum_sq=True, with_entropy=True
    )
    (logp.sum() + 0.3 * log_z.sum()).backward()
    return logp.detach(), hidden.grad, w.grad, log_sq, entropy


@pytest.mark.parametrize("chunk", [4, 100])
def test_chunked_log_probs_equal_full_logits(pool, chunk):
    torch.manual_seed(5)
    hidden = torch.randn(13, 16, requires_grad=True)
    weight = (torch.randn(64, 16) * 0.5).requires_grad_(True)
    target = torch.randint(0, 50, (13,))
    logits = (hidden @ weight.t())[:, :50]
    ref = F.log_softmax(logits, -1).gather(-1, target[:, None]).squeeze(-1)
    (ref.sum() + 0.3 * torch.logsumexp(logits, -1).sum()).backward()
    ref_sq = torch.log((F.softmax(logits, -1) ** 2).sum(-1)).detach()  # WPO's log sum_v p_v^2
    p = F.softmax(logits, -1).detach()
    ref_entropy = -(p * torch.log(p)).sum(-1)  # online RL's metric; padded vocab excluded
    world = pool.world_size
    for rank, (lp, gh, gw, sq, ent) in enumerate(pool.run(_chunked, chunk)):
        torch.testing.assert_close(sq, ref_sq, **TOL)
        torch.testing.assert_close(ent, ref_entropy, **TOL)
        torch.testing.assert_close(lp, ref.detach(), **TOL)
        torch.testing.assert_close(gh, hidden.grad, **TOL)
        torch.testing.assert_close(gw, weight.grad.chunk(world, 0)[rank], **TOL)


def _chunked_kl(rank, world, chunk):
    torch.manual_seed(7)
    hidden = torch.randn(11, 16, requires_grad=True)
    weight = torch.randn(64, 16) * 0.5
    ref_hidden, ref_weight = torch.randn(11, 16), torch.randn(64, 16) * 0.5
    state = ParallelState.build(world)
    w = weight.chunk(world, 0)[rank].clone().requires_grad_(True)
    kl = chunked_vocab_parallel_kl(
        hidden, w, ref_hidden, ref_weight.chunk(world, 0)[rank], state.tp_group, 50, chunk
    )
    (kl * torch.arange(11.0)).sum().backward()
    return kl.detach(), hidden.grad, w.grad


@pytest.mark.parametrize("chunk", [3, 100])
def test_chunked_kl_equals_the_dense_kl(pool, chunk):
    """REINFORCE's ``kl_impl: full``: sum_v p (log p - log q) over the true vocabulary (50 of 64
    padded rows), values and gradients, against torch's kl_div on full logits."""
    torch.manual_seed(7)
    hidden = torch.randn(11, 16, requires_grad=True)
    weight = (torch.randn(64, 16) * 0.5).requires_grad_(True)
    ref_hidden, ref_weight = torch.randn(11, 16), torch.randn(64, 16) * 0.5
    lp = F.log_softmax((hidden @ weight.t())[:, :50], -1)
    lq = F.log_softmax((ref_hidden @ ref_weight.t())[:, :50], -1)
    ref = F.kl_div(lq, lp, log_target=True, reduction="none").sum(-1)  # NeoX's expression
    (ref * torch.arange(11.0)).sum().backward()
    world = pool.world_size
    for rank, (kl, gh, gw) in enumerate(pool.run(_chunked_kl, chunk)):
        torch.testing.assert_close(kl, ref.detach(), **TOL)
        torch.testing.assert_close(gh, hidden.grad, **TOL)
        torch.testing.assert_close(gw, weight.grad.chunk(world, 0)[rank], **TOL)
    assert float(ref.detach().min()) > 0


def test_chunked_log_probs_serial_bf16_accumulates_in_fp32():
    torch.manual_seed(6)
    hidden = torch.randn(9, 16).bfloat16()
    weight = (torch.randn(40, 16) * 0.5).bfloat16()
    target = torch.randint(0, 40, (9,))
    logp, _ = chunked_vocab_parallel_log_probs(hidden, weight, target, None, 40, 4)
    ref = F.log_softmax((hidden.float() @ weight.float().t()), -1).gather(-1, target[:, None])
    assert logp.dtype == torch.float32
    torch.testing.assert_close(logp, ref.squeeze(-1), atol=2e-2, rtol=0)
