"""DPO end to end on the engine: golden first step, reference model vs cache, layouts, grids.

fp32, a tiny Llama-style model on a 64-pair conversational dataset (ChatML template, byte-level
BPE). The reference is the policy's seeded initialisation, so the first step has reference ==
policy: sigmoid loss ln 2 and zero rewards.
"""

from __future__ import annotations

import math

import pytest

from megatron.data.preprocess import PreprocessOptions, preprocess
from tests.data.conftest import CHATML, conversational_pairs, write_jsonl
from tests.dist_pool import DistPool
from tests.training.helpers import precompute_in_pool, start_error_in_pool, write_config

RTOL = 1e-5


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
    cfg = {
        "model": {
            "num_layers": 2,
            "hidden_size": 32,
            "num_attention_heads": 4,
            "num_kv_heads": 2,
            "vocab_size": 512,
            "make_vocab_size_divisible_by": 64,
            "max_position_embeddings": 512,
            "norm": "rmsnorm",
            "activation": "swiglu",
        },
        "data": {
            "train": [{"path": str(tmp / "train")}],
            "valid": [{"path": str(tmp / "valid")}],
            "seq_length": 512,
            "tokenizer": str(tiny_tokenizer_dir),
        },
        "objective": {"name": "dpo", "beta": 0.1},
        "optimizer": {"lr": 2e-3},
        "schedule": {"style": "constant"},
        "training": {"train_iters": 6, "micro_batch_size": 2, "global_batch_size": 4, "seed": 3},
        "logging": {"log_interval": 1, "dir": str(tmp / "logs")},
    }
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
    for a, b in zip(cached, model_path, strict=True):
        for k in b:
            assert a[k] == pytest.approx(b[k], rel=RTOL, abs=1e-6), k
    # the same cache for another reference (other seed -> other initial weights) is refused
    err = pools[1].run(start_error_in_pool, cfg, [f"reference.cache={cache}", "training.seed=4"])[0]
    assert err and "was computed for different weights" in err
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
    for a, b in zip(packed, padded, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=RTOL)
        assert a["rewards/margins"] == pytest.approx(b["rewards/margins"], rel=1e-4, abs=1e-6)


@pytest.mark.parametrize("grid", ["tp2", "dp2", "tp2-zero3", "dp2-zero3"])
def test_same_losses_across_grids(env, grid):
    _, cfg, pools = env
    ref = pools[1].run(_train, cfg, ["parallel.zero_stage=1"])[0]
    ov = {"tp2": ["parallel.tensor=2"], "dp2": []}[grid.split("-")[0]]
    ov.append(f"parallel.zero_stage={3 if grid.endswith('zero3') else 1}")
    for rank_hist in pools[2].run(_train, cfg, ov):
        assert [h["loss"] for h in rank_hist] == pytest.approx([h["loss"] for h in ref], rel=RTOL)


def test_pipeline_with_cache(env):
    tmp, cfg, pools = env
    cache = tmp / "ref_cache_pp"
    pools[1].run(precompute_in_pool, cfg, [f"reference.cache={cache}"])
    ref = pools[1].run(_train, cfg, [])[0]
    for rank_hist in pools[2].run(_train, cfg, ["parallel.pipeline=2", f"reference.cache={cache}"]):
        assert [h["loss"] for h in rank_hist] == pytest.approx([h["loss"] for h in ref], rel=RTOL)
