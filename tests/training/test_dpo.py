"""DPO end to end on the engine: golden first step, reference model vs cache, layouts, grids.

fp32, a tiny Llama-style model on a 64-pair conversational dataset (ChatML template, byte-level
BPE). The reference is the policy's seeded initialisation, so the first step has reference ==
policy: sigmoid loss ln 2 and zero rewards.
"""

from __future__ import annotations

import math

import pytest

from megatron.config import load_config
from megatron.data.preprocess import PreprocessOptions, preprocess
from megatron.training.preflight import preflight
from tests.data.conftest import CHATML, conversational_pairs, write_jsonl
from tests.dist_pool import DistPool
from tests.helpers_runs import tiny_run_config
from tests.numerics import ulp
from tests.training.helpers import precompute_in_pool, start_error_in_pool, write_config

# Tolerances across grids, caches and layouts; error model in tests/numerics.py. logps/* are
# fp32 sums S of token log-probs (|S| < LOGP_SUM_MAX on this data, checked in _assert_same;
# measured <= 240), each rounded differently on two runs (<= ulp(S)/2 = 1.5e-5 each); rewards are
# beta * (S_policy - S_reference) and a margin the difference of two rewards, so a margin carries
# 4 sums x 2 runs of rounding: REWARD_ATOL = beta * 4 ulp(S) = 1.2e-5 (absolute: a small margin
# is no more accurate). The sigmoid loss has |d loss / d margin| <= 1: LOSS_ATOL = REWARD_ATOL.
# Measured over 6 steps at lr 2e-3: margins <= 1.5e-6, losses <= 8e-7 (Adam's amplification of
# gradient round-off included). A real bug moves the loss by > 1e-3.
RTOL = 1e-5
BETA = 0.1
LOGP_SUM_MAX = 500.0
LOGP_ATOL = ulp(LOGP_SUM_MAX)
REWARD_ATOL = BETA * 4 * ulp(LOGP_SUM_MAX)
LOSS_ATOL = REWARD_ATOL


def _atol(key: str) -> float:
    return {"logps": LOGP_ATOL, "rewards": REWARD_ATOL}.get(key.split("/")[0], LOSS_ATOL)


def _assert_same(got: list[dict], want: list[dict], label: object = "") -> None:
    """Two runs' logged steps agree to the tolerances above."""
    assert len(got) == len(want), label
    for step, (a, b) in enumerate(zip(got, want, strict=True), 1):
        for k in b:
            if k.startswith("logps/"):
                assert abs(b[k]) < LOGP_SUM_MAX, (label, k, "LOGP_ATOL assumes smaller sums")
            assert a[k] == pytest.approx(b[k], rel=RTOL, abs=_atol(k)), (label, step, k)


def _train(rank, world, cfg_path, overrides):
    from megatron.config import load_config
    from megatron.training.trainer import Trainer

    history = Trainer(load_config([cfg_path], overrides, world)).train()
    return [
        {k: v for k, v in h.items() if k.startswith(("loss", "rewards", "logps"))} for h in history
    ]


@pytest.fixture(scope="module")
def env(tmp_path_factory, tiny_tokenizer_dir):
    tmp = tmp_path_factory.mktemp("dpo")
    (tmp / "chatml.jinja").write_text(CHATML)
    options = PreprocessOptions(data_format="pairwise", chat_template=str(tmp / "chatml.jinja"))
    preprocess(
        [write_jsonl(tmp / "train.jsonl", conversational_pairs(64))],
        tmp / "train",
        tiny_tokenizer_dir,
        options,
    )
    preprocess(
        [write_jsonl(tmp / "valid.jsonl", conversational_pairs(16, seed=5))],
        tmp / "valid",
        tiny_tokenizer_dir,
        options,
    )
    # 8 pairs: two steps per epoch, so a short run revisits its pairs and must fit them
    preprocess(
        [write_jsonl(tmp / "small.jsonl", conversational_pairs(8, seed=9))],
        tmp / "small",
        tiny_tokenizer_dir,
        options,
    )
    cfg = tiny_run_config(
        "chat",
        train=tmp / "train",
        valid=tmp / "valid",
        tokenizer=tiny_tokenizer_dir,
        logs=tmp / "logs",
        objective={"name": "dpo", "beta": BETA},
        **{"training.train_iters": 6},
    )
    pools = {w: DistPool(w) for w in (1, 2)}
    yield tmp, str(write_config(tmp / "dpo.yml", cfg)), pools
    for p in pools.values():
        p.close()


