"""Reward models as online RL rewards: a native ``model.head: value`` checkpoint built on the
run's TP layout, and its Hugging Face ``*ForSequenceClassification`` export, score prompt +
completion as ``tools/score.py`` does (the same tokens as pairwise preprocessing).

A random Llama reward model (vocab 512, the tests' tokenizer), converted at TP = 2. Native vs
export vs ``megatron.scoring`` agree to fp32 round-off of the same forward (TOL 1e-5, as
tests/ckpt/test_reward_export.py measures); TP = 2 in a real group equals TP = 1 likewise.
"""

from __future__ import annotations

import shutil

import pytest
import torch

from megatron.ckpt.convert import convert_hf_to_native, convert_native_to_hf
from megatron.parallel import ParallelState
from megatron.rollout.reward_models import ModelReward
from megatron.rollout.rewards import RewardError
from tests.ckpt.hf_models import hf_config, save_random_classifier, save_random_model
from tests.dist_pool import DistPool
from tests.tools.helpers import checkpoint_config

TOL = 1e-5
PROMPTS = ["The quick brown fox", "Why is the sky", "Name a colour:"]
COMPLETIONS = [" jumps over the lazy dog.", " blue?", " Red"]


def make_reward_model(root, tokenizer_dir):
    """``(native TP=2 checkpoint, its HF export)`` of a random Llama reward model (vocab 512)."""
    cfg = hf_config("llama3", num_labels=1, pad_token_id=1, vocab_size=512)
    save_random_classifier(cfg, root / "hf", seed=0)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(tokenizer_dir / name, root / "hf" / name)
    native = root / "native"
    convert_hf_to_native(root / "hf", native, tp_size=2)
    export = convert_native_to_hf(
        native, root / "export", config=checkpoint_config(native), extras_dir=native / "hf"
    )
    return native, export


@pytest.fixture(scope="module")
def reward_models(tiny_tokenizer_dir, tmp_path_factory):
    return make_reward_model(tmp_path_factory.mktemp("rm"), tiny_tokenizer_dir)


def test_native_and_exported_reward_models_agree_with_score(reward_models):
    from megatron.scoring import RowEncoder, open_reward_model, score_records
    from megatron.tokenizer import load_tokenizer

    native, export = reward_models
    cpu = torch.device("cpu")
    ours = ModelReward(str(native), ParallelState.single(), cpu)(PROMPTS, COMPLETIONS)
    hf = ModelReward(str(export), ParallelState.single(), cpu)(PROMPTS, COMPLETIONS)
    records = [
        (f"row {i}", {"prompt": p, "completion": c})
        for i, (p, c) in enumerate(zip(PROMPTS, COMPLETIONS, strict=True))
    ]
    encoder = RowEncoder(load_tokenizer(str(export)))
    scored = score_records(open_reward_model(export), encoder, records)
    for a, b, c in zip(ours, hf, scored, strict=True):
        assert abs(a - b) <= TOL and abs(b - c) <= TOL
    assert len({round(x, 5) for x in ours}) == len(PROMPTS)  # the completions differ


def test_reward_model_errors(reward_models, tmp_path):
    native, _ = reward_models
    cpu = torch.device("cpu")
    with pytest.raises(RewardError, match="reward model .*: neither a Hugging Face model"):
        ModelReward(str(tmp_path), ParallelState.single(), cpu)
    lm = tmp_path / "lm"  # a language model, not a reward model
    save_random_model(hf_config("llama3"), tmp_path / "lm_hf", seed=1)
    convert_hf_to_native(tmp_path / "lm_hf", lm, tp_size=1)
    with pytest.raises(RewardError, match=r"model\.head is 'lm' in .*config\.yml; a reward model"):
        ModelReward(str(lm), ParallelState.single(), cpu)
    cut = ModelReward(str(native), ParallelState.single(), cpu, max_length=24)
    scores = cut(PROMPTS, COMPLETIONS)  # prompts are cut from the left to fit
    assert all(isinstance(s, float) for s in scores)
    too_short = ModelReward(str(native), ParallelState.single(), cpu, max_length=4)
    with pytest.raises(RewardError, match=r"completion 0: .*the completion alone does not fit"):
        too_short(PROMPTS, COMPLETIONS)


def _tp2_scores(rank, world, native):
    from megatron.parallel import ParallelState

    state = ParallelState.build(2)
    return ModelReward(native, state, torch.device("cpu"))(PROMPTS, COMPLETIONS)


def test_tp2_reward_model_equals_tp1(reward_models):
    native, _ = reward_models
    serial = ModelReward(str(native), ParallelState.single(), torch.device("cpu"))
    want = serial(PROMPTS, COMPLETIONS)
    pool = DistPool(2)
    try:
        per_rank = pool.run(_tp2_scores, str(native))
    finally:
        pool.close()
    for got in per_rank:
        assert max(abs(a - b) for a, b in zip(got, want, strict=True)) <= TOL
