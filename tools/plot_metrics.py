#!/usr/bin/env python
"""Plot the training and validation curves of one or more runs (their metrics.jsonl) to an image.

Example:
    python tools/plot_metrics.py runs/demo/sft runs/demo/dpo --out plots/demo.png
    python tools/plot_metrics.py runs/a runs/b --metrics loss,rewards/accuracies,grad_norm --smooth 10

One subplot per metric, one colour per run (legend: the directory names), training as lines and
validation as dashed lines with markers. Default metrics: loss and the first of
rewards/accuracies, accuracy, sft/nll, reward that a run has. A step logged again after a resume
counts once (the last record wins). --smooth N draws a trailing mean over N training points
(validation is never smoothed). The image is written atomically; its suffix picks the format.
Needs matplotlib: pip install -e ".[plot]". A bad input stops with `error: FILE[:LINE]: message`.
The logic lives in megatron/plotting.py; this file only parses flags and prints.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from megatron.plotting import PlotError, plot_runs  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run dirs with metrics.jsonl")
    p.add_argument(
        "--metrics",
        metavar="M1,M2",
        help="comma-separated metric names; None: loss and the first accuracy-like metric",
    )
    p.add_argument("--out", default="metrics.png", metavar="FILE", help="image to write")
    p.add_argument("--smooth", type=int, default=1, metavar="N", help="train moving-average width")
    args = p.parse_args(argv)
    if args.smooth < 1:
        p.error(f"--smooth must be >= 1, got {args.smooth}")
    if args.metrics is not None:
        args.metrics = [m.strip() for m in args.metrics.split(",") if m.strip()]
        if not args.metrics:
            p.error("--metrics needs at least one metric name")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        out = plot_runs(args.run_dirs, args.metrics, Path(args.out), args.smooth)
    except PlotError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"plotted {len(args.run_dirs)} run(s) -> {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
