"""``reward``: Bradley-Terry loss, margin, centering, z-loss and metrics against hand-worked values.

The running example, three pairs (chosen i pairs with rejected i):

    r_w = [3, 0.5, 1], r_l = [1, 1.5, 1], d = r_w - r_l = [2, -1, 0]
    L_BT = mean(-log sigma(d)) = (0.1269280 + 1.3132617 + 0.6931472) / 3 = 0.7111123
    data margins m = [1, -1, 0.5]: d - m = [1, 0, -0.5]
        mean(-log sigma(d - m)) = (0.3132617 + 0.6931472 + 0.9740770) / 3 = 0.6601620
    centering: mean((r_w + r_l)^2) = (16 + 4 + 4) / 3 = 8
    z-loss: logaddexp(r_w, r_l) = [3 + log(1 + e^-2), 1.5 + log(1 + e^-1), 1 + ln 2]
        = [3.1269280, 1.8132617, 1.6931472]; mean of squares (9.7776788 + 3.2879179
        + 2.8667474) / 3 = 5.3107814
    metrics: accuracy [1, 0, 0] (the tie counts as wrong) = 1/3; margin mean(d) = 1/3;
        mean_reward 8/6 = 1.3333333; reward_std (unbiased, 6 rewards) = sqrt(4.6 / 6) = 0.8755950;
        rewards/chosen 1.5, rewards/rejected 3.5/3 = 1.1666667
Tolerance: 1e-6 absolute.

The rewards are placed at the ``score_index`` the real :class:`~megatron.data.collators.Collator`
computes (every other position holds NaN, so a read elsewhere shows up); a tiny value-head model
then checks that padded and packed layouts score the same token.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from megatron.config import SectionError
from megatron.data.collators import Collator
from megatron.objectives import get_objective
from megatron.objectives.reward import Reward, RewardConfig, sequence_rewards
from tests.objectives.batches import scored_batch, sig

R_W = [3.0, 0.5, 1.0]
R_L = [1.0, 1.5, 1.0]
MARGIN = [1.0, -1.0, 0.5]
TOL = {"atol": 1e-6, "rtol": 0.0}
EOS = 2


def pair_samples(n: int, seed: int, margin: list[float] | None = None) -> list[dict]:
    """Random token pairs; every completion holds an EOS, sometimes followed by more tokens."""
    rng = np.random.default_rng(seed)

    def completion() -> np.ndarray:
        body = rng.integers(3, 64, size=int(rng.integers(1, 5)))
        tail = rng.integers(3, 64, size=int(rng.integers(0, 3)))
        return np.concatenate([body, [EOS], tail]).astype(np.int64)

    out = []
    for i in range(n):
        x = {"prompt": rng.integers(3, 64, size=int(rng.integers(1, 6))), "chosen": completion()}
        x["rejected"] = completion()
        if margin is not None:
            x["margin"] = margin[i]
        out.append(x)
    return out


def reward_batch(
    layout: str = "padded", margin: list[float] | None = None, score_token: str = "last"
) -> tuple[torch.Tensor, dict]:
    """``(values [b, s] leaf, batch)``: the running example's rewards at ``score_index``."""
    collate = Collator(
        "pair", layout, seq_length=24, pad_to_multiple_of=4, with_margin=margin is not None,
        score_token=score_token, eos_id=EOS,
    )  # fmt: skip
    batch = collate(pair_samples(3, seed=0, margin=margin))
    values = torch.full(batch.tokens.shape, float("nan"))
    values.view(-1)[batch.score_index] = torch.tensor(R_W + R_L)
    return values.requires_grad_(True), batch


def close(actual, expected: float) -> None:
    torch.testing.assert_close(actual, torch.tensor(expected), **TOL)


def test_registered_as_a_value_head_pair_objective():
    assert get_objective("reward") is Reward
    assert Reward.batch_kind == "pair" and Reward.model_head == "value"
    assert not Reward.needs_reference_model
    assert Reward(RewardConfig(score_token="eos")).collate_options() == {"score_token": "eos"}


@pytest.mark.parametrize(
    ("cfg", "match"),
    [
        ({"score_token": "first"}, r"RewardConfig.score_token: must be 'last' or 'eos'"),
        ({"center_rewards_coefficient": -0.1}, r"center_rewards_coefficient: must be >= 0"),
        ({"z_loss_coefficient": -1.0}, r"z_loss_coefficient: must be >= 0"),
    ],
)
def test_config_errors(cfg, match):
    with pytest.raises(SectionError, match=match):
        RewardConfig(**cfg)


CASES = [
    ({}, None, 0.7111123),
    ({}, MARGIN, 0.6601620),
    ({"use_margin": False}, MARGIN, 0.7111123),
    ({"center_rewards_coefficient": 0.01}, None, 0.7111123 + 0.01 * 8),
    ({"center_rewards_coefficient": 0.0}, None, 0.7111123),
    ({"z_loss_coefficient": 0.1}, None, 0.7111123 + 0.1 * 5.3107814),
    (
        {"center_rewards_coefficient": 0.01, "z_loss_coefficient": 0.1},
        MARGIN,
        0.6601620 + 0.01 * 8 + 0.1 * 5.3107814,
    ),
]


