#!/usr/bin/env python
"""The planner's per-rank memory (``megatron/planner.py``) against measured peak memory on CPU.

For each case a fresh job (one process, or two under torchrun for data parallelism) trains a
~155 M-parameter Llama-style model (h 1024, 8 layers, 16 heads / 4 kv heads, ffn 2816, vocab
32000, untied) for 2 steps on random tokens (``lm`` objective; the bf16 case on rows of 128
tokens: bf16 products are slow on CPUs without bf16 units), with DeepSpeed on its CPU
accelerator. Each rank reads its resident memory (RSS) after imports and the config (the
baseline), after the trainer is built, and its peak (``ru_maxrss``) after the steps; "measured"
is the peak minus the baseline. What the planner cannot see on CPU — the CUDA context, NCCL
buffers, allocator fragmentation — is absent here as well; what RSS sees beyond the model (data
loader, DeepSpeed's own buffers) shows up as the error. Blocks of 64 KiB and more are mapped on
their own (``MALLOC_MMAP_THRESHOLD_``) so that freed tensors leave RSS, and DeepSpeed's buffers
count as the pages written (``planner.memory(first_touch=True)``): a CPU makes resident only the
pages a program touches, where a GPU allocates the whole buffer.

    python tools/bench/plan_vs_measured.py [--cases all|NAME,...] [--steps 2]

Prints one row per case: predicted parts and total (GiB), measured peak (GiB), the error, and
the exact activation bytes from saved-tensor hooks (same forward, no allocator) vs the model.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

GIB = 2**30
MODEL = {
    "num_layers": 8, "hidden_size": 1024, "num_attention_heads": 16, "num_kv_heads": 4,
    "ffn_hidden_size": 2816, "vocab_size": 32000, "make_vocab_size_divisible_by": 128,
    "max_position_embeddings": 1024, "norm": "rmsnorm", "activation": "swiglu",
}  # fmt: skip
CASES = {
    # name: (precision, zero, data-parallel ranks, micro-batch, activation checkpointing, seq)
    "fp32-zero0": ("fp32", 0, 1, 2, False, 512),
    "fp32-zero0-ckpt": ("fp32", 0, 1, 2, True, 512),
    "fp32-zero1": ("fp32", 1, 1, 2, False, 512),
    "fp32-zero2-dp2": ("fp32", 2, 2, 2, False, 512),
    "fp32-zero3-dp2": ("fp32", 3, 2, 2, False, 512),
    # bf16 matrix products are slow on CPUs without bf16 units: short rows, the model states
    "bf16-zero1": ("bf16", 1, 1, 1, False, 128),
}
SEQ = 512


def _rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def _maxrss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def _config(work: Path, case: str, steps: int) -> dict:
    precision, zero, dp, mb, ckpt, seq = CASES[case]
    return {
        "model": {**MODEL, "activation_checkpointing": ckpt},
        "parallel": {"zero_stage": zero},
        "data": {"train": [{"path": str(work / "tokens")}], "seq_length": seq},
        "objective": {"name": "lm"},
        "optimizer": {"lr": 1e-4},
        "training": {"train_iters": steps, "micro_batch_size": mb, "global_batch_size": mb * dp,
                     "precision": precision, "seed": 1},
        "logging": {"dir": str(work / case), "log_interval": 1},
    }  # fmt: skip


def _write_tokens(prefix: Path) -> None:
    import numpy as np

    from megatron.data.indexed import IndexedDatasetWriter

    rng = np.random.default_rng(0)
    with IndexedDatasetWriter(prefix, np.uint16) as w:
        for _ in range(64):
            w.add_document(rng.integers(1, MODEL["vocab_size"], size=SEQ * 2))


def _saved_activation_bytes(cfg) -> int:
    """Bytes the model's forward saves for backward (saved-tensor hooks, parameters excluded)."""
    import torch

    from megatron.model import GPTModel
    from megatron.model.layout import SequenceLayout
    from megatron.parallel import ParallelState

    dt = torch.bfloat16 if cfg.training.precision == "bf16" else torch.float32
    model = GPTModel(cfg.model, ParallelState.single(), seed=1).to(dt).train()
    b, s = cfg.training.micro_batch_size, cfg.data.seq_length
    tokens = torch.randint(0, cfg.model.vocab_size, (b, s))
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(tokens, SequenceLayout.causal(b, s), targets=tokens)
    return sum(seen.values())


