#!/usr/bin/env python
"""Packing efficiency (real tokens / row capacity) of the padded and packed pair layouts.

Draws pairs whose prompt / chosen / rejected lengths follow log-normal distributions with the
given medians and spread (defaults: medians 120 / 260 / 220 tokens, sigma 0.8 — the shape of
chat preference data such as UltraFeedback, whose responses are a few hundred tokens with a long
tail), cuts each pair to ``--seq-length`` by dropping prompt tokens from the left as
``--length-policy truncate_prompt`` does, and collates ``--steps`` micro-batches of
``--micro-batch`` pairs with the real :class:`megatron.data.collators.Collator`. Prints the mean
``stats["packing_efficiency"]`` and rows per micro-batch of each layout.

Example:
    python tools/bench/packing_efficiency.py --seq-length 2048 --micro-batch 8
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from a checkout

from megatron.data.collators import Collator  # noqa: E402


def draw_pairs(
    n: int, medians: list[float], sigma: float, seq_length: int, seed: int
) -> list[dict]:
    rng = np.random.default_rng(seed)
    lengths = np.maximum(1, rng.lognormal(np.log(medians), sigma, size=(n, 3)).astype(int))
    pairs = []
    for p, c, r in lengths:
        c, r = min(c, seq_length - 1), min(r, seq_length - 1)
        p = min(p, seq_length - max(c, r))
        pairs.append({k: np.ones(v, np.int64) for k, v in zip(("prompt", "chosen", "rejected"), (p, c, r), strict=True)})  # fmt: skip
    return pairs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seq-length", type=int, default=2048)
    ap.add_argument("--micro-batch", type=int, default=8, help="pairs per micro-batch")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--medians", type=float, nargs=3, default=[120, 260, 220])
    ap.add_argument("--sigma", type=float, default=0.8)
    ap.add_argument("--pad-to-multiple-of", type=int, default=8)
    args = ap.parse_args(argv)
    pairs = draw_pairs(args.steps * args.micro_batch, args.medians, args.sigma, args.seq_length, 0)
    seqs = np.array([[len(x["prompt"]) + len(x[k]) for k in ("chosen", "rejected")] for x in pairs])
    print(
        f"pairs: {len(pairs)}; sequence length p50={np.median(seqs):.0f} "
        f"p90={np.percentile(seqs, 90):.0f} max={seqs.max()} (seq_length {args.seq_length})"
    )
    for layout in ("padded", "packed"):
        collate = Collator("pair", layout, args.seq_length, args.pad_to_multiple_of)
        eff, rows = [], []
        for s in range(args.steps):
            batch = collate(pairs[s * args.micro_batch : (s + 1) * args.micro_batch])
            eff.append(batch.stats["packing_efficiency"])
            rows.append(batch.tokens.shape[0])
        print(
            f"{layout:<7} packing efficiency {np.mean(eff):.3f} (min {np.min(eff):.3f}), "
            f"{np.mean(rows):.1f} rows of <= {args.seq_length} per micro-batch of "
            f"{args.micro_batch} pairs"
        )
    full = seqs.sum() / (2 * len(pairs) * args.seq_length)
    print(f"padding every sequence to seq_length (GPT-NeoX) would give {full:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
