"""``kto``: KTO and unpaired APO-zero against hand-worked values, edge cases, the KL estimate.

The running example (beta = 0.5), three examples then their three KL sequences:

    example 0 (desirable):   [-1, -2]  sum -3,   reference -4    r = 1,  beta r = 0.5
    example 1 (undesirable): [-2, -2]  sum -4,   reference -3    r = -1, beta r = -0.5
    example 2 (desirable):   [-0.5]    sum -0.5, reference -2.5  r = 2,  beta r = 1   (length 1)
    KL sequences: [-1, -1], [-3], [-2, -1]: sums [-2, -3, -3], reference [-3.5, -2, -4]
                  differences [1.5, -1, 1], KL_hat = z0 = 0.5

kto (z0 = 0.5):  desirable 1 - sigma(beta (r - z0)), undesirable 1 - sigma(beta (z0 - r))
    ex 0: 1 - sigma(0.25) = 0.4378235   ex 1: 1 - sigma(0.75) = 0.3208213
    ex 2: 1 - sigma(0.75) = 0.3208213   mean 0.3598220
    weights w_D = 2, w_U = 0.5: (2 * 0.4378235 + 0.5 * 0.3208213 + 2 * 0.3208213) / 3 = 0.5592334
apo_zero_unpaired: desirable 1 - sigma(beta r), undesirable sigma(beta r)
    ex 0: 1 - sigma(0.5) = 0.3775407   ex 1: sigma(-0.5) = 0.3775407
    ex 2: 1 - sigma(1) = 0.2689414      mean 0.3413409; weights 2 / 0.5: 0.4939115
Useful: sigma(0.25) = 0.5621765, sigma(0.5) = 0.6224593, sigma(0.75) = 0.6791787,
sigma(1) = 0.7310586, sigma(1.5) = 0.8175745, sigma(2) = 0.8807971.
Tolerance: 1e-6 absolute (fp32 arithmetic on numbers of order 1).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from megatron.config import SectionError
from megatron.objectives import get_objective
from megatron.objectives.kto import KTO, KTOConfig
from megatron.objectives.registry import loss_with_dp_means
from tests.objectives.batches import sig, unpaired_batch

BETA = 0.5
EXAMPLES = [[-1.0, -2.0], [-2.0, -2.0], [-0.5]]
LABELS = [True, False, True]
REF = [-4.0, -3.0, -2.5]
KL = [[-1.0, -1.0], [-3.0], [-2.0, -1.0]]
REF_KL = [-3.5, -2.0, -4.0]
TOL = {"atol": 1e-6, "rtol": 0.0}


def reference(completion: list[float], kl: list[float]) -> dict[str, torch.Tensor]:
    return {"completion_logps": torch.tensor(completion), "kl_logps": torch.tensor(kl)}


def make(layout: str = "padded", ref_kl: list[float] = REF_KL, **cfg):
    """(objective, policy, reference, batch, token_logps) for the running example."""
    objective = KTO(KTOConfig(beta=BETA, **cfg))
    with_kl = objective.uses_kl
    logps, batch = unpaired_batch(EXAMPLES, LABELS, KL if with_kl else None, layout)
    ref = reference(REF, ref_kl if with_kl else [])
    return objective, {"token_logps": logps}, ref, batch, logps


def close(actual, expected: float) -> None:
    torch.testing.assert_close(actual, torch.tensor(expected), **TOL)


def test_registered_with_its_batch_kind_and_collate_options():
    assert get_objective("kto") is KTO and KTO.batch_kind == "unpaired"
    kto = KTO(KTOConfig())
    assert kto.collate_options() == {"with_kl": True, "separate_kl": True}
    assert kto.collate_options(pipeline=True) == {"with_kl": True, "separate_kl": False}
    assert kto.side_batches == ("kl",)
    apo = KTO(KTOConfig(loss_type="apo_zero_unpaired"))
    assert apo.collate_options() == {"with_kl": False, "separate_kl": False}
    assert apo.reference_cache_params() == {"with_kl": False} and apo.side_batches == ()
    assert KTO(KTOConfig()).needs_reference_model
    assert not KTO(KTOConfig(reference_free=True)).needs_reference_model


@pytest.mark.parametrize(
    ("cfg", "match"),
    [
        ({"beta": 0.0}, r"KTOConfig.beta: must be > 0 \(got 0.0\)"),
        ({"loss_type": "sigmoid"}, r"loss_type: must be one of kto, apo_zero_unpaired"),
        ({"desirable_weight": 0.0}, r"desirable_weight: must be > 0"),
        ({"undesirable_weight": -1.0}, r"undesirable_weight: must be > 0"),
    ],
)
def test_config_errors(cfg, match):
    with pytest.raises(SectionError, match=match):
        KTOConfig(**cfg)


HAND_WORKED = [
    ("kto", 1.0, 1.0, 0.3598220),
    ("kto", 2.0, 0.5, 0.5592334),
    ("apo_zero_unpaired", 1.0, 1.0, 0.3413409),
    ("apo_zero_unpaired", 2.0, 0.5, 0.4939115),
]


@pytest.mark.parametrize("layout", ["padded", "packed"])
@pytest.mark.parametrize(("loss_type", "w_d", "w_u", "expected"), HAND_WORKED)
def test_hand_worked_loss(loss_type, w_d, w_u, expected, layout):
    objective, policy, ref, batch, _ = make(
        layout, loss_type=loss_type, desirable_weight=w_d, undesirable_weight=w_u
    )
    loss, metrics = objective.loss(policy, ref, batch)
    close(loss, expected)
    close(metrics["kl"], 0.5 if loss_type == "kto" else 0.0)


def test_padded_and_packed_give_the_same_loss_and_metrics():
    out = {}
    for layout in ("padded", "packed"):
        objective, policy, ref, batch, _ = make(layout, desirable_weight=1.5)
        out[layout] = objective.loss(policy, ref, batch)
    torch.testing.assert_close(out["packed"][0], out["padded"][0], **TOL)
    torch.testing.assert_close(out["packed"][1], out["padded"][1], **TOL)


def test_metrics():
    """rewards beta r: desirable [0.5, 1] -> (1.5, 2), undesirable [-0.5] -> (-0.5, 1);
    logps: desirable sums [-3, -0.5] -> (-3.5, 2), undesirable [-4] -> (-4, 1); kl = z0 = 0.5."""
    objective, policy, ref, batch, _ = make()
    _, metrics = objective.loss(policy, ref, batch)
    expected = {
        "kl": 0.5,
        "rewards/chosen": (1.5, 2.0),
        "rewards/rejected": (-0.5, 1.0),
        "logps/chosen": (-3.5, 2.0),
        "logps/rejected": (-4.0, 1.0),
        "count/chosen": (2.0,),
        "count/rejected": (1.0,),
    }
    assert set(metrics) == set(expected)
    for key, value in expected.items():
        got = metrics[key] if isinstance(metrics[key], tuple) else (metrics[key],)
        want = value if isinstance(value, tuple) else (value,)
        assert len(got) == len(want), key
        for g, w in zip(got, want, strict=True):
            assert g.dim() == 0 and not g.requires_grad, key
            close(g, w)


def test_negative_kl_estimate_is_clamped_at_zero():
    """Reference KL sums [-1, -1, -3]: differences [-1, -2, 0], KL_hat = -1 -> z0 = 0.
    kto with z0 = 0: [1 - sigma(0.5), 1 - sigma(0.5), 1 - sigma(1)] -> mean 0.3413409
    (the apo_zero_unpaired values: with z0 = 0 the two losses coincide)."""
    objective, policy, ref, batch, _ = make(ref_kl=[-1.0, -1.0, -3.0])
    total, count = objective.dp_means(policy, ref, batch)["kl"]
    close(total, -3.0)
    close(count, 3.0)
    loss, metrics = objective.loss(policy, ref, batch)
    close(loss, 0.3413409)
    close(metrics["kl"], 0.0)


@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_kl_is_detached_and_example_gradients_are_analytic(layout):
    """dL/d log p_t for a token of example i (every token of i alike), n = 3, z0 = 0.5:
    desirable  -(w_D / n) beta sigma(u) (1 - sigma(u)), u = beta (r - z0): u = [0.25, -, 0.75]
    undesirable (w_U / n) beta sigma(v) (1 - sigma(v)), v = beta (z0 - r) = 0.75.
    With w_D = 2, w_U = 0.5: ex 0: -2/3 * 0.5 * 0.5621765 * 0.4378235 = -0.0820447;
    ex 1: 0.5/3 * 0.5 * 0.6791787 * 0.3208213 = 0.0181579; ex 2: -2/3 * 0.5 * 0.2178942 = -0.0726317.
    KL-sequence tokens and non-target positions (NaN in the input) get exactly 0."""
    objective, policy, ref, batch, logps = make(
        layout, desirable_weight=2.0, undesirable_weight=0.5
    )
    loss, _ = objective.loss(policy, ref, batch)
    loss.backward()
    grad, ids = logps.grad, batch.sequence_ids
    assert torch.isfinite(grad).all()
    analytic = [
        -2 / 3 * BETA * sig(0.25) * (1 - sig(0.25)),
        0.5 / 3 * BETA * sig(0.75) * (1 - sig(0.75)),
        -2 / 3 * BETA * sig(0.75) * (1 - sig(0.75)),
    ]
    torch.testing.assert_close(
        torch.tensor(analytic), torch.tensor([-0.0820447, 0.0181579, -0.0726317]), **TOL
    )
    for i, g in enumerate(analytic):
        torch.testing.assert_close(grad[ids == i], torch.full_like(grad[ids == i], g), **TOL)
    assert (grad[ids >= 3] == 0).all() and (ids >= 3).sum() == 5
    assert (grad[ids < 0] == 0).all()


def test_dp_means_overrides_the_local_estimate():
    """dp_means kl = 2 (e.g. the other ranks' KL sequences): z0 = 2.
    ex 0: 1 - sigma(-0.5) = 0.6224593; ex 1: 1 - sigma(1.5) = 0.1824255; ex 2: 1 - sigma(0) = 0.5;
    mean 0.4349616. A negative data-parallel mean is clamped like a local one."""
    objective, policy, ref, batch, _ = make()
    loss, metrics = objective.loss(policy, ref, batch.replace(dp_means={"kl": torch.tensor(2.0)}))
    close(loss, 0.4349616)
    close(metrics["kl"], 2.0)
    loss, metrics = objective.loss(policy, ref, batch.replace(dp_means={"kl": torch.tensor(-4.0)}))
    close(loss, 0.3413409)
    close(metrics["kl"], 0.0)


def test_evaluate_on_one_process_matches_the_local_estimate():
    objective, policy, ref, batch, _ = make()
    loss, metrics = loss_with_dp_means(objective, policy, ref, batch, dp_group=None)
    close(loss, 0.3598220)
    close(metrics["kl"], 0.5)
    assert batch.dp_means is None  # evaluate passes a copy


def test_apo_zero_unpaired_has_no_kl_statistic():
    objective, policy, ref, batch, _ = make(loss_type="apo_zero_unpaired")
    assert objective.dp_means(policy, ref, batch) == {}
    assert batch.num_sequences == 3
    assert objective.reference_log_probs(policy["token_logps"], batch)["kl_logps"].numel() == 3


def test_reference_free():
    """Reference log-probs 0: r = policy sums [-3, -4, -0.5]; KL_hat = mean([-2, -3, -3]) < 0 -> 0.
    ex 0: 1 - sigma(-1.5) = 0.8175745; ex 1: 1 - sigma(2) = 0.1192029; ex 2: 1 - sigma(-0.25)
    = 0.5621765; mean 0.4996513. rewards/chosen: beta * [-3, -0.5] -> (-1.75, 2)."""
    objective, policy, _, batch, _ = make(reference_free=True)
    loss, metrics = objective.loss(policy, None, batch)
    close(loss, 0.4996513)
    close(metrics["kl"], 0.0)
    close(metrics["rewards/chosen"][0], -1.75)
    close(metrics["rewards/rejected"][0], -2.0)


def test_missing_reference_is_an_error():
    objective, policy, _, batch, _ = make()
    with pytest.raises(ValueError, match="reference_free"):
        objective.loss(policy, None, batch)


@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_all_masked_example_is_left_out(layout):
    """A 4th (undesirable) example with no completion token; its KL sequence [-1] (reference -1.5,
    difference 0.5) keeps KL_hat = (1.5 - 1 + 1 + 0.5) / 4 = 0.5, so the loss and metrics are
    the 3-example ones, with finite gradients."""
    objective = KTO(KTOConfig(beta=BETA))
    logps, batch = unpaired_batch(EXAMPLES + [[]], LABELS + [False], KL + [[-1.0]], layout)
    ref = reference(REF + [7.0], REF_KL + [-1.5])
    loss, metrics = objective.loss({"token_logps": logps}, ref, batch)
    close(loss, 0.3598220)
    close(metrics["kl"], 0.5)
    close(metrics["count/rejected"][0], 1.0)
    close(metrics["rewards/rejected"][0], -0.5)
    loss.backward()
    assert torch.isfinite(logps.grad).all()


def test_reference_log_probs_split_examples_and_kl_sequences():
    objective, policy, _, batch, logps = make("packed")
    ref = objective.reference_log_probs(logps, batch)
    torch.testing.assert_close(ref["completion_logps"], torch.tensor([-3.0, -4.0, -0.5]))
    torch.testing.assert_close(ref["kl_logps"], torch.tensor([-2.0, -3.0, -3.0]))
    assert not any(v.requires_grad for v in ref.values())


@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_kl_sub_batch_equals_appended_kl_sequences(layout):
    """The step's form (the KL sub-batch forwarded on its own, ``policy["kl"]``) gives the loss,
    metrics, reference values and example gradients of the appended form."""
    objective, policy, ref, batch, logps = make(layout)
    loss, metrics = objective.loss(policy, ref, batch)
    loss.backward()
    ex_logps, ex_batch = unpaired_batch(EXAMPLES, LABELS, None, layout)
    kl_logps, kl_batch = unpaired_batch(KL, LABELS, None, layout)
    ex_batch.sub_batches["kl"] = kl_batch.replace(labels=None, kl_start=None)
    side_policy = {"token_logps": ex_logps, "kl": {"token_logps": kl_logps}}
    side_loss, side_metrics = objective.loss(side_policy, ref, ex_batch)
    side_loss.backward()
    close(side_loss.detach(), float(loss.detach()))
    for k, v in metrics.items():
        got = side_metrics[k]
        pair = (got, v) if isinstance(v, tuple) else ((got,), (v,))
        for a, b in zip(*pair, strict=True):
            torch.testing.assert_close(a, b, **TOL)
    assert kl_logps.grad is None or not kl_logps.grad.any()  # the KL forward carries no gradient
    ids = batch.sequence_ids
    want = torch.where(ids < 3, logps.grad, 0.0)  # the examples' part of the appended form
    for i in range(3):
        torch.testing.assert_close(
            ex_logps.grad[ex_batch.sequence_ids == i].sum(), want[ids == i].sum(), **TOL
        )
    side_ref = objective.reference_log_probs(
        ex_logps, ex_batch, side={"kl": {"token_logps": kl_logps}}
    )
    for k, v in objective.reference_log_probs(logps, batch).items():
        torch.testing.assert_close(side_ref[k], v, **TOL)
    with pytest.raises(ValueError, match="KL sub-batch 'kl' was not forwarded"):
        objective.loss({"token_logps": ex_logps}, ref, ex_batch)


def test_data_warnings_follow_the_papers_balance_rule():
    """desirable_weight * n_D / (undesirable_weight * n_U) in [1, 4/3] (KTO paper Sec. 4.2)."""
    data = [{"label": i < 6} for i in range(10)]  # 6 desirable, 4 undesirable: ratio 1.5
    assert KTO(KTOConfig(undesirable_weight=1.2)).data_warnings(data) == []  # 6 / 4.8 = 1.25
    (warning,) = KTO(KTOConfig()).data_warnings(data)
    assert "= 1.500" in warning and "recommends [1, 4/3]" in warning
    assert "desirable_weight in [0.667, 0.889]" in warning
    assert "(sampled)" in KTO(KTOConfig()).data_warnings(data * 10, max_rows=20)[0]
    assert "no undesirable examples" in KTO(KTOConfig()).data_warnings(data[:6])[0]


# ----------------------------------------------------------------------------- real model
# The KL estimate of a real forward: a tiny policy and a differently seeded reference, unpaired
# samples whose ``kl_completion`` is another example's completion (UnpairedDataset's cycle rule),
# collated by the real Collator. KL_hat must be the mean over i of
# log pi(c_partner(i) | p_i) - log pi_ref(c_partner(i) | p_i), each computed here on its own.


def _model(seed: int):
    from megatron.config import ModelConfig
    from megatron.model import GPTModel
    from megatron.parallel import ParallelState

    cfg = ModelConfig(
        num_layers=2, hidden_size=32, num_attention_heads=4, num_kv_heads=2, vocab_size=64,
        make_vocab_size_divisible_by=32, max_position_embeddings=64, norm="rmsnorm",
        activation="swiglu", ffn_hidden_size=64,
    )  # fmt: skip
    return GPTModel(cfg, ParallelState.single(), seed=seed).eval()


def _samples(n: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(1, 64, size=int(rng.integers(2, 7))) for _ in range(n)]
    completions = [rng.integers(1, 64, size=int(rng.integers(1, 6))) for _ in range(n)]
    order = rng.permutation(n)  # UnpairedDataset: row order[k] borrows order[k + 1]'s completion
    partner = np.empty(n, dtype=np.int64)
    partner[order] = np.roll(order, -1)
    assert (partner != np.arange(n)).all()
    return [
        {
            "prompt": prompts[i],
            "completion": completions[i],
            "kl_completion": completions[partner[i]],
            "label": bool(i % 2),
        }
        for i in range(n)
    ]


@torch.no_grad()
def _completion_logp(model, prompt: np.ndarray, completion: np.ndarray) -> float:
    """log pi(completion | prompt): one unpacked sequence, plain causal attention."""
    tokens = torch.from_numpy(np.concatenate([prompt, completion])).long()[None]
    targets = torch.cat([tokens[:, 1:], torch.zeros(1, 1, dtype=torch.long)], 1)
    logps = model(tokens, None, targets)["token_logps"][0]
    return float(logps[prompt.size - 1 : tokens.shape[1] - 1].sum())


@pytest.fixture(scope="module")
def real():
    from megatron.data.collators import Collator

    policy, ref = _model(1), _model(77)
    samples = _samples(5, seed=3)

    def diff(prompt, completion):
        return _completion_logp(policy, prompt, completion) - _completion_logp(
            ref, prompt, completion
        )

    mismatched = np.mean([diff(x["prompt"], x["kl_completion"]) for x in samples])
    matched = np.mean([diff(x["prompt"], x["completion"]) for x in samples])
    rewards = [diff(x["prompt"], x["completion"]) for x in samples]
    out = {}
    for layout in ("padded", "packed"):
        batch = Collator("unpaired", layout, seq_length=16, pad_to_multiple_of=4)(samples)
        seq_layout = batch.layout
        with torch.no_grad():
            logps = {
                name: m(batch.tokens, seq_layout, batch.targets)["token_logps"]
                for name, m in (("policy", policy), ("ref", ref))
            }
        out[layout] = (batch, logps)
    return {
        "samples": samples,
        "mismatched": float(mismatched),
        "matched": float(matched),
        "rewards": rewards,
        "layouts": out,
    }


@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_real_model_kl_is_the_mismatched_mean(real, layout):
    objective = KTO(KTOConfig(beta=0.1))
    batch, logps = real["layouts"][layout]
    assert batch.num_sequences == 10 and batch.kl_start == 5
    ref = objective.reference_log_probs(logps["ref"], batch)
    total, count = objective.dp_means({"token_logps": logps["policy"]}, ref, batch)["kl"]
    close(count, 5.0)
    torch.testing.assert_close(total / count, torch.tensor(real["mismatched"]), atol=1e-5, rtol=0)
    assert abs(real["mismatched"] - real["matched"]) > 1e-2  # the matched estimate differs
    _, metrics = objective.loss({"token_logps": logps["policy"]}, ref, batch)
    torch.testing.assert_close(
        metrics["kl"], torch.tensor(max(real["mismatched"], 0.0)), atol=1e-5, rtol=0
    )
    # roles swapped: KL_hat changes sign, so one of the two is clamped and the other is not
    swapped = objective.reference_log_probs(logps["policy"], batch)
    _, metrics = objective.loss({"token_logps": logps["ref"]}, swapped, batch)
    torch.testing.assert_close(
        metrics["kl"], torch.tensor(max(-real["mismatched"], 0.0)), atol=1e-5, rtol=0
    )
    # the examples themselves use the matched pairs
    labels = [x["label"] for x in real["samples"]]
    _, metrics = objective.loss({"token_logps": logps["policy"]}, ref, batch)
    chosen = sum(0.1 * r for r, lab in zip(real["rewards"], labels, strict=True) if lab)
    torch.testing.assert_close(
        metrics["rewards/chosen"][0], torch.tensor(chosen, dtype=torch.float32), atol=1e-5, rtol=0
    )
