#!/usr/bin/env python
"""Our lm-eval adapter on a native checkpoint vs lm-eval's own `hf` model on its export.

Example:
    python tools/bench/eval_parity.py --ckpt runs/demo/dpo --tasks demo_mc,demo_gen,demo_text

Exports CKPT with tools/ckpts/convert_native_to_hf.py's logic (the run's tokenizer carried) to
--hf-dir (default: a temporary directory), runs the tasks through megatron/evaluation's ShardedLM
on the native weights (TP 1) and through lm_eval.models.huggingface.HFLM on the export, both with
per-sample logging, and prints per task and metric both values and, over the requests, the
largest |difference| of the log-likelihoods and the number of differing generations and greedy
flags. One run, one machine; no timing.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def _responses(results: dict) -> dict[str, list]:
    return {
        task: [s["resps"] for s in sorted(samples, key=lambda s: s["doc_id"])]
        for task, samples in results["samples"].items()
    }


def compare(ours: dict, theirs: dict) -> dict[str, dict[str, float]]:
    """Per task: ``max_abs_loglik`` difference, ``greedy_diff`` and ``text_diff`` counts."""
    out = {}
    a, b = _responses(ours), _responses(theirs)
    for task in sorted(a):
        worst, greedy, text = 0.0, 0, 0
        for ra, rb in zip(a[task], b[task], strict=True):
            for (x,), (y,) in zip(ra, rb, strict=True):
                if isinstance(x, str):
                    text += x != y
                elif isinstance(x, list | tuple):
                    worst = max(worst, abs(x[0] - y[0]))
                    greedy += bool(x[1]) != bool(y[1])
                else:
                    worst = max(worst, abs(x - y))
        out[task] = {"max_abs_loglik": worst, "greedy_diff": greedy, "text_diff": text}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", required=True, help="native checkpoint (a generating model)")
    p.add_argument("--tasks", default="demo_mc,demo_gen,demo_text", help="comma-separated")
    p.add_argument("--limit", type=int, help="first N docs per task")
    p.add_argument("--hf-dir", help="where to export (default: a temporary directory)")
    p.add_argument("--batch-size", type=int, default=16, help="rows per forward, both models")
    args = p.parse_args(argv)

    import torch
    from lm_eval.models.huggingface import HFLM

    from megatron.ckpt.native import read_checkpoint_config
    from megatron.evaluation.harness import ShardedLM
    from megatron.evaluation.runner import (
        default_tokenizer,
        load_eval_model,
        load_hf_tokenizer,
        run_tasks,
    )
    from megatron.parallel import ParallelState

    tasks = [t for t in args.tasks.split(",") if t]
    root, config = read_checkpoint_config(args.ckpt)
    tmp = tempfile.TemporaryDirectory()
    hf_dir = Path(args.hf_dir or Path(tmp.name) / "hf")
    export = [sys.executable, str(ROOT / "tools/ckpts/convert_native_to_hf.py")]
    subprocess.run(
        [*export, "--ckpt", args.ckpt, "--out", str(hf_dir), "--no-progress"], check=True
    )
    state = ParallelState.single()
    model, _, _ = load_eval_model(args.ckpt, state, torch.device("cpu"))
    tok = load_hf_tokenizer(default_tokenizer(config, root))
    kw = {"limit": args.limit, "bootstrap_iters": 0, "log_samples": True}
    ours = run_tasks(ShardedLM(model, tok, state, batch_size=args.batch_size), tasks, **kw)
    hf = HFLM(pretrained=str(hf_dir), device="cpu", batch_size=args.batch_size, dtype="float32")
    theirs = run_tasks(hf, tasks, **kw)
    diffs = compare(ours, theirs)
    print(f"{args.ckpt} (native, TP 1) vs lm-eval hf on its export {hf_dir}, fp32, CPU")
    print(f"{'task':<10} {'metric':<16} {'ours':>10} {'hf':>10}  max|dLL|  greedy/text diffs")
    for task in tasks:
        for key, value in sorted(theirs["results"][task].items()):
            if not isinstance(value, float) or "stderr" in key:
                continue
            d = diffs[task]
            print(
                f"{task:<10} {key.split(',')[0]:<16} {ours['results'][task][key]:>10.4f} "
                f"{value:>10.4f}  {d['max_abs_loglik']:.1e}  {d['greedy_diff']}/{d['text_diff']}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
