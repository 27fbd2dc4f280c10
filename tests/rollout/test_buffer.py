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
from megatron.data.collators import Collator
from megatron.rollout.buffer import (
    Completion,
    buffer_state,
    gather_tokens,
    load_buffer,
    micro_batches,
    scatter_tokens,
)


def _completions() -> list[Completion]:
    rng = np.random.default_rng(0)
    out = []
    for i, (p, c) in enumerate([(3, 4), (5, 1), (2, 6), (4, 3), (1, 2)]):
        out.append(
            Completion(
                example=10 + i,
                prompt=rng.integers(1, 50, p),
                tokens=rng.integers(1, 50, c),
                sampler_logps=-rng.random(c).astype(np.float32),
                truncated=i == 2,
                trained=i != 2,  # a masked truncated completion: no targets
                advantage=float(i) - 2,
                old_logps=None if i == 2 else -rng.random(c).astype(np.float32),
            )
        )
    return out


@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_scatter_and_gather_are_inverse(layout):
    comps = _completions()
    batch = Collator("sequence", layout, 16, 4)([c.sample() for c in comps])
    grid = scatter_tokens(batch, [c.old_logps for c in comps])
    back = gather_tokens(batch, grid)
    for c, v in zip(comps, back, strict=True):
        want = c.old_logps if c.trained else np.zeros(0, np.float32)
        np.testing.assert_array_equal(v, want)
    # each value sits where the completion's token is the target
    for i, c in enumerate(comps):
        if c.trained:
            where = batch.sequence_ids == i
            assert batch.targets[where].tolist() == c.tokens.tolist()
            assert grid[where].tolist() == c.old_logps.tolist()
    with pytest.raises(ValueError, match="per-token values of sizes"):
        scatter_tokens(batch, [c.sampler_logps for c in comps])  # the masked one has 6 values


def test_micro_batches_carry_the_rollout_fields():
    comps = _completions()
    collate = Collator("sequence", "packed", 16, 4)
    batches = micro_batches(comps, collate, 2, num_items=7.0, max_new_tokens=6,
                            with_sampler_logps=True)  # fmt: skip
    assert [b.num_sequences for b in batches] == [2, 2, 1]
    first, second = batches[0].rollout, batches[1].rollout
    assert first.advantages.tolist() == [-2.0, -1.0] and first.num_items == 7.0
    assert first.old_logps is not None and first.sampler_logps is not None
    assert second.old_logps is not None  # the masked truncated completion needs none
    assert batches[1].example_ids.tolist() == [12, 13]
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
