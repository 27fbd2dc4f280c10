"""Per-rank memory and throughput of a run, and the parallel grids that fit a cluster.

    python tools/plan.py MODEL.yml RUN.yml [MORE.yml ...] [key=value ...] \
        [--gpus N] [--gpu-mem GiB] [--gpus-per-node 8] [--mfu 0.4] [--peak-tflops 989] [--top 10]

Reads the run's config like ``train.py`` does (nothing is launched, no data is read) and prints:

1. the run's own grid (``parallel`` section, ``--gpus`` ranks; default the launcher's nodes x
   ranks per node): per rank, the memory of weights, gradients, optimizer states (by ZeRO stage),
   activations (micro-batch x sequence length, with the config's activation checkpointing), the
   chunked log-prob buffers, the reference model, and the rollout KV cache (online RL);
2. the trained tokens/s the job reaches at ``--mfu`` of ``--peak-tflops`` per GPU (default 989:
   an H100 SXM's dense bf16 peak);
3. for a cluster of ``--gpus`` GPUs of ``--gpu-mem`` GiB: every TP x PP x DP x ZeRO x
   micro-batch x checkpointing grid whose busiest rank fits, best first (``--top`` rows).

The model and its error against measured memory: ``megatron/planner.py`` and
``tools/bench/plan_vs_measured.py``. ``--reserve`` GiB per GPU (default 4: CUDA context, NCCL
buffers, allocator fragmentation — not modelled, not measured here) are kept free.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron import planner  # noqa: E402
from megatron.config import ConfigError, load_config, split_config_args  # noqa: E402
from megatron.config.validate import reference_source  # noqa: E402
from megatron.objectives.registry import get_objective  # noqa: E402

GiB = planner.GiB


def _parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--gpus", type=int, help="GPUs of the job (default: the launcher's)")
    parser.add_argument("--gpu-mem", type=float, default=80.0, help="GiB per GPU (default 80)")
    parser.add_argument("--gpus-per-node", type=int, default=8, help="TP stays within a node")
    parser.add_argument("--mfu", type=float, default=0.4, help="model FLOPs utilisation")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="per GPU (H100: 989)")
    parser.add_argument("--reserve", type=float, default=4.0, help="GiB kept free per GPU")
    parser.add_argument("--top", type=int, default=10, help="grids to list")
    return parser.parse_known_args(argv)


def _gib(x: float) -> str:
    return f"{x / GiB:8.2f}"


def main(argv: list[str]) -> int:
    args, rest = _parse(argv)
    files, overrides = split_config_args(rest)
    unknown = [a for a in rest if a.startswith("--")]
    if unknown or not files:
        print(f"plan.py: {'unknown option ' + unknown[0] if unknown else 'no config file'} "
              "(usage: tools/plan.py MODEL.yml RUN.yml [--gpus N] ...)", file=sys.stderr)  # fmt: skip
        return 2
    try:
        probe = load_config(files, overrides)
        la = probe.launcher
        gpus = args.gpus or (la.nproc_per_node or 1) * la.num_nodes
        cfg = load_config(files, overrides, world_size=gpus)
    except ConfigError as e:
        print(f"config error:\n{e}", file=sys.stderr)
        return 2
    m, par = cfg.model, cfg.parallel
    kind = get_objective(cfg.objective.name).batch_kind
    ref = reference_source(cfg) == "model"
    work = planner.workload(cfg, kind, ref, par.data)
    grid = planner.Grid(
        par.tensor, par.pipeline, par.data, par.zero_stage, cfg.training.micro_batch_size,
        m.activation_checkpointing, par.sequence_parallel,
    )  # fmt: skip
    mem = planner.memory(m, work, grid)
    print(
        f"model: {planner.total_params(m) / 1e9:.2f} B parameters "
        f"({planner.non_embedding_params(m) / 1e9:.2f} B outside the embeddings), "
        f"{cfg.training.precision}; objective {cfg.objective.name} ({kind} rows of "
        f"{work.seq_length} x {work.rows_per_sample} tokens), reference "
        f"{'model' if ref else 'none/cache'}"
    )
    print(f"\nper rank, {grid.describe()} on {gpus} GPUs (GiB):")
    for name, value in mem.rows():
        print(f"  {name:<18}{_gib(value)}")
    tps = planner.tokens_per_s(m, work, gpus, args.mfu, args.peak_tflops)
    speed = planner.grid_speed(m, work, grid)
    step_tokens = cfg.training.global_batch_size * work.seq_length * work.rows_per_sample
    print(
        f"\nthroughput at MFU {args.mfu:g} of {args.peak_tflops:g} TFLOP/s per GPU: "
        f"{tps:,.0f} tokens/s ({tps / gpus:,.0f} per GPU); this grid: x{speed:.2f} "
        f"(recomputation, pipeline bubble) = {tps * speed:,.0f} tokens/s: "
        f"{step_tokens / (tps * speed):.1f} s per step of {step_tokens:,} tokens (full rows)"
    )
    budget = (args.gpu_mem - args.reserve) * GiB
    fits = planner.search(
        m, work, gpus, budget, gpus_per_node=args.gpus_per_node, pipeline_ok=kind != "prompt"
    )
    print(
        f"\ngrids of {gpus} x {args.gpu_mem:g} GiB that fit ({args.reserve:g} GiB kept free), best first:"
    )
    if not fits:
        print("  none: more GPUs, larger ones, or a shorter seq_length / smaller model")
        return 0
    head = ("  grid                                 peak weights  grads  optim   ZeRO    ref  activ"
            "  speed  tokens/s")  # fmt: skip
    print(head)
    for f in fits[: args.top]:
        g, mm = f.grid, f.memory
        print(
            f"  {g.describe():<34}{mm.total / GiB:7.1f}{mm.weights / GiB:8.1f}"
            f"{mm.gradients / GiB:7.1f}{mm.optimizer / GiB:7.1f}{mm.zero_buffers / GiB:7.1f}"
            f"{mm.reference / GiB:7.1f}{(mm.activations + mm.logprob_buffers) / GiB:7.1f}"
            f"{f.speed:7.2f}{tps * f.speed:10,.0f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
