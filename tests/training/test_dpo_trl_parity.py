"""Trainer-level DPO parity with TRL 1.16's ``DPOTrainer`` on the same model, data and reference.

A tiny random-weight ``LlamaForCausalLM`` (the policy) and a perturbed copy of it (the reference,
so that the log-ratios are not zero and the loss is not ln 2) are saved in Hugging Face format and
converted to native checkpoints. The same 4 conversational pairs (ChatML template, the tests'
byte-level BPE) go to

* TRL: ``DPOTrainer(model=policy, ref_model=reference)``; its own dataset preparation and
  collator, then ``compute_loss`` on the collated batch of the 4 pairs;
* ours: ``tools/preprocess_data.py``'s ``pairwise`` format, then the engine's first step
  (``checkpoint.load`` = converted policy, ``reference.load`` = converted reference), one
  micro-batch of 4 pairs, so the loss is logged before any update.

The prompt/completion token boundaries are checked to agree first (ours follows TRL's rules).
The loss tolerance (fp32) is derived per loss type next to ``H_ATOL``. TRL runs with
``bf16=False``: its configs default to bf16, under which accelerate wraps the reference model's
forward in autocast even on CPU (a 1e-2 logit difference).
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from megatron.ckpt.convert import convert_hf_to_native
from megatron.data.preprocess import PreprocessOptions, preprocess
from tests.data.conftest import CHATML, conversational_pairs, write_jsonl
from tests.dist_pool import DistPool
from tests.helpers_runs import tiny_run_config
from tests.numerics import ulp
from tests.training.helpers import write_config

pytest.importorskip("trl", reason="TRL (the peer implementation) is not installed")

PAIRS = 4
BETA = 0.1
# Tolerance (error model: tests/numerics.py). Both implementations sum per-token log-probs in fp32
# into sequence sums S (|S| < LOGP_SUM_MAX; logged means ~150-190, checked), each within
# ulp(S)/2 of the exact sum, so a pair's log-ratio margin h (4 sums) may differ by
# H_ATOL = 4 ulp(S) = 1.2e-4. The loss moves by at most |dL/dh| times that (_loss_tol):
# sigmoid -log sigma(beta h): beta, 1.2e-5; IPO mean (h - 1/(2 beta))^2: 2 sqrt(L) by
# Cauchy-Schwarz, 1.2e-3 at L = 25 (5e-5 relative); RPO adds 0.5 x TRL's NLL, a token mean
# < NLL_MAX whose sum/count rounding is ~4 ulp(NLL_MAX). Measured |ours - TRL|: sigmoid
# 6e-7..1e-6 (loss 0.722), IPO 3.8e-6..5.7e-6 (loss 25.15), RPO 7e-7..1.2e-6 (loss 3.874);
# a wrong loss is off by > 1e-3 relative.
LOGP_SUM_MAX = 500.0
H_ATOL = 4 * ulp(LOGP_SUM_MAX)
NLL_MAX = 8.0
CASES = {
    "sigmoid": {"loss_type": ["sigmoid"]},
    "ipo": {"loss_type": ["ipo"]},
    "rpo": {"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, 0.5]},
}


def _loss_tol(name: str, trl_loss: float) -> float:
    """The bound on |ours - TRL| for loss type ``name`` (see ``H_ATOL``)."""
    if name == "ipo":
        return 2 * trl_loss**0.5 * H_ATOL
    rpo_nll = 0.5 * 4 * ulp(NLL_MAX) if name == "rpo" else 0.0
    return BETA * H_ATOL + rpo_nll


def _first_step(rank, world, cfg_paths, overrides):
    """Our engine's first step (logged before the optimizer step)."""
    from megatron.config import load_config
    from megatron.training.trainer import Trainer

    history = Trainer(load_config(cfg_paths, overrides, world)).train()
    return history[0]


