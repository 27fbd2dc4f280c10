"""GlobalBatchSampler: DP sharding, grad-acc equivalence, determinism, resume, epochs."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from megatron.data.sampler import GlobalBatchSampler


def _steps(sampler: GlobalBatchSampler, n: int) -> list[list[list[int]]]:
    return list(itertools.islice(iter(sampler), n))


def _global_steps(n_steps, num_samples=100, micro=2, dp=2, ga=3, seed=5, **kw):
    """Per step, the concatenation over micro-steps k and ranks r (k-major) of micro-batches."""
    per_rank = [
        _steps(GlobalBatchSampler(num_samples, micro, dp, r, ga, seed, **kw), n_steps)
        for r in range(dp)
    ]
    return [
        [i for k in range(ga) for r in range(dp) for i in per_rank[r][s][k]] for s in range(n_steps)
    ]


def test_ranks_form_the_global_batch():
    sampler = GlobalBatchSampler(100, 2, 2, 0, 3, seed=5)
    order = sampler.epoch_order(0)
    steps = _global_steps(4)
    for s, batch in enumerate(steps):
        assert batch == order[s * 12 : (s + 1) * 12].tolist()
    one = _steps(GlobalBatchSampler(100, 2, 2, 1, 3, seed=5), 1)[0]
    assert len(one) == 3 and all(len(mb) == 2 for mb in one)
    assert one[1] == order[(1 * 2 + 1) * 2 : (1 * 2 + 2) * 2].tolist()


def test_no_duplicates_within_epoch():
    steps = _global_steps(8)  # 8 * 12 = 96 of 100 samples
    flat = [i for b in steps for i in b]
    assert len(flat) == len(set(flat)) == 96


def test_dp_and_grad_acc_splits_see_the_same_samples():
    dp2 = _global_steps(10, micro=4, dp=2, ga=1)
    ga2 = _global_steps(10, micro=4, dp=1, ga=2)
    assert [sorted(b) for b in dp2] == [sorted(b) for b in ga2]


def test_deterministic_and_seeded():
    assert _global_steps(3) == _global_steps(3)
    assert _global_steps(3) != _global_steps(3, seed=6)
    assert _global_steps(2, shuffle=False)[1] == list(range(12, 24))


@pytest.mark.parametrize("split", [1, 7, 8, 9, 13])
def test_resume_mid_epoch(split):
    def make():
        return GlobalBatchSampler(100, 2, 2, 1, 3, seed=5)

    reference = _steps(make(), 20)
    first = make()
    _steps(first, split)
    state = first.state_dict()
    assert state["consumed_samples"] == split * 12 == first.consumed_samples
    resumed = make()
    resumed.load_state_dict(state)
    assert _steps(resumed, 20 - split) == reference[split:]


def test_epoch_rollover_drop_last():
    sampler = GlobalBatchSampler(10, 2, 1, 0, 2, seed=0)  # global batch 4, 2 steps per epoch
    assert sampler.steps_per_epoch == 2
    steps = [[i for mb in s for i in mb] for s in _steps(sampler, 4)]
    e0, e1 = sampler.epoch_order(0), sampler.epoch_order(1)
    assert steps[0] + steps[1] == e0[:8].tolist()  # e0[8:10] dropped
    assert steps[2] + steps[3] == e1[:8].tolist()
    assert sampler.epoch == 1 and sampler.consumed_samples == 16
    assert not np.array_equal(e0, e1)


def test_epoch_rollover_keep_last():
    sampler = GlobalBatchSampler(10, 2, 1, 0, 2, seed=0, drop_last=False)
    assert sampler.steps_per_epoch == 3
    steps = [[i for mb in s for i in mb] for s in _steps(sampler, 4)]
    e0 = sampler.epoch_order(0).tolist()
    assert steps[2] == e0[8:10] + e0[0:2]  # tail completed from the epoch's start
    assert steps[3] == sampler.epoch_order(1)[:4].tolist()


def test_errors():
    with pytest.raises(ValueError, match=r"fewer than one global batch of 16"):
        GlobalBatchSampler(10, 2, 2, 0, 4, seed=0)
    with pytest.raises(ValueError, match=r"data_parallel_rank \(2\)"):
        GlobalBatchSampler(100, 2, 2, 2, 1, seed=0)
    sampler = GlobalBatchSampler(100, 2, 2, 0, 1, seed=0)
    state = sampler.state_dict() | {"seed": 1}
    with pytest.raises(ValueError, match="seed=1"):
        GlobalBatchSampler(100, 2, 2, 0, 1, seed=0).load_state_dict(state)
