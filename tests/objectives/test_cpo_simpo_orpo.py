"""``cpo``, ``simpo``, ``orpo``: hand-worked values, edge cases and gradient sanity.

Running example (beta = 0.5), the same per-token log-probs as test_dpo.py:

    pair 0: chosen [-1, -2]  sum -3, mean -1.5    rejected [-2, -2, -2]  sum -6, mean -2
    pair 1: chosen [-4]      sum -4, mean -4      rejected [-0.5, -1.5]  sum -2, mean -1

NLL of the chosen tokens (token mean over the micro-batch) = (1 + 2 + 4) / 3 = 7/3.
-log sigma(1.5) = 0.2014133, -log sigma(-1) = 1.3132617, -log sigma(-1.5) = 1.7014133,
-log sigma(1) = 0.3132617. Tolerance 1e-6 absolute.
"""

from __future__ import annotations

import pytest
import torch

from megatron.objectives import get_objective
from megatron.objectives.cpo import CPO, CPOConfig
from megatron.objectives.orpo import ORPO, ORPOConfig, log1mexp
from megatron.objectives.simpo import SimPO, SimPOConfig
from tests.objectives.batches import pair_batch

CHOSEN = [[-1.0, -2.0], [-4.0]]
REJECTED = [[-2.0, -2.0, -2.0], [-0.5, -1.5]]
NLL = 7.0 / 3.0
TOL = {"atol": 1e-6, "rtol": 0.0}


def run(objective, layout="padded", chosen=CHOSEN, rejected=REJECTED):
    logps, batch = pair_batch(chosen, rejected, layout)
    loss, metrics = objective.loss({"token_logps": logps}, None, batch)
    return loss, metrics, logps


CASES = [
    # sigmoid on sums: u = [-3 + 6, -4 + 2] = [3, -2], beta u = [1.5, -1]
    # mean(0.2014133, 1.3132617) + 1 * 7/3 = 0.7573375 + 2.3333333
    (CPO(CPOConfig(beta=0.5)), 3.0906708),
    # cpo_alpha = 0 leaves the pair loss alone
    (CPO(CPOConfig(beta=0.5, cpo_alpha=0.0)), 0.7573375),
    # label smoothing 0.1: 0.9 * 0.2014133 + 0.1 * 1.7014133 = 0.3514133;
    # 0.9 * 1.3132617 + 0.1 * 0.3132617 = 1.2132617; mean 0.7823375
    (CPO(CPOConfig(beta=0.5, cpo_alpha=0.0, label_smoothing=0.1)), 0.7823375),
    # hinge on sums: relu(1 - 1.5) = 0, relu(1 + 1) = 2; mean 1
    (CPO(CPOConfig(beta=0.5, cpo_alpha=0.0, loss_type="hinge")), 1.0),
    # ipo on token means: u = [-1.5 + 2, -4 + 1] = [0.5, -3]; 1/(2 beta) = 1
    # (0.5 - 1)^2 = 0.25, (-3 - 1)^2 = 16; mean 8.125
    (CPO(CPOConfig(beta=0.5, cpo_alpha=0.0, loss_type="ipo")), 8.125),
    # simpo on token means: u - gamma/beta = [0.5 - 1, -3 - 1]; beta * that = [-0.25, -2]
    # -log sigma(-0.25) = 0.8259394, -log sigma(-2) = 2.1269280; mean 1.4764337
    (CPO(CPOConfig(beta=0.5, cpo_alpha=0.0, loss_type="simpo")), 1.4764337),
    (SimPO(SimPOConfig(beta=0.5)), 1.4764337),
    # CPO-SimPO: + 7/3
    (SimPO(SimPOConfig(beta=0.5, cpo_alpha=1.0)), 1.4764337 + NLL),
    # AlphaPO (alpha = 0.5) on token means: r(l) = (1 - e^(-l/2)) / 0.5
    # r(-1.5) = -2.2340000, r(-2) = -3.4365637, r(-4) = -12.7781122, r(-1) = -1.2974425
    # u = [1.2025636, -11.4806697]; beta (u - 1) = [0.1012818, -6.2403348]
    # -log sigma: [0.6437880, 6.2422821]; mean 3.4430351
    (SimPO(SimPOConfig(beta=0.5, alpha=0.5)), 3.4430351),
    # ORPO, beta = 0.5, token means l: log odds = l - log(1 - e^l)
    # log(1 - e^l): l=-1.5: -0.2524825, -2: -0.1454135, -4: -0.0184854, -1: -0.4586751
    # pair 0: (-1.5 + 0.2524825) - (-2 + 0.1454135) = 0.6070690
    # pair 1: (-4 + 0.0184854) - (-1 + 0.4586751) = -3.4401897
    # log sigma: [-0.4349888, -3.4717452]; mean -1.9533670
    # loss = 7/3 - 0.5 * (-1.9533670) = 3.3100168
    (ORPO(ORPOConfig(beta=0.5)), 3.3100168),
]


