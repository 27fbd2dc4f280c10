"""Parity of ``kto`` and ``reward`` with TRL 1.16's own loss code on the same inputs.

KTO: ``KTOTrainer._compute_loss`` (see ``trl_stubs.trl_kto``). Random per-token log-probs of 6
examples (completions of 1-6 tokens, both labels present) and of their KL sequences go to TRL in
its padded layout (the KL sequences as the sums its stubbed ``_compute_kl_logps`` returns) and to
our objective in the packed layout, examples and KL sequences sharing rows. Reference sums sit near
the policy's; the KL sequences' reference is shifted so that the KL estimate is positive for some
seeds and negative (clamped to 0) for others. Compared: the loss, ``kl``, ``rewards/chosen``,
``rewards/rejected``, ``logps/chosen``, ``logps/rejected`` (ours: ``sum / count``), for ``kto`` and
``apo_zero_unpaired``, with unit and non-unit desirable / undesirable weights.

Reward: ``RewardTrainer.compute_loss`` (see ``trl_stubs.trl_reward``) on random rewards, ours read
from a ``[b, s]`` value grid at a scattered ``score_index``. Compared: the loss, ``accuracy``,
``margin``, ``mean_reward``, with and without data margins (and ``use_margin: false`` against TRL
given no margin), with ``center_rewards_coefficient``, and with a tied pair (accuracy is strict in
both).

Tolerance: 2e-6 absolute + 2e-6 relative (fp32). Largest differences seen: KTO loss 1.2e-7,
``kl`` 0, ``rewards/*`` 1e-7, ``logps/*`` 6.4e-7 (sums of order 10, summed in another order);
reward: 0 for the loss and every metric (the same fp32 operations).

Known departures, not compared here (each is checked by hand in test_kto.py / test_reward.py):

- KTO's KL estimate is ``sum / count`` over the micro-batch's KL sequences, all-reduced over the
  data-parallel group; TRL takes the mean of each process's mean (``gather_for_metrics(kl).mean()``).
  The two are equal at DP = 1 (here) and whenever every rank has as many KL sequences.
- TRL rotates completions within the batch for its KL sequences; ours come from the dataset's
  fixed permutation cycle. Both are given the same KL sequences here.
- An example with no completion token: TRL keeps it (log-ratio 0); ours leaves it out.
- ``reference_free`` (KTO) and ``z_loss_coefficient`` / ``reward_std`` / ``score_token: eos``
  (reward) do not exist in TRL 1.16; TRL's ``min_reward`` / ``max_reward`` are not logged by us.
"""

from __future__ import annotations

import pytest
import torch

from megatron.objectives.kto import KTO, KTOConfig
from megatron.objectives.reward import Reward, RewardConfig
from tests.objectives.batches import scored_batch, unpaired_batch
from tests.objectives.trl_stubs import trl_kto, trl_reward

pytest.importorskip("trl", reason="TRL (the peer implementation) is not installed")

KTO_METRICS = ["kl", "rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected"]
REWARD_METRICS = ["accuracy", "margin", "mean_reward"]
# Derived (tests/numerics.py): the compared values are fp32 sums of <= 6 token log-probs in [-3, 0]
# (|S| < 32, ulp(S) <= 1.9e-6), summed in another order, and O(1) functions of them: both sides
# round each sum, <= ulp(S) apart, within 2e-6 + 2e-6 |value|. A wrong formula is off by > 1e-3.
TOL = {"atol": 2e-6, "rtol": 2e-6}


def _value(metric) -> float:
    """A metric as the number it logs: ``sum / count`` for a pair, the tensor otherwise."""
    if isinstance(metric, tuple):
        return float(metric[0] / metric[1])
    return float(metric)


def kto_data(seed: int, n: int = 6) -> dict:
    g = torch.Generator().manual_seed(seed)

    def seqs() -> list[list[float]]:
        lens = torch.randint(1, 7, (n,), generator=g).tolist()
        return [(-3 * torch.rand(k, generator=g)).tolist() for k in lens]

    labels = [True, False] + (torch.rand(n - 2, generator=g) > 0.5).tolist()
    completions, kl = seqs(), seqs()
    ref = [sum(c) + float(torch.randn(1, generator=g)) for c in completions]
    shift = 0.8 if seed % 2 == 0 else -0.8  # KL_hat around +0.8 (kept) or -0.8 (clamped)
    ref_kl = [sum(k) - shift + 0.5 * float(torch.randn(1, generator=g)) for k in kl]
    return {"completions": completions, "labels": labels, "kl": kl, "ref": ref, "ref_kl": ref_kl}