def test_golden_first_step_and_learning(env):
    tmp, cfg, pools = env
    small = [f"data.train=[{{path: {tmp / 'small'}}}]", "training.train_iters=12"]
    hist = pools[1].run(_train, cfg, small)[0]
    assert hist[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert hist[0]["rewards/chosen"] == pytest.approx(0, abs=1e-6)
    assert hist[0]["rewards/margins"] == pytest.approx(0, abs=1e-6)
    # the 8 pairs are seen 6 times: the policy must separate them
    assert max(h["loss"] for h in hist[-2:]) < math.log(2) - 0.1
    assert min(h["rewards/accuracies"] for h in hist[-2:]) == 1.0


def test_cache_equals_coresident_reference_and_mismatch_is_refused(env):
    tmp, cfg, pools = env
    model_path = pools[1].run(_train, cfg, [])[0]
    cache = tmp / "ref_cache"
    # computed on another grid (TP=2) than the one it is used on (TP=1)
    pools[2].run(precompute_in_pool, cfg, ["parallel.tensor=2", f"reference.cache={cache}"])
    cached = pools[1].run(_train, cfg, [f"reference.cache={cache}"])[0]
    _assert_same(cached, model_path, "cache")
    # the same cache for another reference (other seed -> other initial weights) is refused
    err = pools[1].run(start_error_in_pool, cfg, [f"reference.cache={cache}", "training.seed=4"])[0]
    assert err and "was computed for different weights" in err
    # deepy.py finds it before launching anything (preflight), as one line
    stale = preflight(load_config([cfg], [f"reference.cache={cache}", "training.seed=4"]))
    assert [p for p in stale if p.startswith("reference.cache:")] == [
        f"reference.cache: {cache} was computed for different weights than this run (the "
        "fingerprints differ); recompute it with tools/precompute_reference.py"
    ]
    fresh = preflight(load_config([cfg], [f"reference.cache={cache}"]))
    assert not [p for p in fresh if p.startswith("reference.cache:")]
    # ... and for another reduction of the token log-probs (LD-DPO)
    err = pools[1].run(
        start_error_in_pool, cfg, [f"reference.cache={cache}", "objective.ld_alpha=0.5"]
    )[0]
    assert err and "different objective" in err


def test_wpo_weights_come_from_the_engine(env):
    """use_weighting needs log sum_v p_v^2 per token, computed inside the chunked log-probs."""
    _, cfg, pools = env
    hist = pools[1].run(_train, cfg, ["objective.use_weighting=true", "training.train_iters=2"])[0]
    assert all(math.isfinite(h["loss"]) for h in hist)
    plain = pools[1].run(_train, cfg, ["training.train_iters=2"])[0]
    assert hist[0]["loss"] != pytest.approx(plain[0]["loss"], abs=1e-9)  # weights < 1 scale it


def test_packed_equals_padded(env):
    _, cfg, pools = env
    padded = pools[1].run(_train, cfg, ["data.layout=padded"])[0]
    packed = pools[1].run(_train, cfg, ["data.layout=packed"])[0]
    _assert_same(packed, padded, "packed")


@pytest.mark.parametrize("grid", ["tp2", "dp2", "tp2-zero3", "dp2-zero3"])
def test_same_losses_across_grids(env, grid):
    _, cfg, pools = env
    ref = pools[1].run(_train, cfg, ["parallel.zero_stage=1"])[0]
    ov = {"tp2": ["parallel.tensor=2"], "dp2": []}[grid.split("-")[0]]
    ov.append(f"parallel.zero_stage={3 if grid.endswith('zero3') else 1}")
    for rank_hist in pools[2].run(_train, cfg, ov):
        _assert_same([{"loss": h["loss"]} for h in rank_hist], [{"loss": h["loss"]} for h in ref])


def test_pipeline_with_cache(env):
    tmp, cfg, pools = env
    cache = tmp / "ref_cache_pp"
    pools[1].run(precompute_in_pool, cfg, [f"reference.cache={cache}"])
    ref = pools[1].run(_train, cfg, [])[0]
    for rank_hist in pools[2].run(_train, cfg, ["parallel.pipeline=2", f"reference.cache={cache}"]):
        _assert_same([{"loss": h["loss"]} for h in rank_hist], [{"loss": h["loss"]} for h in ref])


def _without_accuracy(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in h.items() if k != "rewards/accuracies"} for h in history]


@pytest.mark.parametrize(
    "grid", ["tp1", "tp2", "dp2-zero3", "pp2-cache", "packed-tp1", "packed-tp2-zero1"]
)
def test_prefix_shared_equals_padded(env, grid):
    """data.layout: prefix_shared trains the same run as padded, on every grid (the prompt is
    computed once, the losses and implicit rewards are those of the padded rows to the tolerances
    above). ``pp2-cache``: pipeline messages carry the extra targets, and a reference cache
    computed under ``padded`` serves ``prefix_shared`` (its key leaves the layout out).
    ``packed-*``: ``prefix_shared_packed`` (the default), spans packed per row and attended per
    span."""
    tmp, cfg, pools = env
    want = pools[1].run(_train, cfg, ["data.layout=padded"])[0]
    shared = ["data.layout=prefix_shared"]
    if grid == "packed-tp1":
        runs = pools[1].run(_train, cfg, ["data.layout=prefix_shared_packed"])
    elif grid == "packed-tp2-zero1":
        packed = ["data.layout=prefix_shared_packed", "parallel.tensor=2"]
        runs = pools[2].run(_train, cfg, [*packed, "parallel.zero_stage=1"])
    elif grid == "tp1":
        runs = pools[1].run(_train, cfg, shared)
    elif grid == "tp2":
        runs = pools[2].run(_train, cfg, [*shared, "parallel.tensor=2"])
    elif grid == "dp2-zero3":
        runs = pools[2].run(_train, cfg, [*shared, "parallel.zero_stage=3"])
    else:
        cache = tmp / "ref_cache_padded"
        if not (cache / "meta.json").is_file():
            pools[1].run(
                precompute_in_pool, cfg, ["data.layout=padded", f"reference.cache={cache}"]
            )
        runs = pools[2].run(
            _train, cfg, [*shared, "parallel.pipeline=2", f"reference.cache={cache}"]
        )
        # why: at step 1 the policy is its reference: rewards are 0 up to round-off between
        # the cache's layout and this one, and accuracy (reward_w > reward_l, strict) is a coin
        # toss on those last bits -- every other value is compared
        runs, want = [_without_accuracy(r) for r in runs], _without_accuracy(want)
    for rank_hist in runs:
        _assert_same(rank_hist, want, grid)
