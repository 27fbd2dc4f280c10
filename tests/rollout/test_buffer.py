"""A rollout's completions become micro-batches in any layout, and survive a checkpoint.

Per-token values (old-policy, reference, sampler log-probs) are stored per completion and
scattered into each batch's ``[b, s]`` grid at the completion's target positions; gathering them
back gives the same values exactly (a copy, no arithmetic), whatever the layout.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch

from megatron.ckpt.safety import safe_load
from megatron.objectives import get_objective
from megatron.rollout.buffer import (
    Completion,
    CompletionCollator,
    buffer_state,
    flat_outputs,
    gather_tokens,
    load_buffer,
    micro_batches,
    scatter_tokens,
)
from tests.helpers_runs import tiny_fp64_model

LAYOUTS = ["padded", "packed", "prefix_shared", "prefix_shared_packed"]


def _completions() -> list[Completion]:
    """Five completions of three prompts (two share prompt 10, two prompt 12; interleaved, as a
    strided step's are); the third is a masked truncated completion."""
    rng = np.random.default_rng(0)
    prompts = {10: rng.integers(1, 50, 3), 11: rng.integers(1, 50, 5), 12: rng.integers(1, 50, 2)}
    out = []
    for i, (example, c) in enumerate([(10, 4), (11, 1), (12, 6), (10, 3), (12, 2)]):
        out.append(
            Completion(
                example=example,
                prompt=prompts[example],
                tokens=rng.integers(1, 50, c),
                sampler_logps=-rng.random(c).astype(np.float32),
                truncated=i == 2,
                trained=i != 2,  # a masked truncated completion: no targets
                advantage=float(i) - 2,
                old_logps=None if i == 2 else -rng.random(c).astype(np.float32),
            )
        )
    return out


@pytest.mark.parametrize("layout", LAYOUTS)
def test_scatter_and_gather_are_inverse(layout):
    comps = _completions()
    batch = CompletionCollator(layout, 16, 4)(comps)
    flat = scatter_tokens(batch, [c.old_logps for c in comps])
    back = gather_tokens(batch, flat)
    for c, v in zip(comps, back, strict=True):
        want = c.old_logps if c.trained else np.zeros(0, np.float32)
        np.testing.assert_array_equal(v, want)
    # each value sits where the completion's token is the target (grid, then extra targets)
    targets = flat_outputs(batch, batch.targets.float(), _extra_targets(batch))
    for i, c in enumerate(comps):
        if c.trained:
            mine = _scored_by(batch, i)
            assert sorted(targets[mine].long().tolist()) == sorted(c.tokens.tolist())
            assert sorted(flat[mine].tolist()) == sorted(c.old_logps.tolist())
    if layout.startswith("prefix_shared"):  # prompts 10 and 12 stored once each
        assert batch.stats["real_tokens"] == 3 + 4 + 3 + 5 + 1 + 2 + 6 + 2
        assert batch.extra_targets.index.numel() == 2  # the second completions' first tokens
    with pytest.raises(ValueError, match="per-token values of sizes"):
        scatter_tokens(batch, [c.sampler_logps for c in comps])  # the masked one has 6 values


def _extra_targets(batch):
    extra = batch.extra_targets
    return None if extra is None else extra.targets.float()


def _scored_by(batch, i):
    """Flat positions (flat_outputs order) of sequence ``i``'s trained targets."""
    from megatron.objectives.online import scored_tokens

    _, ids = scored_tokens(batch)
    return ids == i


@pytest.mark.parametrize("layout", LAYOUTS[1:])
def test_every_layout_gives_the_padded_log_probs_and_gradients(layout):
    """The tiny fp64 model over one micro-batch in each layout: every completion's per-token
    log-probs (gathered back to it) and GRPO's loss and gradients equal the padded layout's.
    Tolerance as tests/model/test_layout.py derives it: the transformer runs in fp64 (hidden
    states agree to ~1e-15) but log-probs are rounded to fp32 by design, so a token's log-prob may
    differ in its last bits (rtol 2 ulps); the loss sums 15 of them (atol 1e-6) and gradients get
    8 fp32 ulps. A layout bug (a completion seeing another) moves them by ~1e-1."""
    model = tiny_fp64_model()
    comps = _completions()
    for c in comps:
        c.old_logps, c.ref_logps = None, None
    grpo = get_objective("grpo")(get_objective("grpo").Config(num_generations=2, beta=0.0))

    def run(layout):
        (batch,) = micro_batches(
            comps, CompletionCollator(layout, 32, 4), 8, num_items=9.0, max_new_tokens=6
        )
        model.zero_grad()
        out = model(batch.tokens, batch.layout, batch.targets, *_extra_args(batch))
        flat = flat_outputs(batch, out["token_logps"], out.get("extra_logps"))
        loss, _ = grpo.loss(out, None, batch)
        loss.backward()
        grads = [p.grad.clone() for p in model.parameters()]
        return gather_tokens(batch, flat), float(loss.detach()), grads

    want_logps, want_loss, want_grads = run("padded")
    got_logps, got_loss, got_grads = run(layout)
    for a, b in zip(got_logps, want_logps, strict=True):
        np.testing.assert_allclose(a, b, rtol=2 * 2**-23, atol=1e-7)
    assert got_loss == pytest.approx(want_loss, abs=1e-6)
    for a, b in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=8 * 2**-23, atol=1e-7)


