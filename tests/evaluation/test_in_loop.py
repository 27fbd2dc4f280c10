"""``training.eval_tasks``: lm-eval tasks on the live weights of a TP = 2 run (2 gloo ranks).

The demo's own data (``tools/demo.py``, a reduced size) trains the demo model for 2 steps with
the shipped tasks evaluated at steps 0 and 2. The metrics land in the validation records of
``metrics.jsonl`` as ``eval/<task>/<metric>``, and those of step 2 equal what ``tools/eval.py``
computes afterwards from the step-2 checkpoint (same weights, same requests; the in-loop run
batches them over the live DeepSpeed engine at TP 2, the tool over the loaded weights at TP 1, so
the log-likelihood metrics agree to fp32 round-off and the accuracies exactly).
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from tests.dist_pool import DistPool

pytest.importorskip("lm_eval", reason="lm-eval is a test dependency (pip install -e '.[eval]')")
ROOT = Path(__file__).resolve().parents[2]
TASKS = ["demo_mc", "demo_gen", "demo_text"]


def _demo():
    spec = importlib.util.spec_from_file_location("demo_tool", ROOT / "tools" / "demo.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def _train(rank, world, files, overrides):
    from megatron.config import load_config
    from megatron.training.trainer import Trainer

    Trainer(load_config(files, overrides, world)).train()
    return True


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    demo = _demo()
    out = tmp_path_factory.mktemp("in_loop")
    sizes = demo.Sizes(
        sft_rows=200, dpo_pairs=40, valid_rows=16, sft_iters=2, dpo_iters=1,
        dpo_eval_interval=1, kto_iters=1, rm_iters=1, grpo_start=1, grpo_iters=1, generations=1, eval_limit=8,
    )  # fmt: skip
    demo.prepare_data(out, sizes)
    files = [str(ROOT / "configs/demo/model.yml"), str(ROOT / "configs/demo/sft.yml")]
    overrides = [
        f"data.train=[{{path: {out / 'data/sft_train'}}}]",
        f"data.valid=[{{path: {out / 'data/sft_valid'}}}]",
        f"data.tokenizer={out / 'tokenizer'}",
        f"checkpoint.save={out / 'sft'}",
        f"logging.dir={out / 'sft'}",
        "training.train_iters=2",
        "schedule.warmup_iters=1",
        "training.eval_interval=2",
        "training.eval_iters=1",
        "training.global_batch_size=4",
        "training.micro_batch_size=4",
        "checkpoint.save_interval=2",
        "parallel.tensor=2",
        f"training.eval_tasks=[{','.join(TASKS)}]",
        "training.eval_tasks_limit=8",
    ]
    pool = DistPool(2)
    try:
        pool.run(_train, files, overrides)
    finally:
        pool.close()
    return out


def test_task_metrics_are_logged_at_each_evaluation(run):
    records = [json.loads(x) for x in (run / "sft" / "metrics.jsonl").read_text().splitlines()]
    valid = [r for r in records if r["split"] == "valid"]
    assert [r["step"] for r in valid] == [0, 2]
    for r in valid:
        assert 0 <= r["eval/demo_mc/acc"] <= 1
        assert 0 <= r["eval/demo_gen/exact_match"] <= 1
        assert r["eval/demo_text/bits_per_byte"] > 0
        assert "loss" in r  # the validation loss is still there


def test_step_2_equals_the_offline_tool_on_its_checkpoint(run, capsys):
    from tests.tools.helpers import load_tool

    records = [json.loads(x) for x in (run / "sft" / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in records if r["split"] == "valid" and r["step"] == 2][0]
    tool = load_tool("tools/eval.py")
    output = run / "eval.json"
    code = tool.main(
        ["--ckpt", str(run / "sft"), "--tasks", ",".join(TASKS), "--limit", "8",
         "--bootstrap-iters", "0", "--output", str(output)]
    )  # fmt: skip
    assert code == 0
    results = json.loads(output.read_text())["results"]
    assert logged["eval/demo_mc/acc"] == results["demo_mc"]["acc,none"]
    assert logged["eval/demo_gen/exact_match"] == results["demo_gen"]["exact_match,none"]
    bpb = results["demo_text"]["bits_per_byte,none"]
    assert logged["eval/demo_text/bits_per_byte"] == pytest.approx(bpb, rel=1e-5)
    assert "demo_mc" in capsys.readouterr().out  # the printed table
