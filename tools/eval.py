#!/usr/bin/env python
"""Evaluate a native checkpoint on lm-evaluation-harness tasks, sharded over TP x DP ranks.

Example:
    python tools/eval.py --ckpt runs/demo/dpo --tasks demo_mc,demo_gen,demo_text
    torchrun --nproc_per_node 4 tools/eval.py --ckpt runs/dpo --tp 2 --tasks hellaswag \\
        --num-fewshot 10 --batch-size 16 --output results.json
    python deepy.py tools/eval.py RUN.yml parallel.tensor=2 launcher.nproc_per_node=4 -- \\
        --tasks arc_easy,gsm8k --output results.json

lm-eval (``pip install -e ".[eval]"``) drives the checkpoint directly (megatron/evaluation): the
weights (written at any TP, PP and ZeRO stage) are loaded as --tp tensor-parallel shards, each
data-parallel replica (world / tp) handles a share of the requests, and every result is gathered;
rank 0 prints the table and writes --output (atomically). Generation uses the batched KV-cache
decoder. No Hugging Face export is needed; the numbers equal lm-eval's own `hf` model on the
export (tests/evaluation/test_parity.py).

Under deepy.py the run's config (files and dotted overrides before `--`) gives the launcher, the
TP size (parallel.tensor) and the default --ckpt (checkpoint.save); the flags after `--` are this
tool's. Tasks: lm-eval's names, the repository's configs/eval tasks (demo_mc, demo_gen,
demo_text), and YAMLs under --include-path. The tokenizer is the run's (data.tokenizer, else
CKPT/hf, else the one recorded in the training data's metadata) unless --tokenizer is given.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from megatron.evaluation.errors import EvalError  # noqa: E402


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """``(flags, config arguments)``: config files and overrides come before ``--``."""
    config_args: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        config_args, argv = argv[:cut], argv[cut + 1 :]
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--ckpt", metavar="DIR", help="checkpoint dir (with latest) or an iter_* dir")
    p.add_argument("--tasks", metavar="T1,T2", help="comma-separated task/group names")
    p.add_argument("--include-path", action="append", metavar="DIR", help="your task YAMLs")
    p.add_argument("--num-fewshot", type=int, metavar="N", help="few-shot examples per prompt")
    p.add_argument("--limit", type=float, metavar="N", help="first N docs per task (<1: fraction)")
    p.add_argument("--batch-size", type=int, default=8, help="rows per forward per replica")
    p.add_argument("--output", metavar="FILE", help="results JSON (rank 0, atomic)")
    p.add_argument("--tp", type=int, help="tensor-parallel size (default: config's, else 1)")
    p.add_argument("--tokenizer", metavar="DIR", help="Hugging Face tokenizer dir")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="compute dtype")
    p.add_argument(
        "--add-bos-token",
        choices=("auto", "true", "false"),
        default="auto",
        help="add the tokenizer's special tokens: its own behaviour (auto), always, never",
    )
    p.add_argument("--bootstrap-iters", type=int, default=100_000, help="lm-eval stderr resamples")
    p.add_argument("--seed", type=int, default=1234, help="lm-eval's seeds and sampling's")
    p.add_argument("--list-tasks", action="store_true", help="list local/include-path tasks")
    args = p.parse_args(argv)
    if args.batch_size < 1:
        p.error(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.limit is not None:
        if args.limit <= 0:
            p.error(f"--limit must be > 0, got {args.limit}")
        args.limit = int(args.limit) if args.limit >= 1 else args.limit
    if not args.list_tasks and not args.tasks:
        p.error("--tasks is required (e.g. --tasks demo_mc,demo_gen)")
    return args, config_args


def list_tasks(include_paths: list[str] | None) -> int:
    from megatron.evaluation.tasks import LOCAL_TASKS, check_include_path, task_manager

    paths = [check_include_path(p) for p in include_paths or []] + [LOCAL_TASKS]
    for name in sorted(task_manager(paths, defaults=False).all_tasks):
        print(name)
    print("(plus lm-eval's own tasks: `lm-eval ls tasks`)", file=sys.stderr)
    return 0


def _config(config_args: list[str], world: int):
    """The run config given before ``--`` (None without one)."""
    from megatron.config import ConfigError, load_config, split_config_args

    files, overrides = split_config_args(config_args)
    if not files and not overrides:
        return None
    if not files:
        raise EvalError(f"overrides {overrides} without a config file before --")
    try:
        return load_config(files, overrides, world_size=world)
    except ConfigError as e:
        raise EvalError(f"config error:\n{e}") from None


def evaluate(args: argparse.Namespace, config_args: list[str]) -> int:
    import torch

    from megatron.evaluation.harness import ShardedLM
    from megatron.evaluation.runner import (
        default_tokenizer,
        format_table,
        load_eval_model,
        load_hf_tokenizer,
        run_tasks,
    )
    from megatron.parallel import ParallelState
    from megatron.training.distributed import init_distributed
    from megatron.utils import atomic_write_text

    env = init_distributed()
    cfg = _config(config_args, env.world_size)
    tp = args.tp or (cfg.parallel.tensor if cfg is not None else 1)
    if env.world_size % tp:
        raise EvalError(f"{env.world_size} ranks are not divisible by --tp {tp}")
    ckpt = args.ckpt or (cfg.checkpoint.save if cfg is not None else None)
    if not ckpt:
        raise EvalError("--ckpt DIR is required (or a run config whose checkpoint.save it is)")
    state = ParallelState.build(tp)
    model, config, root = load_eval_model(ckpt, state, env.device, args.dtype)
    tokenizer = load_hf_tokenizer(args.tokenizer or default_tokenizer(config, root))
    bos = {"auto": None, "true": True, "false": False}[args.add_bos_token]
    lm = ShardedLM(
        model, tokenizer, state, batch_size=args.batch_size, add_bos_token=bos, seed=args.seed
    )
    with torch.no_grad():
        results = run_tasks(
            lm,
            [t.strip() for t in args.tasks.split(",") if t.strip()],
            include_paths=args.include_path,
            num_fewshot=args.num_fewshot,
            limit=args.limit,
            bootstrap_iters=args.bootstrap_iters,
            seed=args.seed,
        )
    if env.rank == 0:
        print(
            f"{ckpt}: tp={state.tp_size} dp={state.dp_size} "
            f"({env.world_size} rank{'s' if env.world_size > 1 else ''})"
        )
        print(format_table(results))
        if args.output:
            summary = {k: results.get(k) for k in ("results", "n-samples", "versions", "configs")}
            summary["checkpoint"] = str(ckpt)
            summary["grid"] = {"tp": state.tp_size, "dp": state.dp_size}
            atomic_write_text(args.output, json.dumps(summary, indent=2, default=str) + "\n")
            print(f"wrote {args.output}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args, config_args = parse_args(argv)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    try:
        if args.list_tasks:
            return list_tasks(args.include_path)
        return evaluate(args, config_args)
    except EvalError as exc:
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # why: see train.py (exit-time aborts of gloo/DeepSpeed ranks)
