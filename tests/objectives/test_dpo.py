"""``dpo``: every loss type against hand-worked values, plus edge cases and gradient sanity.

The running example (beta = 0.5), two pairs of per-token log-probs:

    pair 0: chosen [-1, -2] (sum -3, n 2)    rejected [-2, -2, -2] (sum -6, n 3)
            reference sums: chosen -4, rejected -5
            rho_w = -3 - (-4) = 1, rho_l = -6 - (-5) = -1, Delta = 2, beta Delta = 1
    pair 1: chosen [-4] (sum -4, n 1)         rejected [-0.5, -1.5] (sum -2, n 2)
            reference sums: chosen -3, rejected -3
            rho_w = -1, rho_l = 1, Delta = -2, beta Delta = -1

so ``r_w = beta rho_w = [0.5, -0.5]`` and ``r_l = beta rho_l = [-0.5, 0.5]``. Useful values:
-log sigma(1) = log(1 + e^-1) = 0.3132617, -log sigma(-1) = log(1 + e) = 1.3132617,
sigma(0.5) = 0.6224593, sigma(-0.5) = 0.3775407, sigma(1) = 0.7310586, sigma(-1) = 0.2689414.
Tolerance: 1e-6 absolute (fp32 arithmetic on numbers of order 1).
"""

from __future__ import annotations

import math

import pytest
import torch

from megatron.objectives import get_objective
from megatron.objectives.dpo import DPO, F_DIVERGENCE_LOSS_TYPES, LOSSES, DPOConfig
from tests.objectives.batches import pair_batch, reference

BETA = 0.5
CHOSEN = [[-1.0, -2.0], [-4.0]]
REJECTED = [[-2.0, -2.0, -2.0], [-0.5, -1.5]]
REF = ([-4.0, -3.0], [-5.0, -3.0])
LN2 = math.log(2.0)
TOL = {"atol": 1e-6, "rtol": 0.0}