def worker(case: str, work: Path, steps: int) -> None:
    import torch.distributed as dist

    from megatron import planner
    from megatron.config import load_config
    from megatron.training.distributed import discover
    from megatron.training.trainer import Trainer

    world = discover(os.environ).world_size
    cfg = load_config([str(work / f"{case}.yml")], [], world_size=world)
    base = _rss()
    trainer = Trainer(cfg)
    built = _rss()
    trainer.train()
    peak = _maxrss()
    grid = planner.Grid(1, 1, world, cfg.parallel.zero_stage, cfg.training.micro_batch_size,
                        cfg.model.activation_checkpointing)  # fmt: skip
    work_ = planner.workload(cfg, "sequence", False, world)
    mem = planner.memory(cfg.model, work_, grid, first_touch=True)  # CPU: touched pages
    out = {
        "rank": dist.get_rank() if dist.is_initialized() else 0,
        "built": built - base,
        "peak": peak - base,
        "predicted": dict(mem.rows()),
    }
    # a file per rank: two ranks printing at once interleave their lines
    (work / f"{case}.rank{out['rank']}.json").write_text(json.dumps(out))
    sys.stdout.flush()
    os._exit(0)  # why: see train.py (exit-time aborts of gloo/DeepSpeed)


def run_case(case: str, work: Path, steps: int, glibc_default: bool = False) -> list[dict]:
    import yaml

    (work / f"{case}.yml").write_text(yaml.safe_dump(_config(work, case, steps)))
    dp = CASES[case][2]
    # why MALLOC_MMAP_THRESHOLD_: blocks of 64 KiB and more are mapped and unmapped on their
    # own, so RSS follows the live tensors; with glibc's defaults, freed heap blocks stay
    # resident and a step's peak includes the previous step's freed temporaries (~0.45 GiB
    # here; the --glibc-default flag measures that way).
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, 2 // dp)), "DS_ACCELERATOR": "cpu",
           "PYTHONPATH": str(ROOT)}  # fmt: skip
    if not glibc_default:
        env["MALLOC_MMAP_THRESHOLD_"] = str(64 * 1024)
    me = [__file__, "--worker", case, "--work", str(work), "--steps", str(steps)]
    if dp > 1:
        from megatron.training.distributed import free_port

        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={dp}",
               f"--master_port={free_port()}", *me]  # fmt: skip
    else:
        cmd = [sys.executable, *me]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    rows = [json.loads(p.read_text()) for p in sorted(work.glob(f"{case}.rank*.json"))]
    if proc.returncode or not rows:
        raise RuntimeError(f"{case} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--cases", default="all", help="comma-separated names, or all: " + ", ".join(CASES)
    )
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--glibc-default", action="store_true", help="keep glibc's mmap threshold")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args.worker, args.work, args.steps)
        return
    cases = list(CASES) if args.cases == "all" else args.cases.split(",")
    from megatron import planner
    from megatron.config import load_config

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        _write_tokens(work / "tokens")
        print(
            f"model: {MODEL}; rows of 512 tokens (bf16: 128); CPU, DeepSpeed CPU accelerator; "
            "peak RSS - baseline per rank"
        )
        head = (f"{'case':<18}{'weights':>8}{'grads':>7}{'optim':>7}{'ZeRO':>6}{'activ':>7}{'logp':>6}"
                f"{'pred':>7}{'measured':>9}{'error':>8}{'act model/hooks':>17}")  # fmt: skip
        print(head)
        for case in cases:
            rows = run_case(case, work, args.steps, args.glibc_default)
            pred = rows[0]["predicted"]
            measured = max(r["peak"] for r in rows)
            cfg = load_config([str(work / f"{case}.yml")], [], world_size=CASES[case][2])
            ratio = "-"
            if not cfg.model.activation_checkpointing:  # hooks see no recomputation peak
                hooks = _saved_activation_bytes(cfg)
                grid = planner.Grid(1, 1, 1, 0, cfg.training.micro_batch_size, False)
                work_ = planner.workload(cfg, "sequence", False, 1)
                ratio = f"{planner.activations(cfg.model, work_, grid, 1) / hooks:.4f}"
            err = (pred["peak"] - measured) / measured
            print(
                f"{case:<18}{pred['weights'] / GIB:8.2f}{pred['gradients'] / GIB:7.2f}"
                f"{pred['optimizer states'] / GIB:7.2f}{pred['ZeRO buffers'] / GIB:6.2f}"
                f"{pred['activations'] / GIB:7.2f}"
                f"{pred['log-prob buffers'] / GIB:6.2f}{pred['peak'] / GIB:7.2f}"
                f"{measured / GIB:9.2f}{err:+8.1%}{ratio:>17}",
                flush=True,
            )


if __name__ == "__main__":
    main()