@pytest.mark.parametrize("layout", ["padded", "packed"])
@pytest.mark.parametrize(
    ("objective", "expected"), CASES, ids=lambda x: repr(getattr(x, "config", x))
)
def test_hand_worked(objective, expected, layout):
    loss, metrics, logps = run(objective, layout)
    torch.testing.assert_close(loss, torch.tensor(expected), **TOL)
    torch.testing.assert_close(metrics["nll_loss"], torch.tensor(NLL), **TOL)
    assert all(not v.requires_grad for v in metrics.values())
    loss.backward()
    mask = pair_batch(CHOSEN, REJECTED, layout)[1].loss_mask > 0
    assert torch.isfinite(logps.grad).all() and (logps.grad[~mask] == 0).all()
    assert logps.grad[mask].abs().sum() > 0


def test_cpo_metrics():
    """sigmoid on sums: rewards beta * sums: chosen [-1.5, -2] -> -1.75, rejected [-3, -1] -> -2;
    accuracy [-1.5 > -3, -2 > -1] = 0.5; margins [1.5, -1] -> 0.25; logps sums -3.5 / -4."""
    _, m, _ = run(CPO(CPOConfig(beta=0.5)))
    expected = {
        "rewards/chosen": -1.75,
        "rewards/rejected": -2.0,
        "rewards/accuracies": 0.5,
        "rewards/margins": 0.25,
        "logps/chosen": -3.5,
        "logps/rejected": -4.0,
        "nll_loss": NLL,
    }
    assert set(m) == set(expected)
    for key, value in expected.items():
        torch.testing.assert_close(m[key], torch.tensor(value), **TOL)


def test_simpo_metrics_use_token_means():
    """rewards beta * means: chosen [-0.75, -2] -> -1.375, rejected [-1, -0.5] -> -0.75."""
    _, m, _ = run(SimPO(SimPOConfig(beta=0.5)))
    torch.testing.assert_close(m["rewards/chosen"], torch.tensor(-1.375), **TOL)
    torch.testing.assert_close(m["rewards/rejected"], torch.tensor(-0.75), **TOL)
    torch.testing.assert_close(m["logps/chosen"], torch.tensor(-2.75), **TOL)


def test_orpo_metrics():
    _, m, _ = run(ORPO(ORPOConfig(beta=0.5)))
    torch.testing.assert_close(m["log_odds_ratio"], torch.tensor(-1.9533670), **TOL)
    torch.testing.assert_close(m["log_odds_chosen"], torch.tensor(-1.4165603), **TOL)
    torch.testing.assert_close(m["rewards/chosen"], torch.tensor(0.5 * -2.75), **TOL)


def test_log1mexp_both_branches_and_grad():
    x = torch.tensor([-5.0, -1.0, -0.6931, -0.5, -1e-4], dtype=torch.float64, requires_grad=True)
    y = log1mexp(x)
    torch.testing.assert_close(y, torch.log(1 - torch.exp(x)), rtol=1e-12, atol=0)
    y.sum().backward()
    assert torch.isfinite(x.grad).all()


ALL = [CPO(CPOConfig(loss_type=t)) for t in ("sigmoid", "hinge", "ipo", "simpo")] + [
    SimPO(SimPOConfig()),
    SimPO(SimPOConfig(alpha=0.3)),
    ORPO(ORPOConfig()),
]


@pytest.mark.parametrize("objective", ALL, ids=lambda o: repr(o.config))
def test_all_masked_sequence_is_left_out(objective):
    loss2, m2, _ = run(objective)
    loss3, m3, logps = run(objective, "packed", [*CHOSEN, []], [*REJECTED, [-0.3]])
    torch.testing.assert_close(loss3, loss2, **TOL)
    for key, value in m2.items():
        torch.testing.assert_close(m3[key], value, **TOL)
    loss3.backward()
    assert torch.isfinite(logps.grad).all()


@pytest.mark.parametrize("objective", ALL, ids=lambda o: repr(o.config))
def test_all_pairs_masked_and_length_one(objective):
    loss, m, logps = run(objective, chosen=[[]], rejected=[[]])
    assert loss.item() == 0.0 and all(torch.isfinite(v) for v in m.values())
    loss.backward()
    assert torch.isfinite(logps.grad).all()
    loss, m, logps = run(objective, chosen=[[-0.1], [-2.0]], rejected=[[-3.0], [-1e-9]])
    assert torch.isfinite(loss) and all(torch.isfinite(v) for v in m.values())
    loss.backward()
    assert torch.isfinite(logps.grad).all()


def test_reference_free_class_attributes():
    for name, cls in (("cpo", CPO), ("simpo", SimPO), ("orpo", ORPO)):
        assert get_objective(name) is cls
        assert cls.batch_kind == "pair" and cls.needs_reference_model is False