def _extra_args(batch):
    extra = batch.extra_targets
    return () if extra is None else (extra.index, extra.targets)


def test_micro_batches_carry_the_rollout_fields():
    comps = _completions()
    collate = CompletionCollator("packed", 16, 4)
    batches = micro_batches(comps, collate, 2, num_items=7.0, max_new_tokens=6,
                            with_sampler_logps=True)  # fmt: skip
    assert [b.num_sequences for b in batches] == [2, 2, 1]
    first, second = batches[0].rollout, batches[1].rollout
    assert first.advantages.tolist() == [-2.0, -1.0] and first.num_items == 7.0
    assert first.old_logps is not None and first.sampler_logps is not None
    assert second.old_logps is not None  # the masked truncated completion needs none
    assert batches[1].example_ids.tolist() == [12, 10]
    assert float(batches[1].loss_mask[batches[1].sequence_ids == 0].sum()) == 0.0


def test_buffer_survives_a_weights_only_checkpoint(tmp_path):
    comps = _completions()
    path = tmp_path / "state.pt"
    buf = io.BytesIO()
    torch.save(buffer_state(comps), buf)
    path.write_bytes(buf.getvalue())
    back = load_buffer(safe_load(path))
    for a, b in zip(comps, back, strict=True):
        assert (a.example, a.truncated, a.trained, a.advantage) == (
            b.example, b.truncated, b.trained, b.advantage,
        )  # fmt: skip
        for name in ("prompt", "tokens", "sampler_logps", "old_logps", "ref_logps"):
            x, y = getattr(a, name), getattr(b, name)
            assert (x is None and y is None) or np.array_equal(x, y), name


def test_a_group_longer_than_a_row_is_split_into_spans_that_fit():
    """Prompt 10 (3 tokens) with completions of 4 and 3 tokens: 10 tokens in one span; with
    rows of 8 the two completions go to two spans, each with the prompt."""
    comps = [c for c in _completions() if c.example == 10]
    wide = CompletionCollator("prefix_shared", 10, 1)(comps)
    narrow = CompletionCollator("prefix_shared", 8, 1)(comps)
    assert wide.tokens.shape[0] == 1 and narrow.tokens.shape[0] == 2
    assert narrow.extra_targets.index.numel() == 0  # each completion first in its span
    for batch in (wide, narrow):
        back = gather_tokens(batch, scatter_tokens(batch, [c.old_logps for c in comps]))
        for c, v in zip(comps, back, strict=True):
            np.testing.assert_array_equal(v, c.old_logps)
