"""Grid invariance: the same losses for 10 steps at (TP, DP) in {1,2}^2 and ZeRO 0/1/2/3.

fp32 throughout. Tolerance: 2e-5 relative per step (TP changes the order of reductions and DP
the order of the gradient sums; everything else is identical). One spawned group per world size
runs every grid of that size in-process.
"""

from __future__ import annotations

import math

import pytest

from tests.dist_pool import DistPool
from tests.training.helpers import run_config, write_config, write_markov_corpus

ZERO = [0, 1, 2, 3]
RTOL = 2e-5


def _train(rank, world, cfg_path, tp, zero):
    from megatron.config import load_config
    from megatron.training.trainer import Trainer

    cfg = load_config([cfg_path], [f"parallel.tensor={tp}", f"parallel.zero_stage={zero}"], world)
    return Trainer(cfg).train()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("grid")
    prefix = write_markov_corpus(tmp / "corpus")
    cfg_path = write_config(tmp / "run.yml", run_config(tmp, prefix))
    results = {}
    for world, grids in [(1, [1]), (2, [1, 2]), (4, [2])]:
        pool = DistPool(world)
        try:
            for tp in grids:
                for zero in ZERO:
                    results[(tp, world // tp, zero)] = pool.run(_train, str(cfg_path), tp, zero)
        finally:
            pool.close()
    return results


def test_losses_fall(setup):
    losses = setup[(1, 1, 0)][0]
    assert len(losses) == 10
    assert losses[0] == pytest.approx(math.log(120), rel=0.05)  # near-uniform start
    assert losses[-1] < losses[0] - 0.3


@pytest.mark.parametrize("tp,dp", [(1, 1), (2, 1), (1, 2), (2, 2)])
@pytest.mark.parametrize("zero", ZERO)
def test_same_losses_on_every_grid(setup, tp, dp, zero):
    ref = setup[(1, 1, 0)][0]
    for rank_losses in setup[(tp, dp, zero)]:
        assert rank_losses == pytest.approx(ref, rel=RTOL), f"tp={tp} dp={dp} zero={zero}"
