#!/usr/bin/env python
"""Write the weights of a native checkpoint (any TP, any PP) at another TP and PP size.

Example:
    python tools/ckpts/reshard.py --ckpt runs/sft-tp2 --out ckpts/sft-tp4 --tp 4
    python tools/ckpts/reshard.py --ckpt runs/sft-tp2pp2 --out ckpts/sft-tp1 --tp 1 --pp 1

The output is a weights-only checkpoint (optimizer state is not carried over): start a run from
it with `checkpoint.load: OUT` and `checkpoint.finetune: true`. A finetune load also reshards on
the fly, so this tool is for when the shards should be written once. See tools/ckpts/README.md.
"""

from __future__ import annotations

import argparse
import logging
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from a checkout

from megatron.ckpt import ConversionError  # noqa: E402
from megatron.ckpt.convert import reshard  # noqa: E402
from megatron.ckpt.native import read_checkpoint_config  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--ckpt", required=True, metavar="DIR", help="checkpoint dir or its iter_* dir")
    p.add_argument("--out", required=True, metavar="DIR", help="new output checkpoint directory")
    p.add_argument("--tp", type=int, required=True, help="new tensor-parallel size")
    p.add_argument(
        "--pp",
        type=int,
        default=1,
        help="pipeline-parallel size; > 1 writes DeepSpeed's per-layer pipeline layout",
    )
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    start = time.time()
    try:
        _, config = read_checkpoint_config(args.ckpt)
        tag_dir = reshard(
            args.ckpt,
            args.out,
            config=config,
            tp_size=args.tp,
            pp_size=args.pp,
            show_progress=not args.no_progress,
        )
    except ConversionError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    grid = f"TP={args.tp}, PP={args.pp}"
    print(f"wrote {tag_dir} ({grid}) in {time.time() - start:.1f} s, peak RSS {peak:.2f} GiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
