"""Grid invariance: the same losses and gradient norms for 10 steps on every parallel grid.

Grids: (TP, DP) in {1,2}^2 x ZeRO 0/1/2/3 without pipeline parallelism, and with PP=2:
(TP, PP, DP) in {(1,2,1), (2,2,1), (1,2,2)} x ZeRO 0/1 (DeepSpeed's pipeline engine refuses
ZeRO >= 2). Tied input/output embeddings are checked separately at PP=2 (the tied weight lives on
the first and last stage and its gradients are summed across them).

fp32 throughout; the tolerance is derived next to ``RTOL``. One spawned group per world size runs
every grid of that size in-process.
"""

from __future__ import annotations

import math

import pytest

from tests.dist_pool import DistPool
from tests.training.helpers import run_config, write_config, write_markov_corpus

ZERO = [0, 1, 2, 3]
# Tolerance (error model: tests/numerics.py), relative, per step, for losses and gradient norms.
# TP changes the order of reductions and DP/ZeRO/PP that of the gradient sums; nothing else
# differs. The loss is a mean of T = 128 token cross-entropies (~ln 120 = 4.8), each from dot
# products of h <= 64 terms and a V = 128 log-sum-exp that TP splits: random rounding gives
# ~sqrt(h + V + T) u = 18 u = 1.1e-6. The gradient norm is a pairwise sum over P = 2.7e4 squares
# (log2(P) / 2 u = 7 u) of gradients that are T-token sums (sqrt(T) u = 11 u): ~1.1e-6. From
# step 2 the weights differ too: Adam moves each by ~lr whatever its gradient, so round-off can
# pick the direction of coordinates whose gradient is ~0 -- which, to first order, do not move
# the loss. RTOL = 2e-6, twice the estimates (measured here: <= 1.1e-7 for losses, 2.1e-7 for
# norms; a real bug changes a loss by > 1e-3).
RTOL = 2e-6
GRIDS = {  # world size -> (tp, pp, zero stages)
    1: [(1, 1, ZERO)],
    2: [(1, 1, ZERO), (2, 1, ZERO), (1, 2, [0, 1])],
    4: [(2, 1, ZERO), (2, 2, [0, 1]), (1, 2, [0, 1])],
}


def _train(rank, world, cfg_path, overrides):
    from megatron.config import load_config
    from megatron.training.trainer import Trainer

    cfg = load_config([cfg_path], overrides, world)
    return [(v["loss"], v["grad_norm"]) for v in Trainer(cfg).train()]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("grid")
    prefix = write_markov_corpus(tmp / "corpus")
    cfg_path = str(write_config(tmp / "run.yml", run_config(tmp, prefix)))
    results = {}
    for world, grids in GRIDS.items():
        pool = DistPool(world)
        try:
            for tp, pp, zeros in grids:
                for zero in zeros:
                    ov = [
                        f"parallel.tensor={tp}",
                        f"parallel.pipeline={pp}",
                        f"parallel.zero_stage={zero}",
                    ]
                    results[(tp, pp, world // (tp * pp), zero)] = pool.run(_train, cfg_path, ov)
            if world in (1, 2):  # tied embeddings: serial vs PP=2
                pp = world
                results[("tied", pp)] = pool.run(
                    _train, cfg_path, ["model.tie_word_embeddings=true", f"parallel.pipeline={pp}"]
                )
        finally:
            pool.close()
    return results


def test_losses_fall(setup):
    losses = [loss for loss, _ in setup[(1, 1, 1, 0)][0]]
    assert len(losses) == 10
    assert losses[0] == pytest.approx(math.log(120), rel=0.05)  # near-uniform start
    assert losses[-1] < losses[0] - 0.3


def _assert_same(values, ref, label):
    ref_loss, ref_norm = zip(*ref, strict=True)
    for rank_values in values:
        loss, norm = zip(*rank_values, strict=True)
        assert loss == pytest.approx(ref_loss, rel=RTOL), label
        assert norm == pytest.approx(ref_norm, rel=RTOL), f"grad norm {label}"


@pytest.mark.parametrize(
    "tp,pp,dp,zero",
    [(tp, 1, dp, z) for tp, dp in [(1, 1), (2, 1), (1, 2), (2, 2)] for z in ZERO]
    + [(tp, 2, dp, z) for tp, dp in [(1, 1), (2, 1), (1, 2)] for z in (0, 1)],
)
def test_same_losses_and_grad_norms_on_every_grid(setup, tp, pp, dp, zero):
    """Losses, and the global gradient norm (DeepSpeed's under ZeRO, ours at ZeRO-0)."""
    _assert_same(
        setup[(tp, pp, dp, zero)], setup[(1, 1, 1, 0)][0], f"tp={tp} pp={pp} dp={dp} zero={zero}"
    )


def test_tied_embeddings_across_pipeline_stages(setup):
    _assert_same(setup[("tied", 2)], setup[("tied", 1)][0], "tied, pp=2")