# loss_type, extra config, per-pair losses (worked in the comments)
HAND_WORKED = [
    # -log sigma(beta Delta) = [-log sigma(1), -log sigma(-1)]
    ("sigmoid", {}, [0.3132617, 1.3132617]),
    # relu(1 - beta Delta) = [relu(0), relu(2)]
    ("hinge", {}, [0.0, 2.0]),
    # token means: pair 0: 1/2 - (-1/3) = 5/6, pair 1: -1/1 - 1/2 = -3/2; 1/(2 beta) = 1
    # (5/6 - 1)^2 = 1/36 = 0.0277778; (-3/2 - 1)^2 = 6.25
    ("ipo", {}, [1.0 / 36.0, 6.25]),
    # -log sigma(beta * 5/6) = -log sigma(0.4166667) = 0.5063600; -log sigma(-0.75) = 1.1368710
    ("sigmoid_norm", {}, [0.5063600, 1.1368710]),
    # eps = 0.1, z = beta Delta = [1, -1]: q_w = sigma(z), q_l = sigma(-z)
    # pair 0: 0.7310586 (-0.3132617 - ln 0.9) + 0.2689414 (-1.3132617 - ln 0.1) = 0.1140821
    # pair 1: 0.2689414 (-1.3132617 - ln 0.9) + 0.7310586 (-0.3132617 - ln 0.1) = 1.1294573
    ("exo_pair", {"label_smoothing": 0.1}, [0.1140821, 1.1294573]),
    # -log sigma(r_w) - 1/2 log sigma(-r_w) - 1/2 log sigma(-r_l)
    # pair 0: 0.4740770 + 0.5 * 0.9740770 + 0.5 * 0.4740770 = 1.1981540 ; pair 1: 1.6981540
    ("nca_pair", {}, [1.1981540, 1.6981540]),
    # eps = 0.1: [0.9 (-log sigma(z)) - 0.1 (-log sigma(-z))] / 0.8
    # pair 0: (0.9 * 0.3132617 - 0.1 * 1.3132617) / 0.8 = 0.1882617 ; pair 1: 1.4382617
    ("robust", {"label_smoothing": 0.1}, [0.1882617, 1.4382617]),
    # -log sigma(r_w) - log sigma(-r_l): pair 0: 2 * 0.4740770, pair 1: 2 * 0.9740770
    ("bco_pair", {}, [0.9481540, 1.9481540]),
    # (rho_w - 1/(2 beta))^2 + (rho_l + 1/(2 beta))^2: pair 0: 0 + 0, pair 1: (-2)^2 + 2^2
    ("sppo_hard", {}, [0.0, 8.0]),
    # 1 - sigma(r_w) + sigma(r_l): pair 0: 2 sigma(-0.5) = 0.7550813, pair 1: 2 sigma(0.5)
    ("apo_zero", {}, [0.7550813, 1.2449187]),
    # sigma(r_w) + 1 - sigma(beta Delta): pair 0: 0.6224593 + 1 - 0.7310586 = 0.8914008
    # pair 1: 0.3775407 + 1 - 0.2689414 = 1.1085993
    ("apo_down", {}, [0.8914008, 1.1085993]),
    # tau = 1, z = [1, -1], m = sigma(z): -log sigma(z) (1 - m) + e^-z m
    # pair 0: 0.3132617 * 0.2689414 + 0.3678794 * 0.7310586 = 0.3531905
    # pair 1: 1.3132617 * 0.7310586 + 2.7182818 * 0.2689414 = 1.6911298
    ("discopop", {"discopop_tau": 1.0}, [0.3531905, 1.6911298]),
    # tau = 0.05: m = sigma(+-20) ~ 1 / 2e-9, so ~[e^-1, -log sigma(-1)]
    ("discopop", {}, [0.3678794, 1.3132617]),
    # token mean of every chosen target: (1 + 2 + 4) / 3, the same for each pair
    ("sft", {}, [7.0 / 3.0, 7.0 / 3.0]),
    # aot_unpaired: sort(rho_w) = [-1, 1], sort(rho_l) = [-1, 1]: delta = [0, 0] -> ln 2 each
    ("aot_unpaired", {}, [LN2, LN2]),
    # cDPO, eps = 0.1: 0.9 (-log sigma(z)) + 0.1 (-log sigma(-z))
    # pair 0: 0.9 * 0.3132617 + 0.1 * 1.3132617 = 0.4132617 ; pair 1: 1.2132617
    ("sigmoid", {"label_smoothing": 0.1}, [0.4132617, 1.2132617]),
    # f-DPO forward KL, scores 1 - e^-rho: pair 0: (1 - e^-1) - (1 - e) = 2.3504024, pair 1: -2.3504024
    # -log sigma(0.5 * 2.3504024) = 0.2690777 ; -log sigma(-1.1752012) = 1.4442789
    ("sigmoid", {"f_divergence_type": "forward_kl"}, [0.2690777, 1.4442789]),
    # JS, scores ln 2 + log sigma(rho): Delta = log sigma(1) - log sigma(-1) = 1 (pair 1: -1)
    # -log sigma(0.5) = 0.4740770 ; -log sigma(-0.5) = 0.9740770
    ("sigmoid", {"f_divergence_type": "js_divergence"}, [0.4740770, 0.9740770]),
    # alpha-divergence, a = 0.5: scores 2 (1 - e^(-rho/2)): Delta_0 = 2(1 - e^-0.5) - 2(1 - e^0.5)
    # = 0.7869387 + 1.2974425 = 2.0843812; -log sigma(1.0421906) = 0.3020887 ; pair 1: 1.3442793
    ("sigmoid", {"f_divergence_type": "alpha_divergence"}, [0.3020887, 1.3442793]),
    # alpha = 1 falls back to reverse KL
    (
        "sigmoid",
        {"f_divergence_type": "alpha_divergence", "f_alpha_divergence_coef": 1.0},
        [0.3132617, 1.3132617],
    ),
]


def make(layout: str = "padded", **cfg):
    """(objective, policy, reference, batch, token_logps) for the running example."""
    objective = DPO(DPOConfig(beta=BETA, **cfg))
    logps, batch = pair_batch(CHOSEN, REJECTED, layout)
    return objective, {"token_logps": logps}, reference(*REF), batch, logps


def per_pair(loss_type: str, **cfg) -> torch.Tensor:
    objective, policy, ref, batch, _ = make(loss_type=[loss_type], **cfg)
    return LOSSES[loss_type](objective.terms(policy, ref, batch), objective.config)


@pytest.mark.parametrize(("loss_type", "cfg", "expected"), HAND_WORKED)
def test_hand_worked_per_pair(loss_type, cfg, expected):
    torch.testing.assert_close(per_pair(loss_type, **cfg), torch.tensor(expected), **TOL)


