"""Every pair objective and the reference path give the same values on prefix-shared rows.

A prefix-shared batch lays each pair out as ``[prompt | chosen | rejected]`` (several pairs packed
in a row, rows right-padded), with the rejected's first token scored at the prompt's last hidden
state as an *extra target*. For each pair objective, the loss, the metrics and the gradients of
the model parameters must be those of the padded batch of the same pairs (one row per sequence),
and the reference values too, whether they come from a co-resident reference model or from a cache
computed under another layout (whose key must not depend on ``data.layout``).

Tolerance, as in ``tests/model/test_layout.py``: the transformer runs in fp64, where the two
layouts are the same math (hidden states agree to ~1e-15), but the vocab projection rounds the
logits to fp32 by design and the per-sequence sums are fp32, so a token's log-prob may differ in
its last fp32 bit and a sum of at most 8 of them by 8 fp32 ulps of its magnitude (relative
``8 * 2^-23 ~ 1e-6``). The losses and metrics are smooth functions of those sums with O(1)
derivatives (``beta <= 1``), so they get the same relative bound, with an absolute floor of 8 ulps
of the sums' magnitude (~2^-18 for sums ~ -30: ``atol = 8 * 2^-18 ~ 3e-5``) for values near 0
(margins, rewards of beta * small log-ratios). A layout bug (rejected seeing chosen, a missed or
double-counted extra target) moves the sums by ~1.
"""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest
import torch

from megatron.config import ModelConfig
from megatron.config.sections import DataConfig, DataSource
from megatron.model import GPTModel
from megatron.model import layout as layout_module
from megatron.objectives import get_objective
from megatron.objectives.logprobs import extra_token_positions, token_positions
from megatron.parallel import ParallelState
from megatron.training import reference
from megatron.training.reference import ReferenceModel, cache_key, reference_values
from megatron.training.step import forward_outputs
from tests.helpers_runs import padded_batch, prefix_shared_batch, tiny_model_config

FP32_ULPS = {"rtol": 8 * 2**-23, "atol": 8 * 2**-18}  # see the module docstring
VOCAB = 64
# (prompt, chosen, rejected) lengths: a one-token prompt and completions, and uneven ones.
LENGTHS = [(3, 4, 2), (1, 1, 3), (4, 2, 5)]
ROWS = [[0, 1], [2]]  # pairs 0 and 1 packed in row 0, pair 2 alone in (padded) row 1