@pytest.mark.parametrize("layout", ["padded", "packed"])
@pytest.mark.parametrize(("cfg", "margin", "expected"), CASES)
def test_hand_worked_loss(cfg, margin, expected, layout):
    values, batch = reward_batch(layout, margin)
    assert (batch.margin is not None) == (margin is not None)
    loss, _ = Reward(RewardConfig(**cfg)).loss({"values": values}, None, batch)
    close(loss, expected)


def test_metrics():
    values, batch = reward_batch("packed", MARGIN)
    _, metrics = Reward(RewardConfig()).loss({"values": values}, None, batch)
    expected = {
        "accuracy": 1 / 3,
        "margin": 1 / 3,  # r_w - r_l, not shifted by the data's margin (as TRL)
        "mean_reward": 4 / 3,
        "reward_std": 0.8755950,
        "rewards/chosen": 1.5,
        "rewards/rejected": 3.5 / 3,
    }
    assert set(metrics) == set(expected)
    for key, value in expected.items():
        assert metrics[key].dim() == 0 and not metrics[key].requires_grad, key
        close(metrics[key], value)


def test_accuracy_is_strict():
    values = torch.tensor([[1.0, 1.0]])
    batch = scored_batch(torch.tensor([0, 1]))
    loss, metrics = Reward(RewardConfig()).loss({"values": values}, None, batch)
    close(metrics["accuracy"], 0.0)
    close(loss, 0.6931472)  # ln 2: the golden first step with equal rewards


@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_gradient_reaches_only_the_scored_positions(layout):
    """dL/dr_w = -(1 - sigma(d)) / P, dL/dr_l = +(1 - sigma(d)) / P; d = [2, -1, 0]:
    (1 - sigma(d)) / 3 = [0.0397343, 0.2436862, 0.1666667]."""
    values, batch = reward_batch(layout)
    loss, _ = Reward(RewardConfig()).loss({"values": values}, None, batch)
    loss.backward()
    grad = values.grad.reshape(-1)
    g = [(1 - sig(d)) / 3 for d in (2.0, -1.0, 0.0)]
    torch.testing.assert_close(torch.tensor(g), torch.tensor([0.0397343, 0.2436862, 1 / 6]), **TOL)
    torch.testing.assert_close(grad[batch.score_index], torch.tensor([-x for x in g] + g), **TOL)
    others = torch.ones_like(grad, dtype=torch.bool)
    others[batch.score_index] = False
    assert (grad[others] == 0).all()


# ----------------------------------------------------------------------------- real model


@pytest.fixture(scope="module")
def value_model():
    from megatron.config import ModelConfig
    from megatron.model import GPTModel
    from megatron.parallel import ParallelState

    cfg = ModelConfig(
        num_layers=2, hidden_size=32, num_attention_heads=4, num_kv_heads=2, vocab_size=64,
        make_vocab_size_divisible_by=32, max_position_embeddings=64, norm="rmsnorm",
        activation="swiglu", ffn_hidden_size=64, head="value",
    )  # fmt: skip
    return GPTModel(cfg, ParallelState.single(), seed=5).eval()


@torch.no_grad()
def _score_alone(model, tokens: np.ndarray, score_token: str) -> float:
    """The value at the scored token of one unpacked sequence (plain causal attention)."""
    k = tokens.size - 1 if score_token == "last" else int(np.flatnonzero(tokens == EOS)[-1])
    x = torch.from_numpy(tokens).long()[None]
    return float(model(x, None, torch.zeros_like(x))["values"][0, k])


@pytest.mark.parametrize("score_token", ["last", "eos"])
def test_padded_and_packed_score_the_same_token(value_model, score_token):

    samples = pair_samples(5, seed=4)
    assert any(x["chosen"][-1] != EOS for x in samples)  # "eos" and "last" differ here
    rewards, losses = {}, {}
    for layout in ("padded", "packed"):
        collate = Collator("pair", layout, 24, 4, score_token=score_token, eos_id=EOS)
        batch = collate(samples)
        seq_layout = batch.layout
        with torch.no_grad():
            values = value_model(batch.tokens, seq_layout, batch.targets)["values"]
        rewards[layout] = sequence_rewards(values, batch)
        losses[layout] = Reward(RewardConfig()).loss({"values": values}, None, batch)[0]
    alone = [
        _score_alone(value_model, np.concatenate([x["prompt"], x[side]]), score_token)
        for side in ("chosen", "rejected")
        for x in samples
    ]
    torch.testing.assert_close(rewards["padded"], torch.tensor(alone), atol=1e-5, rtol=0)
    torch.testing.assert_close(rewards["packed"], rewards["padded"], atol=1e-5, rtol=0)
    torch.testing.assert_close(losses["packed"], losses["padded"], atol=1e-6, rtol=0)
