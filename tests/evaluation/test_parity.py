"""Our lm-eval adapter on a native checkpoint vs lm-eval's own ``hf`` model on its export.

A tiny random Llama (weights redrawn at O(1) scale, so logits are peaked and greedy choices are
not near-ties) with the demo's byte-level BPE tokenizer is converted to a native checkpoint and
exported back to Hugging Face. The three shipped tasks (``demo_mc``: log-likelihood multiple
choice, ``demo_gen``: greedy generation, ``demo_text``: rolling log-likelihood) run through
``ShardedLM`` on the native weights and through ``lm_eval.models.huggingface.HFLM`` on the export,
with per-sample responses logged, and are compared request by request:

* fp64 (both models in double precision): the same arithmetic up to summation order, so every
  log-likelihood agrees to 1e-9 (fp64 eps 2.2e-16 times the ~1e3 terms and O(10) magnitudes of a
  sequence's logits leaves many orders of margin); greedy flags, accuracies and generated strings
  are identical.
* fp32 (the default): log-likelihoods agree to 1e-3 absolute (fp32 eps 1.2e-7 x logit magnitude
  O(10) x up to ~100 positions summed per request, with margin); accuracies and generations
  identical (the redrawn weights keep the argmax margins far above fp32 round-off).
* the same fp32 comparison with TP = 2 (tensor-parallel logits gathered) and DP = 2 (requests
  split over replicas, gathered) in a gloo pool.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.ckpt.hf_models import LLAMA_SIZES, save_random_model
from tests.dist_pool import DistPool

pytest.importorskip("lm_eval", reason="lm-eval is a test dependency (pip install -e '.[eval]')")

TASKS = ["demo_mc", "demo_gen", "demo_text"]
LIMIT = 24
VOCAB = 384
DATA = Path(__file__).resolve().parents[2] / "configs" / "eval" / "data" / "demo_heldout.jsonl"


def _corpus() -> list[str]:
    rows = [json.loads(line) for line in DATA.read_text().splitlines()]
    return [r["prompt"] + r["answer"] for r in rows] * 20


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """``(native checkpoint, exported HF dir)`` of one random model with a real tokenizer."""
    from transformers import LlamaConfig

    from megatron.ckpt.convert import convert_hf_to_native, convert_native_to_hf
    from megatron.ckpt.hf_io import copy_hf_extras
    from megatron.ckpt.native import read_checkpoint_config
    from megatron.tokenizer.build import build_byte_level_bpe

    root = tmp_path_factory.mktemp("parity")
    tok_dir = build_byte_level_bpe(_corpus(), VOCAB, root / "tok")
    config = LlamaConfig(
        **{**LLAMA_SIZES, "vocab_size": VOCAB, "max_position_embeddings": 128},
        bos_token_id=None,
        eos_token_id=0,
        pad_token_id=1,
    )
    save_random_model(config, root / "src", seed=3)
    copy_hf_extras(tok_dir, root / "src", with_config=False)
    convert_hf_to_native(root / "src", root / "native", tp_size=1)
    _, cfg = read_checkpoint_config(root / "native")
    convert_native_to_hf(root / "native", root / "export", config=cfg, extras_dir=root / "src")
    return root / "native", root / "export"


def _responses(results: dict) -> dict[str, list]:
    """Per task, each sample's raw responses in doc order."""
    out = {}
    for task, samples in results["samples"].items():
        out[task] = [s["resps"] for s in sorted(samples, key=lambda s: s["doc_id"])]
    return out


def _evaluate(lm) -> dict:
    from megatron.evaluation.runner import run_tasks

    return run_tasks(lm, TASKS, limit=LIMIT, bootstrap_iters=0, log_samples=True)


def _ours(ckpt: Path, tp: int = 1, double: bool = False) -> dict:
    from megatron.evaluation.harness import ShardedLM
    from megatron.evaluation.runner import (
        default_tokenizer,
        load_eval_model,
        load_hf_tokenizer,
    )
    from megatron.parallel import ParallelState

    state = (
        ParallelState.build(tp) if torch.distributed.is_initialized() else ParallelState.single()
    )
    model, config, root = load_eval_model(ckpt, state, torch.device("cpu"))
    if double:
        model = model.double()
    tok = load_hf_tokenizer(default_tokenizer(config, root))
    return _evaluate(ShardedLM(model, tok, state, batch_size=5))


def _theirs(hf_dir: Path, dtype: str = "float32") -> dict:
    from lm_eval.models.huggingface import HFLM

    return _evaluate(HFLM(pretrained=str(hf_dir), device="cpu", batch_size=5, dtype=dtype))


def _compare(ours: dict, theirs: dict, tol: float) -> None:
    a, b = _responses(ours), _responses(theirs)
    assert a.keys() == b.keys() == set(TASKS)
    for task in TASKS:
        assert len(a[task]) == len(b[task]) == LIMIT
        for i, (ra, rb) in enumerate(zip(a[task], b[task], strict=True)):
            for (x,), (y,) in zip(ra, rb, strict=True):  # one response per request
                if task == "demo_gen":
                    assert x == y, f"{task} doc {i}: generated {x!r} vs hf {y!r}"
                elif task == "demo_mc":
                    (lla, greedy_a), (llb, greedy_b) = x, y
                    assert abs(lla - llb) <= tol, f"{task} doc {i}: {lla} vs hf {llb}"
                    assert greedy_a == greedy_b
                else:
                    assert abs(x - y) <= tol, f"{task} doc {i}: {x} vs hf {y}"
    for task in TASKS:
        for key, value in theirs["results"][task].items():
            if isinstance(value, float) and "stderr" not in key:
                assert ours["results"][task][key] == pytest.approx(value, rel=1e-6, abs=tol)
    assert ours["results"]["demo_mc"]["acc,none"] == theirs["results"]["demo_mc"]["acc,none"]
    gen = ours["results"]["demo_gen"]["exact_match,none"]
    assert gen == theirs["results"]["demo_gen"]["exact_match,none"]


def test_fp64_equal_to_hf(models):
    native, export = models
    _compare(_ours(native, double=True), _theirs(export, "float64"), tol=1e-9)


def test_fp32_equal_to_hf(models):
    native, export = models
    _compare(_ours(native), _theirs(export), tol=1e-3)


def _pooled(rank: int, world: int, native: str, tp: int) -> dict:
    result = _ours(Path(native), tp=tp)
    return {"samples": result["samples"], "results": result["results"]}


@pytest.fixture(scope="module")
def pool():
    p = DistPool(2)
    yield p
    p.close()


@pytest.mark.parametrize("tp", [2, 1], ids=["tp2", "dp2"])
def test_tp_and_dp_equal_to_hf(models, pool, tp):
    native, export = models
    per_rank = pool.run(_pooled, str(native), tp)
    theirs = _theirs(export)
    for result in per_rank:  # every rank holds every result
        _compare(result, theirs, tol=1e-3)
