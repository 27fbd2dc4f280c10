#!/usr/bin/env python
"""Convert a Hugging Face causal LM or reward model (Llama, Mistral, Qwen2, GPT-NeoX) into a native
checkpoint.

Example:
    python tools/ckpts/convert_hf_to_native.py --hf-dir models/Meta-Llama-3-8B-Instruct \\
        --out ckpts/llama3-8b-instruct-tp2 --tp 2 --dtype bf16

Writes OUT/latest, OUT/iter_0000000/ (one DeepSpeed model file per TP rank; with --pp > 1
DeepSpeed's per-layer pipeline files, layer_XX-model_YY-model_states.pt), OUT/model.yml (the
`model:` section for run configs) and OUT/hf/ (config, generation config, tokenizer). Start a run
from it with `checkpoint.load: OUT` and `checkpoint.finetune: true`. A *ForSequenceClassification
with num_labels 1 (a reward model) becomes a `model.head: value` checkpoint (score.weight ->
value_head.weight). See tools/ckpts/README.md.
The logic lives in megatron/ckpt/convert.py; this file only parses flags and prints.
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
from megatron.ckpt.convert import DTYPES, convert_hf_to_native  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--hf-dir", required=True, metavar="DIR", help="Hugging Face model directory")
    p.add_argument("--out", required=True, metavar="DIR", help="new output checkpoint directory")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size to shard for")
    p.add_argument(
        "--pp",
        type=int,
        default=1,
        help="pipeline-parallel size; > 1 writes DeepSpeed's per-layer pipeline layout",
    )
    p.add_argument(
        "--dtype",
        choices=sorted(DTYPES),
        default=None,
        help="weights dtype; None keeps the stored one",
    )
    p.add_argument(
        "--make-vocab-size-divisible-by",
        type=int,
        default=128,
        help="pad the vocabulary to a multiple of this x TP (model.make_vocab_size_divisible_by)",
    )
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    start = time.time()
    try:
        tag_dir = convert_hf_to_native(
            args.hf_dir,
            args.out,
            tp_size=args.tp,
            pp_size=args.pp,
            dtype=args.dtype,
            divisible_by=args.make_vocab_size_divisible_by,
            show_progress=not args.no_progress,
        )
    except ConversionError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    grid = f"TP={args.tp}, PP={args.pp}"
    print(f"wrote {tag_dir} ({grid}) in {time.time() - start:.1f} s, peak RSS {peak:.2f} GiB")
    print(f"model config: {Path(args.out) / 'model.yml'}; tokenizer: {Path(args.out) / 'hf'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