def compare_kto(seed: int, **cfg) -> dict[str, float]:
    """``{quantity: |ours - TRL|}``; asserts the tolerance."""
    d = kto_data(seed)
    objective = KTO(KTOConfig(beta=0.3, **cfg))
    with_kl = objective.uses_kl
    kl_sums = [sum(k) for k in d["kl"]]
    trl_loss, trl_metrics = trl_kto(
        d["completions"],
        d["labels"],
        d["ref"],
        kl_sums if with_kl else None,
        d["ref_kl"] if with_kl else None,
        beta=0.3,
        loss_type=cfg.get("loss_type", "kto"),
        desirable_weight=cfg.get("desirable_weight", 1.0),
        undesirable_weight=cfg.get("undesirable_weight", 1.0),
    )
    logps, batch = unpaired_batch(
        d["completions"], d["labels"], d["kl"] if with_kl else None, "packed"
    )
    reference = {
        "completion_logps": torch.tensor(d["ref"]),
        "kl_logps": torch.tensor(d["ref_kl"] if with_kl else []),
    }
    loss, metrics = objective.loss({"token_logps": logps}, reference, batch)
    ours = [float(loss.detach())] + [_value(metrics[k]) for k in KTO_METRICS]
    theirs = [trl_loss] + [trl_metrics[k] for k in KTO_METRICS]
    torch.testing.assert_close(torch.tensor(ours), torch.tensor(theirs), **TOL)
    return {k: abs(a - b) for k, a, b in zip(["loss", *KTO_METRICS], ours, theirs, strict=True)}


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize(
    "cfg",
    [
        {},
        {"desirable_weight": 1.33, "undesirable_weight": 0.75},
        {"loss_type": "apo_zero_unpaired"},
        {"loss_type": "apo_zero_unpaired", "desirable_weight": 0.5, "undesirable_weight": 2.0},
    ],
)
def test_kto(cfg, seed):
    compare_kto(seed, **cfg)


def test_kto_seeds_cover_both_sides_of_the_clamp():
    signs = set()
    for seed in (0, 1, 2, 3):
        d = kto_data(seed)
        kl = sum(sum(k) - r for k, r in zip(d["kl"], d["ref_kl"], strict=True)) / len(d["kl"])
        signs.add(kl > 0)
    assert signs == {True, False}


def reward_data(seed: int, pairs: int = 5) -> dict:
    g = torch.Generator().manual_seed(seed)
    chosen = (2 * torch.randn(pairs, generator=g)).tolist()
    rejected = (2 * torch.randn(pairs, generator=g)).tolist()
    rejected[0] = chosen[0]  # a tie: wrong in both (strict accuracy)
    margin = (2 * torch.rand(pairs, generator=g)).tolist()
    # ours reads the rewards from a value grid at scattered positions
    index = torch.randperm(3 * 16, generator=g)[: 2 * pairs]
    values = torch.full((3, 16), float("nan"))
    values.view(-1)[index] = torch.tensor(chosen + rejected)
    return {
        "chosen": chosen,
        "rejected": rejected,
        "margin": margin,
        "values": values,
        "index": index,
    }


def compare_reward(
    seed: int, with_margin: bool, trl_margin: bool, center: float | None, **cfg
) -> dict[str, float]:
    """``{quantity: |ours - TRL|}``; asserts the tolerance."""
    d = reward_data(seed)
    trl_loss, trl_metrics = trl_reward(
        d["chosen"],
        d["rejected"],
        margin=d["margin"] if trl_margin else None,
        center_rewards_coefficient=center,
    )
    batch = scored_batch(d["index"], torch.tensor(d["margin"]) if with_margin else None)
    objective = Reward(RewardConfig(center_rewards_coefficient=center, **cfg))
    loss, metrics = objective.loss({"values": d["values"].requires_grad_(True)}, None, batch)
    ours = [float(loss.detach())] + [_value(metrics[k]) for k in REWARD_METRICS]
    theirs = [trl_loss] + [trl_metrics[k] for k in REWARD_METRICS]
    torch.testing.assert_close(torch.tensor(ours), torch.tensor(theirs), **TOL)
    return {k: abs(a - b) for k, a, b in zip(["loss", *REWARD_METRICS], ours, theirs, strict=True)}


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize(
    ("with_margin", "trl_margin", "center", "cfg"),
    [
        (False, False, None, {}),
        (True, True, None, {}),
        (True, False, None, {"use_margin": False}),
        (False, False, 0.01, {}),
        (True, True, 0.5, {}),
    ],
)
def test_reward(seed, with_margin, trl_margin, center, cfg):
    compare_reward(seed, with_margin, trl_margin, center, **cfg)
