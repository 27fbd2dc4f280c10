"""Numerics-neutral check (STYLE.md rule 22): the demo's stages for a few steps, losses recorded.

Runs the embedded demo's data, SFT for ``--sft-iters`` steps, then DPO, KTO and the reward model
for ``--iters`` steps each from that SFT checkpoint (2 CPU ranks, the demo's configs), and writes
every step's training loss and every validation record to ``OUT/losses.json``. Run it on two
checkouts and compare::

    python tools/bench/same_losses.py --out runs/before      # on the old commit
    python tools/bench/same_losses.py --out runs/after       # on the new one
    python tools/bench/same_losses.py --compare runs/before/losses.json runs/after/losses.json

``--compare`` prints the largest absolute difference per stage and exits 1 unless every value is
identical (the same machine and thread count must give bit-identical losses for a refactor that
does not change the numerics).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

STAGES = ("dpo", "kto", "rm")
TIMING = frozenset({"time", "step_time", "tokens_per_s", "samples_per_s"})
"""Wall-clock fields of metrics.jsonl: not compared."""


def record(out: Path, sft_iters: int, iters: int) -> dict[str, list[dict]]:
    """Run the stages into ``out`` and return ``{stage: metrics.jsonl records}``."""
    import demo

    shutil.rmtree(out, ignore_errors=True)
    demo.prepare_data(out, demo.FULL)
    launcher = ["launcher.nproc_per_node=2"]
    demo.train_stage(out, "sft", sft_iters, sft_iters, launcher)
    from_sft = [f"checkpoint.load={out / 'sft'}", "checkpoint.finetune=true", *launcher]
    for stage in STAGES:
        demo.train_stage(out, stage, iters, iters // 2, from_sft)
    result = {}
    for stage in ("sft", *STAGES):
        rows = [json.loads(x) for x in (out / stage / "metrics.jsonl").read_text().splitlines()]
        result[stage] = [{k: v for k, v in r.items() if k not in TIMING} for r in rows]
    return result


def compare(a: Path, b: Path) -> int:
    """Print the largest difference per stage; 0 when every recorded value is identical."""
    x, y = json.loads(a.read_text()), json.loads(b.read_text())
    same = True
    for stage in x:
        worst, n = 0.0, 0
        if len(x[stage]) != len(y.get(stage, [])):
            print(f"{stage}: {len(x[stage])} vs {len(y.get(stage, []))} records")
            same = False
            continue
        for r, s in zip(x[stage], y[stage], strict=True):
            for k, v in r.items():
                if k not in TIMING and isinstance(v, float | int) and not isinstance(v, bool):
                    worst = max(worst, abs(v - s.get(k, float("nan"))))
                    n += 1
        print(f"{stage}: {len(x[stage])} records, {n} values, max |diff| {worst:.3g}")
        same &= worst == 0.0
    print("identical" if same else "DIFFERENT")
    return 0 if same else 1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "same_losses")
    ap.add_argument("--sft-iters", type=int, default=100)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--compare", nargs=2, type=Path, metavar=("BEFORE", "AFTER"))
    args = ap.parse_args()
    if args.compare:
        return compare(*args.compare)
    losses = record(args.out.resolve(), args.sft_iters, args.iters)
    (args.out / "losses.json").write_text(json.dumps(losses, indent=1) + "\n")
    print(f"wrote {args.out / 'losses.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