def _save_models(tmp, tokenizer_dir):
    """Random policy and a perturbed reference, fp32, saved with the tokenizer (+ ChatML)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    tok.chat_template = CHATML
    cfg = LlamaConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        vocab_size=len(tok),
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        bos_token_id=None,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).float()
    with torch.no_grad():  # O(1)-ish logits: log-probs that differ visibly between models
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.5 if "embed" in name else 0.5 * p.shape[1] ** -0.5)
    dirs = {}
    for role in ("policy", "reference"):
        if role == "reference":
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(0.2 * p.std() * torch.randn_like(p))
        dirs[role] = tmp / f"hf_{role}"
        model.save_pretrained(dirs[role])
        tok.save_pretrained(dirs[role])
    return dirs, tok


@pytest.fixture(scope="module")
def env(tmp_path_factory, tiny_tokenizer_dir):
    tmp = tmp_path_factory.mktemp("dpo_trl_parity")
    hf, tok = _save_models(tmp, tiny_tokenizer_dir)
    native = {}
    for role, d in hf.items():
        native[role] = tmp / f"native_{role}"
        convert_hf_to_native(d, native[role], tp_size=1, divisible_by=64)
    rows = conversational_pairs(PAIRS, seed=2)
    (tmp / "chatml.jinja").write_text(CHATML)
    options = PreprocessOptions(data_format="pairwise", chat_template=str(tmp / "chatml.jinja"))
    prefix = tmp / "pairs"
    preprocess([write_jsonl(tmp / "pairs.jsonl", rows)], prefix, native["policy"] / "hf", options)
    run = tiny_run_config(  # the model comes from the converted checkpoint's model.yml
        "chat",
        train=prefix,
        tokenizer=native["policy"] / "hf",
        logs=tmp / "logs",
        with_model=False,
        objective={"name": "dpo", "beta": BETA},
        reference={"load": str(native["reference"])},
        checkpoint={"load": str(native["policy"]), "finetune": True},
        **{
            "data.seq_length": 256,
            "optimizer.lr": 1e-3,
            "training.train_iters": 1,
            "training.micro_batch_size": PAIRS,
            "training.seed": 1,
        },
    )
    paths = [str(native["policy"] / "model.yml"), str(write_config(tmp / "run.yml", run))]
    pool = DistPool(1)
    yield SimpleNamespace(tmp=tmp, hf=hf, tok=tok, rows=rows, prefix=prefix, paths=paths, pool=pool)
    pool.close()


def _trl_loss(env, case: dict) -> tuple[float, list[dict]]:
    """TRL's loss on its collated batch of all pairs, and its tokenized examples."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import DPOConfig, DPOTrainer

    load = dict(dtype=torch.float32, attn_implementation="eager")
    policy = AutoModelForCausalLM.from_pretrained(env.hf["policy"], **load)
    reference = AutoModelForCausalLM.from_pretrained(env.hf["reference"], **load)
    args = DPOConfig(
        output_dir=str(env.tmp / "trl"),
        per_device_train_batch_size=PAIRS,
        beta=BETA,
        max_length=None,
        use_cpu=True,
        bf16=False,  # TRL's configs default to bf16: its reference would run under autocast
        report_to=[],
        save_strategy="no",
        dataset_num_proc=None,
        **case,
    )
    cols = {k: [r[k] for r in env.rows] for k in ("prompt", "chosen", "rejected")}
    trainer = DPOTrainer(
        model=policy,
        ref_model=reference,
        args=args,
        train_dataset=Dataset.from_dict(cols),
        processing_class=env.tok,
    )
    examples = [trainer.train_dataset[i] for i in range(PAIRS)]
    batch = trainer.data_collator(examples)
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, batch)
    return float(loss), examples


def test_token_boundaries_match_trl(env):
    from megatron.data.indexed import IndexedDataset

    _, examples = _trl_loss(env, CASES["sigmoid"])
    for key in ("prompt", "chosen", "rejected"):
        ours = IndexedDataset(f"{env.prefix}.{key}")
        for i, ex in enumerate(examples):
            assert ours[i].tolist() == ex[f"{key}_ids"], (key, i)


@pytest.mark.parametrize("name", list(CASES))
def test_first_step_loss_matches_trl(env, name):
    case = CASES[name]
    trl_loss, _ = _trl_loss(env, case)
    overrides = [f"objective.loss_type={case['loss_type']}"]
    if "loss_weights" in case:
        overrides.append(f"objective.loss_weights={case['loss_weights']}")
    first = env.pool.run(_first_step, env.paths, overrides)[0]
    assert max(abs(first["logps/chosen"]), abs(first["logps/rejected"])) < LOGP_SUM_MAX
    if name == "rpo":
        assert first["nll_loss"] < NLL_MAX
    assert abs(trl_loss - 0.6931) > 1e-3 or name == "ipo"  # not the trivial reference == policy
    ours = first["loss"]
    assert ours == pytest.approx(trl_loss, abs=_loss_tol(name, trl_loss)), (name, ours, trl_loss)