@pytest.mark.parametrize("layout", ["padded", "packed"])
@pytest.mark.parametrize(("loss_type", "cfg", "expected"), HAND_WORKED)
def test_loss_is_the_pair_mean(loss_type, cfg, expected, layout):
    objective, policy, ref, batch, _ = make(layout, loss_type=[loss_type], **cfg)
    loss, _ = objective.loss(policy, ref, batch)
    torch.testing.assert_close(loss, torch.tensor(sum(expected) / 2), **TOL)


def test_every_trl_loss_type_is_covered():
    trl_1_16 = {
        "sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard",
        "aot", "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm",
    }  # fmt: skip
    assert set(LOSSES) == trl_1_16
    assert {t for t, _, _ in HAND_WORKED} | {"aot"} == trl_1_16  # aot: its own example below


def test_aot_sorts_across_the_micro_batch():
    """Three pairs, beta = 1. Policy log pi(y_w) - log pi(y_l) = [1, -1, 2] -> sorted [-1, 1, 2];
    reference differences [2, 0, -1] -> sorted [-1, 0, 2]; delta = [0, 1, 0];
    loss = mean(ln 2, -log sigma(1), ln 2) = (2 * 0.6931472 + 0.3132617) / 3 = 0.5665187.
    (Unsorted, sigmoid would see Delta = [-1, -1, 3].)"""
    objective = DPO(DPOConfig(beta=1.0, loss_type=["aot"]))
    logps, batch = pair_batch([[-1.0], [-2.0], [-1.0]], [[-2.0], [-1.0], [-3.0]])
    ref = reference([-1.0, -2.0, -3.0], [-3.0, -2.0, -2.0])
    loss, _ = objective.loss({"token_logps": logps}, ref, batch)
    torch.testing.assert_close(loss, torch.tensor((2 * LN2 + 0.3132617) / 3), **TOL)


def test_aot_ignores_an_invalid_pair_when_sorting():
    objective = DPO(DPOConfig(beta=1.0, loss_type=["aot"]))
    logps, batch = pair_batch([[-1.0], [-2.0], [], [-1.0]], [[-2.0], [-1.0], [-9.0], [-3.0]])
    ref = reference([-1.0, -2.0, 5.0, -3.0], [-3.0, -2.0, 7.0, -2.0])
    loss, _ = objective.loss({"token_logps": logps}, ref, batch)
    torch.testing.assert_close(loss, torch.tensor((2 * LN2 + 0.3132617) / 3), **TOL)


def test_metrics_with_reference():
    """rewards = beta rho: chosen [0.5, -0.5], rejected [-0.5, 0.5]; accuracy [1, 0];
    margins [1, -1]; logps: chosen sums [-3, -4], rejected [-6, -2] (means below)."""
    objective, policy, ref, batch, _ = make()
    _, metrics = objective.loss(policy, ref, batch)
    expected = {
        "rewards/chosen": 0.0,
        "rewards/rejected": 0.0,
        "rewards/accuracies": 0.5,
        "rewards/margins": 0.0,
        "logps/chosen": -3.5,
        "logps/rejected": -4.0,
    }
    assert set(metrics) == set(expected)
    for key, value in expected.items():
        torch.testing.assert_close(metrics[key], torch.tensor(value), **TOL)
        assert not metrics[key].requires_grad


def test_reference_free():
    """Reference log-probs 0: rho = policy sums, rho_w = [-3, -4], rho_l = [-6, -2],
    beta Delta = [1.5, -1]: loss = (-log sigma(1.5) - log sigma(-1)) / 2 = (0.2014133 + 1.3132617) / 2;
    rewards beta * sums: chosen [-1.5, -2] -> -1.75, rejected [-3, -1] -> -2;
    accuracy [-1.5 > -3, -2 > -1] = 0.5; margins [1.5, -1] -> 0.25."""
    objective = DPO(DPOConfig(beta=BETA, reference_free=True))
    assert objective.needs_reference_model is False
    assert DPO.needs_reference_model is True  # the class default (documented)
    logps, batch = pair_batch(CHOSEN, REJECTED)
    loss, metrics = objective.loss({"token_logps": logps}, None, batch)
    torch.testing.assert_close(loss, torch.tensor((0.2014133 + 1.3132617) / 2), **TOL)
    torch.testing.assert_close(metrics["rewards/chosen"], torch.tensor(-1.75), **TOL)
    torch.testing.assert_close(metrics["rewards/rejected"], torch.tensor(-2.0), **TOL)
    torch.testing.assert_close(metrics["rewards/accuracies"], torch.tensor(0.5), **TOL)
    torch.testing.assert_close(metrics["rewards/margins"], torch.tensor(0.25), **TOL)


