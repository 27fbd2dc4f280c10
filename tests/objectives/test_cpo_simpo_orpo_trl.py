"""Parity of ``cpo``, ``simpo`` and ``orpo`` with TRL 1.16's experimental CPO and ORPO trainers.

TRL's ``get_batch_loss_metrics`` runs unbound on a stub (see trl_stubs.py) whose model returns
fixed random logits; our objectives get the per-token log-probs of the same logits (fp32
``log_softmax``) in the packed layout. TRL computes the NLL with ``nn.CrossEntropyLoss`` on the
logits and the log-probs with ``selective_log_softmax``, so this also checks that our token-mean
NLL and per-sequence sums/means match its own. ORPO's NLL covers the prompt in TRL: the batches
use a one-token prompt, which has no target, so both NLLs cover the completion only (the departure
for longer prompts is documented in orpo.py). Tolerance: 1e-5 absolute + 1e-5 relative (fp32
log-softmax computed two ways; the largest difference seen is 3.8e-6, on a loss of 33).
"""

from __future__ import annotations

import pytest
import torch

from megatron.objectives.cpo import CPO, CPOConfig
from megatron.objectives.orpo import ORPO, ORPOConfig
from megatron.objectives.simpo import SimPO, SimPOConfig
from tests.objectives.batches import pair_batch
from tests.objectives.trl_stubs import pair_logits, token_logps_from_logits, trl_pairwise

pytest.importorskip("trl", reason="TRL (the peer implementation) is not installed")
pytestmark = pytest.mark.filterwarnings("ignore:You are importing from .trl.experimental.")

CHOSEN_LENS, REJECTED_LENS = [3, 1, 5, 2], [2, 4, 1, 6]
SHARED = [
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
    "nll_loss",
]


def ours(objective, data) -> tuple[float, dict[str, float]]:
    seqs = token_logps_from_logits(data)
    p = len(CHOSEN_LENS)
    logps, batch = pair_batch(seqs[:p], seqs[p:], "packed")
    loss, metrics = objective.loss({"token_logps": logps}, None, batch)
    return float(loss.detach()), {k: float(v) for k, v in metrics.items()}


def check(objective, trainer_cls, seed: int, keys: list[str], **attrs) -> None:
    data = pair_logits(1, CHOSEN_LENS, REJECTED_LENS, vocab=11, seed=seed)
    loss, metrics = ours(objective, data)
    trl_loss, trl_metrics = trl_pairwise(trainer_cls, data, **attrs)
    mine = torch.tensor([loss] + [metrics[k] for k in keys])
    theirs = torch.tensor([trl_loss] + [trl_metrics[k] for k in keys])
    torch.testing.assert_close(mine, theirs, atol=1e-5, rtol=1e-5)


CPO_CASES = [
    {"loss_type": "sigmoid"},
    {"loss_type": "sigmoid", "label_smoothing": 0.2, "cpo_alpha": 0.5},
    {"loss_type": "hinge"},
    {"loss_type": "ipo", "beta": 0.7},
    {"loss_type": "simpo", "simpo_gamma": 0.8, "label_smoothing": 0.1},
    {"loss_type": "sigmoid", "alpha": 0.05},  # AlphaPO on sums: exp(l) stays representable
    {"loss_type": "simpo", "alpha": 0.4, "cpo_alpha": 0.0},  # TRL's "alphapo"
    {"loss_type": "ipo", "alpha": -0.3},
]


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("cfg", CPO_CASES, ids=str)
def test_cpo(cfg, seed):
    from trl.experimental.cpo import CPOTrainer

    full = CPOConfig(**cfg)
    attrs = {k: getattr(full, k) for k in ("beta", "label_smoothing", "loss_type", "cpo_alpha")}
    attrs |= {"simpo_gamma": full.simpo_gamma, "alpha": full.alpha}
    keys = SHARED if full.cpo_alpha != 0 else SHARED[:-1]  # TRL logs nll_loss 0 when unused
    check(CPO(full), CPOTrainer, seed, keys, **attrs)


@pytest.mark.parametrize(
    "cfg", [{}, {"beta": 2.0, "simpo_gamma": 1.2}, {"cpo_alpha": 0.3, "alpha": 0.2}], ids=str
)
def test_simpo_is_trl_cpo_with_loss_type_simpo(cfg):
    from trl.experimental.cpo import CPOTrainer

    full = SimPOConfig(**cfg)
    attrs = {k: getattr(full, k) for k in ("beta", "label_smoothing", "cpo_alpha", "alpha")}
    attrs |= {"loss_type": "simpo", "simpo_gamma": full.simpo_gamma}
    keys = SHARED if full.cpo_alpha != 0 else SHARED[:-1]
    check(SimPO(full), CPOTrainer, 2, keys, **attrs)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("beta", [0.1, 1.0])
def test_orpo(beta, seed):
    from trl.experimental.orpo import ORPOTrainer

    keys = [*SHARED, "log_odds_ratio", "log_odds_chosen"]
    check(ORPO(ORPOConfig(beta=beta)), ORPOTrainer, seed, keys, beta=beta)
