"""``make demo`` at a reduced size: SFT, then DPO, KTO, a reward model and GRPO from it, on the
generated task; metrics printed and moving the right way.

Runs ``tools/demo.py --quick --nproc 1`` (one CPU rank per stage, about 60 s on 2 cores).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_quick_demo_pipeline(tmp_path):
    out = tmp_path / "demo"
    cmd = [sys.executable, "tools/demo.py", "--quick", "--nproc", "1", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for line in (
        "=== held-out results ===",
        "rewards/accuracies",
        "greedy exact match",
        "KTO  step",
        "reward model held-out accuracy",
        "GRPO held-out greedy exact match",
        "=== lm-eval on the held-out tasks (configs/eval; native checkpoints) ===",
        "demo_mc/acc",
        "$ tools/rewardbench.py --model",
        "plots: sft/metrics.png, dpo/metrics.png, kto/metrics.png, rm/metrics.png, grpo/metrics.png",
    ):
        assert line in proc.stdout
    logs = proc.stdout + proc.stderr
    assert "eval tasks at step 0:" in logs  # training.eval_tasks of the SFT run
    assert (
        "  generation: 'sort" in logs
        or "  generation: 'reverse" in logs
        or "  generation: 'inc" in logs
    )
    assert "  held-out " in logs  # GRPO's evaluation logs a sample of its completions
    res = json.loads((out / "results.json").read_text())
    # step 0: the policy is its own reference, so every reward is 0 (ties count as wrong)
    assert res["reward_accuracy_before"] == 0.0 and res["reward_margin_before"] == 0.0
    assert res["reward_accuracy_after"] > 0.5
    assert res["reward_margin_after"] > 0.0
    assert 0.0 <= res["exact_match_sft"] <= 1.0 and 0.0 <= res["exact_match_dpo"] <= 1.0
    sft_nll = [v for _, v in res["sft_valid_nll"]]
    assert sft_nll[-1] < sft_nll[0]  # SFT from scratch learned something
    # the DPO policy was loaded from its checkpoint and decoded: outputs are recorded
    assert (out / "dpo" / "latest").is_file() and (out / "sft" / "latest").is_file()
    # KTO: at step 0 the policy is its reference (zero rewards, zero KL); then it moves
    kto = res["kto_valid"]
    assert kto[0]["kl"] == 0.0 and kto[0]["rewards/chosen"] == 0.0
    assert kto[-1]["rewards/chosen"] > kto[-1]["rewards/rejected"]
    assert 0.0 <= res["exact_match_kto"] <= 1.0
    # the reward model (value head, no lm head) trained and was evaluated before and after
    assert res["rm_valid"][0]["step"] == 0 and res["rm_valid"][-1]["step"] > 0
    assert res["rm_valid"][-1]["loss"] < res["rm_valid"][0]["loss"]
    assert (out / "rm" / "latest").is_file()
    # GRPO: started from the early SFT checkpoint, evaluated (greedy) before, midway and after
    assert res["grpo_start"] == 30 and [r["step"] for r in res["grpo_valid"]] == [0, 3, 6]
    assert 0.0 <= res["grpo_exact_match_after"] <= 1.0 and 0.0 <= res["exact_match_grpo"] <= 1.0
    assert (out / "grpo" / "latest").is_file()
    # lm-eval on every generating stage, in-loop task metrics of the SFT run, plots, RewardBench
    for stage in ("sft", "dpo", "kto", "grpo"):
        assert 0.0 <= res["lm_eval"][stage]["demo_mc/acc"] <= 1.0
        assert res["lm_eval"][stage]["demo_text/bits_per_byte"] > 0
    sft_valid = [json.loads(x) for x in (out / "sft" / "metrics.jsonl").read_text().splitlines()]
    sft_valid = [r for r in sft_valid if r["split"] == "valid"]
    assert all("eval/demo_mc/acc" in r and "eval/demo_gen/exact_match" in r for r in sft_valid)
    for stage in ("sft", "dpo", "kto", "rm", "grpo"):
        assert (out / stage / "metrics.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    subsets = res["rewardbench"]["subsets"]
    assert set(subsets) == {"sort", "reverse", "inc"}
    assert sum(v["n"] for v in subsets.values()) == 64
