"""Step time of one config on several (TP, DP, ZeRO) grids, measured in one run.

    python tools/bench/grid_step_time.py [--model configs/models/tiny.yml] [--iters 30]
        [--grids 1x1x1,2x1x1,1x1x2,2x1x2,1x2x1] [--zero 0,1,2,3] [--seq 128] [--micro 4]
        [--global-batch 8]

Grids are TPxPPxDP. Pipeline grids run ZeRO 0 and 1 only (DeepSpeed refuses ZeRO >= 2 with PP).

Each grid is a real launch through ``deepy.py`` (torchrun, gloo on CPU) on a synthetic corpus;
the figure is the median ``step_time`` of the steps after the first five (warm-up excluded), and
the ratio is against the first grid of the list. On a 2-core machine, 4 ranks oversubscribe the
cores: read those rows as a check that the grid works, not as a scaling result.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def corpus(prefix: Path, vocab: int, tokens: int) -> None:
    from megatron.data.indexed import IndexedDatasetWriter

    rng = np.random.default_rng(0)
    with IndexedDatasetWriter(prefix, np.uint16 if vocab < 65536 else np.int32) as w:
        left = tokens
        while left > 0:
            n = int(rng.integers(16, 256))
            w.add_document(rng.integers(1, vocab, size=n))
            left -= n


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default="configs/models/tiny.yml")
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument(
        "--grids", default="1x1x1,2x1x1,1x1x2,2x1x2,1x2x1,2x2x1,1x2x2", help="TPxPPxDP list"
    )
    ap.add_argument("--zero", default="0,1,2,3")
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--micro", type=int, default=4)
    ap.add_argument("--global-batch", type=int, default=8)
    args = ap.parse_args()
    model = yaml.safe_load((ROOT / args.model).read_text())["model"]
    tmp = Path(tempfile.mkdtemp(prefix="grid_bench_"))
    corpus(tmp / "corpus", model["vocab_size"], 400_000)
    run = {
        "data": {"train": [{"path": str(tmp / "corpus")}], "seq_length": args.seq},
        "optimizer": {"lr": 1e-3},
        "schedule": {"style": "constant"},
        "training": {
            "train_iters": args.iters,
            "micro_batch_size": args.micro,
            "global_batch_size": args.global_batch,
        },
        "logging": {"log_interval": args.iters},
    }
    (tmp / "run.yml").write_text(yaml.safe_dump(run))
    rows = []
    for grid in args.grids.split(","):
        tp, pp, dp = (int(x) for x in grid.split("x"))
        for zero in (int(z) for z in args.zero.split(",")):
            if pp > 1 and zero > 1:
                continue
            logs = tmp / f"tp{tp}_pp{pp}_dp{dp}_z{zero}"
            cmd = [
                sys.executable,
                "deepy.py",
                "train.py",
                args.model,
                str(tmp / "run.yml"),
                f"parallel.tensor={tp}",
                f"parallel.pipeline={pp}",
                f"parallel.zero_stage={zero}",
                f"launcher.nproc_per_node={tp * pp * dp}",
                f"logging.dir={logs}",
            ]
            r = subprocess.run(
                cmd,
                cwd=ROOT,
                capture_output=True,
                text=True,
                env=dict(os.environ, OMP_NUM_THREADS="1"),
            )
            if r.returncode:
                print(
                    f"tp={tp} pp={pp} dp={dp} zero={zero}: failed\n{r.stderr[-2000:]}",
                    file=sys.stderr,
                )
                continue
            recs = [json.loads(x) for x in (logs / "metrics.jsonl").read_text().splitlines()]
            times = [x["step_time"] for x in recs if x["split"] == "train" and x["step"] > 5]
            rows.append((tp, pp, dp, zero, statistics.median(times), recs[-1]["loss"]))
    print(
        f"model {args.model}, seq {args.seq}, micro {args.micro}, global batch "
        f"{args.global_batch}, {args.iters} steps, fp32, CPU ({os.cpu_count()} cores)"
    )
    print(
        f"{'TP':>3} {'PP':>3} {'DP':>3} {'ZeRO':>4} {'ms/step':>9} {'vs first':>9} {'final loss':>11}"
    )
    for tp, pp, dp, zero, t, loss in rows:
        print(
            f"{tp:>3} {pp:>3} {dp:>3} {zero:>4} {t * 1e3:>9.1f} {t / rows[0][4]:>8.2f}x {loss:>11.5f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
