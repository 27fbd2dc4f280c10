#!/usr/bin/env python
"""Evaluate a reward model on a RewardBench-format file: per-subset accuracy, section scores.

Example:
    python tools/rewardbench.py --model runs/rm --input reward_bench.jsonl --output rb.json
    python tools/rewardbench.py --model hf/rm --input filtered.parquet --batch-size 16 \\
        --max-length 4096 --truncate --device cuda --dtype bf16

--input rows are {"prompt": str, "chosen": str, "rejected": str, "subset": str} (optional "id";
a message-list prompt, as in RewardBench's prior sets, is accepted too), as JSON Lines, a JSON
array, or Parquet (e.g. the "filtered" split of the allenai/reward-bench dataset). --model is a
native `model.head: value` checkpoint or its export by tools/ckpts/convert_native_to_hf.py (see
tools/score.py). Each side is scored as a user turn plus an assistant turn rendered with the chat
template (the tokenizer's, or --chat-template FILE), or with --chat-template none as the plain
text prompt + answer. A pair is correct when score(chosen) > score(rejected); a tie is wrong.
Section scores and the overall score follow RewardBench's own code (Lambert et al. 2024,
arXiv:2403.13787; the rules and their sources are in megatron/rewardbench.py); a file missing
some of the 23 subsets gets a score marked PARTIAL.
Output: a table on stdout (accuracies in percent); with --output, a JSON report (fractions, plus
each pair's two scores) written atomically. A bad row stops the run with
`error: FILE:LINE: message`. The logic lives in megatron/rewardbench.py; this file only parses
flags and prints.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout
sys.path.insert(0, str(Path(__file__).resolve().parent))  # tools/score.py's shared flags

from score import add_model_flags, check_model_flags  # noqa: E402

from megatron.data.indexed import DatasetError  # noqa: E402
from megatron.rewardbench import (  # noqa: E402
    format_table,
    pair_form,
    read_pairs,
    score_pairs,
    summarize,
    tally,
)
from megatron.scoring import RowEncoder, ScoreError, open_reward_model  # noqa: E402
from megatron.tokenizer import TokenizerError, load_tokenizer  # noqa: E402
from megatron.utils import atomic_write_text  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--model", required=True, metavar="DIR", help="native checkpoint or HF dir")
    p.add_argument(
        "--input", required=True, metavar="FILE", help="RewardBench rows: .jsonl, .json, .parquet"
    )
    p.add_argument("--output", metavar="FILE", help="JSON report (written atomically)")
    add_model_flags(p, chat_help="the user/assistant turns ('none': plain prompt + answer text)")
    return check_model_flags(p, p.parse_args(argv))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        pairs = read_pairs(args.input)
        model = open_reward_model(args.model, args.device, args.dtype)
        tokenizer_dir = args.tokenizer or model.default_tokenizer()
        if tokenizer_dir is None:
            raise ScoreError(f"{args.model}: no data.tokenizer and no hf/ dir; pass --tokenizer")
        encoder = RowEncoder(
            load_tokenizer(tokenizer_dir), args.chat_template, args.max_length, args.truncate
        )
        form = pair_form(encoder)
        chosen, rejected = score_pairs(model, encoder, pairs, args.batch_size)
    except (ScoreError, TokenizerError, DatasetError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    report = summarize(tally(pairs, chosen, rejected))
    print(f"RewardBench: {len(pairs)} pairs from {args.input}; model {args.model}; form {form}")
    print(format_table(report))
    if args.output:
        meta = {"model": str(args.model), "input": str(args.input), "form": form,
                "chat_template": args.chat_template, "dtype": args.dtype}  # fmt: skip
        per_pair = [
            {"id": p.id, "subset": p.subset, "chosen_score": c, "rejected_score": r,
             "correct": c > r}
            for p, c, r in zip(pairs, chosen, rejected, strict=True)
        ]  # fmt: skip
        text = json.dumps({**meta, **report, "pairs": per_pair}, indent=1, ensure_ascii=False)
        atomic_write_text(args.output, text + "\n")
        print(f"report -> {args.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