CASES = {
    "dpo_sigmoid": ("dpo", {}),
    "dpo_ipo": ("dpo", {"loss_type": ["ipo"]}),
    "dpo_ld_alpha": ("dpo", {"ld_alpha": 0.5}),
    "dpo_wpo": ("dpo", {"use_weighting": True}),
    "dpo_rpo": ("dpo", {"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, 0.5]}),
    "cpo": ("cpo", {}),
    "simpo": ("simpo", {"beta": 1.0}),
    "orpo": ("orpo", {}),
    "reward": ("reward", {}),
}


def _model_cfg(head: str = "lm") -> ModelConfig:
    return tiny_model_config(head)  # its vocab is VOCAB


def _pairs(seed: int = 0) -> list[tuple[list[int], list[int], list[int]]]:
    g = torch.Generator().manual_seed(seed)
    draw = lambda n: torch.randint(0, VOCAB, (n,), generator=g).tolist()  # noqa: E731
    return [(draw(p), draw(c), draw(r)) for p, c, r in LENGTHS]


def _reference_model(seed: int = 4) -> ReferenceModel:
    cfg = SimpleNamespace(model=_model_cfg(), training=SimpleNamespace(precision="fp32", seed=seed))
    ref = ReferenceModel(cfg, ParallelState.single(), torch.device("cpu"), None)
    ref.model.double()  # fp64 transformer, as the policy (DTYPES has no fp64)
    return ref


def _policy(objective) -> GPTModel:
    cfg = _model_cfg(objective.model_head)
    model = GPTModel(cfg, ParallelState.single(), seed=3, outputs=objective.model_outputs)
    return model.double().eval()


def _loss_and_grads(model, objective, batch, ref):
    model.zero_grad()
    policy = forward_outputs(model, batch)
    loss, metrics = objective.loss(policy, ref, batch)
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    assert grads, "the loss reached no parameter"
    return loss.detach(), {k: v.detach() for k, v in metrics.items()}, grads


@pytest.fixture(scope="module")
def data():
    pairs = _pairs()
    return padded_batch(pairs), prefix_shared_batch(pairs, ROWS), _reference_model()


def _max_delta(a: dict, b: dict) -> float:
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


@pytest.mark.parametrize("plan", ["dense", "grouped"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_prefix_shared_equals_padded(case, plan, data, monkeypatch):
    """Loss, metrics, parameter gradients and reference values: prefix-shared == padded, and a
    reference computed under the padded layout (a cache) serves the prefix-shared batch. Under
    both attention plans: the rows' dense mask, and the spans gathered into their own rows (the
    plan chosen for these rows when gathering pays at least half, forced here)."""
    padded, shared, ref_model = data
    if plan == "grouped":
        monkeypatch.setattr(layout_module, "GROUPED_MAX_COST", 1.0)
        shared = prefix_shared_batch(_pairs(), ROWS)  # a fresh layout: plans are memoised
        assert isinstance(shared.layout.attention_plan(), layout_module.GroupedAttention)
    else:
        assert isinstance(shared.layout.attention_plan(), torch.Tensor)
    name, params = CASES[case]
    cls = get_objective(name)
    objective = cls(cls.Config(**params))
    refs = {"padded": None, "shared": None}
    if objective.needs_reference_model:
        refs = {
            "padded": reference_values(ref_model, objective, padded),
            "shared": reference_values(ref_model, objective, shared),
        }
        assert refs["padded"].keys() == refs["shared"].keys()
        for k in refs["padded"]:
            torch.testing.assert_close(refs["shared"][k], refs["padded"][k], **FP32_ULPS)
    model = _policy(objective)
    want_loss, want_m, want_g = _loss_and_grads(model, objective, padded, refs["padded"])
    got_loss, got_m, got_g = _loss_and_grads(model, objective, shared, refs["shared"])
    torch.testing.assert_close(got_loss, want_loss, **FP32_ULPS)
    assert got_m.keys() == want_m.keys()
    for k in want_m:
        torch.testing.assert_close(got_m[k], want_m[k], **FP32_ULPS, msg=lambda m, k=k: f"{k}: {m}")
    for a, b in zip(got_g, want_g, strict=True):
        torch.testing.assert_close(a, b, **FP32_ULPS)
    # the padded layout's reference values (what a cache holds) give the same loss
    cached_loss = _loss_and_grads(model, objective, shared, refs["padded"])[0]
    torch.testing.assert_close(cached_loss, want_loss, **FP32_ULPS)
    print(  # measured |delta|, shown with -s
        f"{case}: loss {float((got_loss - want_loss).abs()):.2e} "
        f"metrics {_max_delta(got_m, want_m):.2e} "
        f"grads {max(float((a - b).abs().max()) for a, b in zip(got_g, want_g, strict=True)):.2e}"
    )


def test_a_dropped_extra_target_is_caught(data):
    """Scoring the rejected's first token nowhere changes the DPO loss far beyond the tolerance:
    the equality above is not vacuous."""
    padded, shared, ref_model = data
    cls = get_objective("dpo")
    objective = cls(cls.Config())
    model = _policy(objective)
    ref = reference_values(ref_model, objective, padded)
    want = _loss_and_grads(model, objective, padded, ref)[1]["logps/rejected"]
    extra = shared.extra_targets
    dropped = shared.replace(
        extra_targets=dataclasses.replace(extra, sequence_ids=torch.full_like(extra.index, -1))
    )
    got = _loss_and_grads(model, objective, dropped, ref)[1]["logps/rejected"]
    assert abs(float(got - want)) > 0.5


def test_extra_outputs_are_those_of_the_padded_rows(data):
    """``extra_logps`` and ``extra_log_sum_sq_probs`` are the padded rejected rows' values at the
    prompt's last position."""
    padded, shared, _ = data
    model = GPTModel(
        _model_cfg(), ParallelState.single(), seed=3, outputs={"token_logps", "log_sum_sq_probs"}
    ).double()
    with torch.no_grad():
        want = forward_outputs(model, padded)
        got = forward_outputs(model, shared)
    n_pairs = len(LENGTHS)
    cols = torch.tensor([p - 1 for p, _, _ in LENGTHS])
    rows = torch.arange(n_pairs) + n_pairs  # the rejected rows
    for name in ("logps", "log_sum_sq_probs"):
        grid = "token_logps" if name == "logps" else name
        torch.testing.assert_close(got[f"extra_{name}"], want[grid][rows, cols], **FP32_ULPS)


def test_positions_number_the_extra_target_first(data):
    """LD-DPO's token positions: the extra target is its sequence's first (1), the grid targets
    follow (2..r); chosen sequences are numbered as in the padded rows."""
    padded, shared, _ = data
    want, got = token_positions(padded), token_positions(shared)
    extra = extra_token_positions(shared)
    assert extra.tolist() == [1] * len(LENGTHS)
    for i in range(shared.num_sequences):
        assert (
            sorted(
                got[shared.sequence_ids == i].tolist()
                + extra[shared.extra_targets.sequence_ids == i].tolist()
            )
            == want[padded.sequence_ids == i].tolist()
        )
    assert extra_token_positions(padded).numel() == 0


def test_kto_refuses_extra_targets(data):
    _, shared, _ = data
    cls = get_objective("kto")
    objective = cls(cls.Config(loss_type="apo_zero_unpaired", reference_free=True))
    n = shared.num_sequences
    batch = shared.replace(labels=torch.ones(n, dtype=torch.bool), kl_start=n)
    policy = {"token_logps": torch.zeros(batch.shape), "extra_logps": torch.zeros(len(LENGTHS))}
    with pytest.raises(ValueError, match="kto: unpaired batches cannot be prefix-shared"):
        objective.loss(policy, None, batch)
    with pytest.raises(ValueError, match="cannot be prefix-shared"):
        objective.reference_log_probs(
            policy["token_logps"], batch, extra_logps=policy["extra_logps"]
        )


def test_cache_key_does_not_depend_on_the_layout(monkeypatch):
    """A cache holds per-example values, the same under every layout: ``data.layout`` (and the
    other row-arranging fields) are not part of its key; the data itself still is."""
    monkeypatch.setattr("megatron.data.meta.read_meta", lambda prefix: {"prefix": str(prefix)})
    data = DataConfig(train=[DataSource(path="/data/pairs")], seq_length=64)
    cls = get_objective("dpo")
    objective = cls(cls.Config())

    def key(**changes):
        cfg = SimpleNamespace(
            training=SimpleNamespace(seed=1),
            model=_model_cfg(),
            data=dataclasses.replace(data, **changes),
            objective=SimpleNamespace(name="dpo"),
        )
        return cache_key(cfg, objective, None)

    padded = key(layout="padded")
    for changes in ({"layout": "packed"}, {"layout": "prefix_shared"}, {"pad_to_multiple_of": 1}):
        assert key(**changes) == padded, changes
    assert key(seq_length=32)["data"] != padded["data"]
    assert set(reference.LAYOUT_FIELDS) <= {f.name for f in dataclasses.fields(DataConfig)}