def test_missing_reference_is_an_error():
    objective, policy, _, batch, _ = make()
    with pytest.raises(ValueError, match="reference_free"):
        objective.loss(policy, None, batch)


@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_golden_reference_equal_to_policy_gives_ln2(layout):
    torch.manual_seed(0)
    chosen = [(-torch.rand(n) * 3).tolist() for n in (3, 1, 5)]
    rejected = [(-torch.rand(n) * 3).tolist() for n in (2, 4, 1)]
    logps, batch = pair_batch(chosen, rejected, layout)
    ref = reference([sum(c) for c in chosen], [sum(r) for r in rejected])
    loss, metrics = DPO(DPOConfig()).loss({"token_logps": logps}, ref, batch)
    torch.testing.assert_close(loss, torch.tensor(LN2), atol=1e-6, rtol=0)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
        torch.testing.assert_close(metrics[key], torch.tensor(0.0), atol=1e-6, rtol=0)


def test_loss_weights_combine():
    """RPO-style [sigmoid, sft] with weights [1, 0.5]: 0.8132617 + 0.5 * 7/3 = 1.9799284;
    default weights are 1 each: 0.8132617 + 7/3; nll_loss is logged when sft is used."""
    objective, policy, ref, batch, _ = make(loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.5])
    loss, metrics = objective.loss(policy, ref, batch)
    torch.testing.assert_close(loss, torch.tensor(1.9799284), **TOL)
    torch.testing.assert_close(metrics["nll_loss"], torch.tensor(7.0 / 3.0), **TOL)
    objective, policy, ref, batch, _ = make(loss_type=["sigmoid", "sft"])
    loss, _ = objective.loss(policy, ref, batch)
    torch.testing.assert_close(loss, torch.tensor(0.8132617 + 7.0 / 3.0), **TOL)
    _, metrics = make()[0].loss(*make()[1:4])
    assert "nll_loss" not in metrics


def test_wpo_weighting():
    """log sum_v p_v^2 = -1 on every token. w = exp(mean_t(log p_t + 1)):
    pair 0: chosen mean -1.5 -> e^-0.5, rejected mean -2 -> e^-1, product e^-1.5 = 0.2231302;
    pair 1: chosen -4 -> e^-3, rejected -1 -> e^0, product e^-3 = 0.0497871.
    sigmoid: (0.3132617 * 0.2231302 + 1.3132617 * 0.0497871) / 2 = 0.0676408."""
    objective, policy, ref, batch, logps = make(use_weighting=True)
    policy["log_sum_sq_probs"] = torch.full_like(logps, -1.0)
    loss, _ = objective.loss(policy, ref, batch)
    torch.testing.assert_close(loss, torch.tensor(0.0676408), **TOL)
    loss.backward()
    assert torch.isfinite(logps.grad).all()
    # sft is a batch scalar: weighted by the mean pair weight, 7/3 * (0.2231302 + 0.0497871) / 2
    objective, policy, ref, batch, logps = make(use_weighting=True, loss_type=["sft"])
    policy["log_sum_sq_probs"] = torch.full_like(logps, -1.0)
    loss, _ = objective.loss(policy, ref, batch)
    torch.testing.assert_close(loss, torch.tensor(7.0 / 3.0 * 0.2729173 / 2), **TOL)


def test_ld_alpha_reduces_policy_and_reference_alike():
    """ld_alpha = 0.5 (see test_logprobs.test_ld_weighting): policy [-3, -4 | -5, -1.25].
    With the reference reduced the same way from the same token log-probs, the loss is ln 2."""
    objective, policy, _, batch, logps = make(ld_alpha=0.5)
    torch.testing.assert_close(
        objective.sequence_log_probs(logps, batch), torch.tensor([-3.0, -4.0, -5.0, -1.25])
    )
    ref = objective.reference_log_probs(logps, batch)
    torch.testing.assert_close(ref["rejected_logps"], torch.tensor([-5.0, -1.25]))
    assert not ref["chosen_logps"].requires_grad
    loss, metrics = objective.loss(policy, ref, batch)
    torch.testing.assert_close(loss, torch.tensor(LN2), **TOL)
    torch.testing.assert_close(metrics["logps/rejected"], torch.tensor(-3.125), **TOL)


