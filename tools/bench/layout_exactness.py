#!/usr/bin/env python
"""Per-sequence log-probs under every pair layout against ``padded``: the exactness table.

Loads a native checkpoint (TP 1, one process, no gradient), collates the first ``--pairs`` pairs
of a ``pairwise`` dataset in micro-batches of ``--micro-batch`` under each layout exactly as
training does, and sums each sequence's target log-probs (``prompt + chosen`` and ``prompt +
rejected``) as the DPO family reads them. Prints, per layout, the largest absolute and relative
difference from the padded layout's sums, in fp32 (the training precision here) and in fp64
(``--fp64``: the transformer in fp64, where the layouts are the same math and only round-off of
the fp32 vocabulary projection remains — see tests/model/test_layout.py).

What to expect in fp32: the layouts feed the same tokens through the same weights but in other
row shapes, so BLAS blocks the matrix products differently and attention sums its keys in
another order; each hidden state then differs by a few fp32 ulps, and a sequence's sum of ``m``
token log-probs by about ``m`` ulps of its magnitude (relative ~1e-6). A layout bug (a token
attending across spans, a dropped target) moves sums by O(1).

Example:
    python tools/bench/layout_exactness.py --load /tmp/dpo_vs_trl/native --data /tmp/dpo_vs_trl/pairs
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # run from a checkout

LAYOUTS = ("padded", "packed", "prefix_shared", "prefix_shared_packed")


def sequence_sums(model, collate, dataset, n: int, micro: int):
    """``[2n]`` fp64 sums: chosen 0..n-1, then rejected, over micro-batches of ``micro`` pairs."""
    import torch

    from megatron.objectives.logprobs import sequence_log_probs
    from megatron.training.step import forward_outputs

    chosen, rejected = [], []
    with torch.no_grad():
        for start in range(0, n, micro):
            batch = collate([dataset[i] for i in range(start, min(start + micro, n))])
            out = forward_outputs(model, batch)
            sums, _ = sequence_log_probs(out["token_logps"], batch, out.get("extra_logps"))
            half = sums.numel() // 2
            chosen.append(sums[:half].double())
            rejected.append(sums[half:].double())
    return torch.cat(chosen + rejected)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--load", type=Path, required=True, help="native checkpoint (with model.yml)")
    p.add_argument("--data", required=True, help="pairwise dataset prefix")
    p.add_argument("--pairs", type=int, default=256)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--seq-length", type=int, default=1024)
    p.add_argument("--fp64", action="store_true", help="run the transformer in fp64")
    args = p.parse_args()

    import torch
    import yaml

    from megatron.ckpt.layout import resolve_checkpoint
    from megatron.ckpt.native import load_tp_shard
    from megatron.config import load_config
    from megatron.data.collators import Collator
    from megatron.data.datasets import PairwiseDataset
    from megatron.model.gpt import build_loaded
    from megatron.objectives import get_objective
    from megatron.parallel import ParallelState

    torch.set_num_threads(2)
    run = {
        "data": {"train": [{"path": args.data}], "seq_length": args.seq_length},
        "objective": {"name": "dpo"},
        "optimizer": {"lr": 1e-6},  # required keys; nothing is trained here
        "training": {"train_iters": 1},
    }
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "run.yml").write_text(yaml.safe_dump(run))
        cfg = load_config([args.load / "model.yml", Path(tmp) / "run.yml"], [], 1)
    root, tag = resolve_checkpoint(args.load)
    shard = load_tp_shard(root / tag, cfg.model, 1, 0)
    objective = get_objective("dpo")(cfg.objective.params)
    model = build_loaded(cfg.model, ParallelState.single(), shard, outputs=objective.model_outputs)
    model = (model.double() if args.fp64 else model.float()).eval()
    dataset = PairwiseDataset(args.data, args.seq_length)
    n = min(args.pairs, len(dataset))
    sums = {}
    for layout in LAYOUTS:
        collate = Collator("pair", layout, args.seq_length, cfg.data.pad_to_multiple_of)
        sums[layout] = sequence_sums(model, collate, dataset, n, args.micro_batch)
    base = sums["padded"]
    print(
        f"{root / tag}: {n} pairs ({2 * n} sequences), micro-batch {args.micro_batch}, "
        f"transformer in {'fp64' if args.fp64 else 'fp32'}; mean |logp| {float(base.abs().mean()):.2f}"
    )
    print(f"{'layout':<22}{'max |dlogp|':>14}{'max relative':>14}")
    for layout in LAYOUTS[1:]:
        delta = (sums[layout] - base).abs()
        rel = delta / base.abs().clamp(min=1e-30)
        print(f"{layout:<22}{float(delta.max()):>14.3e}{float(rel.max()):>14.3e}")


if __name__ == "__main__":
    main()