ALL_TYPES = [
    (t, {"label_smoothing": 0.1} if t in ("exo_pair", "robust") else {}) for t in sorted(LOSSES)
]


@pytest.mark.parametrize(("loss_type", "cfg"), ALL_TYPES)
def test_all_masked_sequence_is_left_out(loss_type, cfg):
    """A third pair whose rejected has no target token changes neither loss nor metrics,
    and gives no NaN (loss or gradient)."""
    objective, policy, ref, batch, _ = make(loss_type=[loss_type], **cfg)
    loss2, metrics2 = objective.loss(policy, ref, batch)
    logps, batch3 = pair_batch([*CHOSEN, [-0.7]], [*REJECTED, []], "packed")
    ref3 = reference([*REF[0], -1.0], [*REF[1], 0.0])
    loss3, metrics3 = objective.loss({"token_logps": logps}, ref3, batch3)
    if loss_type == "sft":  # token-level: the extra chosen token does count
        torch.testing.assert_close(loss3, torch.tensor((1 + 2 + 4 + 0.7) / 4), **TOL)
    else:
        torch.testing.assert_close(loss3, loss2, **TOL)
        for key, value in metrics2.items():
            torch.testing.assert_close(metrics3[key], value, **TOL)
    loss3.backward()
    assert torch.isfinite(logps.grad).all()


@pytest.mark.parametrize(("loss_type", "cfg"), ALL_TYPES)
def test_all_pairs_masked_gives_zero_loss_with_finite_grads(loss_type, cfg):
    objective = DPO(DPOConfig(loss_type=[loss_type], **cfg))
    logps, batch = pair_batch([[], []], [[-1.0], []])
    loss, metrics = objective.loss(
        {"token_logps": logps}, reference([0.0, 0.0], [-1.0, 0.0]), batch
    )
    assert loss.item() == 0.0
    assert all(torch.isfinite(v) for v in metrics.values())
    loss.backward()
    assert torch.isfinite(logps.grad).all()


@pytest.mark.parametrize(("loss_type", "cfg"), ALL_TYPES)
def test_length_one_completions(loss_type, cfg):
    objective = DPO(
        DPOConfig(
            loss_type=[loss_type], use_weighting=loss_type not in ("aot", "aot_unpaired"), **cfg
        )
    )
    logps, batch = pair_batch([[-0.1], [-2.0]], [[-3.0], [-0.2]])
    policy = {"token_logps": logps, "log_sum_sq_probs": torch.full_like(logps, -0.5)}
    loss, metrics = objective.loss(policy, reference([-1.0, -1.0], [-1.0, -1.0]), batch)
    assert torch.isfinite(loss) and all(torch.isfinite(v) for v in metrics.values())


F_DIVERGENCES = ["reverse_kl", "forward_kl", "js_divergence", "alpha_divergence"]
# Only the loss types built on Delta accept another f-divergence (the config test covers the rest).
GRAD_CASES = [
    (t, cfg, f)
    for t, cfg in ALL_TYPES
    for f in F_DIVERGENCES
    if f == "reverse_kl" or t in F_DIVERGENCE_LOSS_TYPES
]


@pytest.mark.parametrize(("loss_type", "cfg", "f_div"), GRAD_CASES)
def test_gradients_are_finite_and_only_on_targets(loss_type, cfg, f_div):
    objective, policy, ref, batch, logps = make(
        "packed", loss_type=[loss_type], f_divergence_type=f_div, **cfg
    )
    loss, _ = objective.loss(policy, ref, batch)
    loss.backward()
    grad, mask = logps.grad, batch.loss_mask > 0
    assert torch.isfinite(grad).all()
    assert (grad[~mask] == 0).all()
    assert grad[mask].abs().sum() > 0


def test_registry_and_class_attributes():
    assert get_objective("dpo") is DPO
    assert DPO.batch_kind == "pair"
