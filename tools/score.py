#!/usr/bin/env python
"""Score a JSONL file of conversations with a reward model (native checkpoint or exported HF dir).

Example:
    python tools/score.py --model runs/rm --input convs.jsonl --output scored.jsonl
    python tools/score.py --model hf/rm --input convs.jsonl --batch-size 16 --max-length 2048

--model is a native `model.head: value` checkpoint (a directory with `latest`, or an iter_*
directory; any TP size and ZeRO stage, run here at TP = 1) or a directory exported by
tools/ckpts/convert_native_to_hf.py (config.json naming a *ForSequenceClassification); both give
the same scores. Rows are {"messages": [...]} or {"prompt": ..., "completion": ...} (strings or
message lists), tokenized exactly as `tools/preprocess_data.py --format pairwise` tokenizes a
pair's prompt + chosen (see megatron/scoring.py); the score is the value head at the last token.
Output: the input rows, each with "score": float added, in input order, written atomically to
--output (default: stdout). A bad row stops the run with `error: FILE:LINE: message`.
The logic lives in megatron/scoring.py; this file only parses flags and prints.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from megatron.data.indexed import DatasetError  # noqa: E402
from megatron.data.sources import RowError, decode_record, iter_rows  # noqa: E402
from megatron.scoring import (  # noqa: E402
    DTYPES,
    RowEncoder,
    ScoreError,
    open_reward_model,
    score_records,
)
from megatron.tokenizer import TokenizerError, load_tokenizer  # noqa: E402
from megatron.utils import atomic_write_text  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--model", required=True, metavar="DIR", help="native checkpoint or HF dir")
    p.add_argument("--input", required=True, metavar="FILE", help="JSONL rows to score")
    p.add_argument("--output", metavar="FILE", help="scored JSONL (written atomically); stdout")
    add_model_flags(p, chat_help="message rows ('none': strings only)")
    return check_model_flags(p, p.parse_args(argv))


def add_model_flags(p: argparse.ArgumentParser, chat_help: str) -> None:
    """The flags shared with tools/rewardbench.py: tokenizer, template, batching, device."""
    p.add_argument(
        "--tokenizer",
        metavar="DIR",
        help="None: the checkpoint's data.tokenizer, else its hf/ (native), or the HF dir",
    )
    p.add_argument(
        "--chat-template",
        metavar="FILE",
        help=f"Jinja template for {chat_help}; None: the tokenizer's",
    )
    p.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass")
    p.add_argument(
        "--max-length", type=int, help="longest sequence in tokens; a longer one is an error"
    )
    p.add_argument(
        "--truncate",
        action="store_true",
        help="cut over-long prompts from the left (as --length-policy truncate_prompt)",
    )
    p.add_argument("--device", default="cpu", help="torch device, e.g. cuda")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="compute dtype")


def check_model_flags(p: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.Namespace:
    """``args`` after the range checks of :func:`add_model_flags`' flags (``p.error`` else)."""
    if args.batch_size < 1:
        p.error(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.max_length is not None and args.max_length < 2:
        p.error(f"--max-length must be >= 2, got {args.max_length}")
    if args.truncate and args.max_length is None:
        p.error("--truncate needs --max-length")
    return args
    return args


def read_records(path: Path) -> list[tuple[str, dict]]:
    """``(FILE:LINE, row)`` of every row.

    Raises:
        ScoreError: a missing file or a row that is not a JSON object.
    """
    if not path.is_file():
        raise ScoreError(f"{path}: input not found")
    if path.suffix.lower() not in (".jsonl", ".json"):
        raise ScoreError(f"{path}: expected a .jsonl file")
    out = []
    try:
        for row in iter_rows(path):
            try:
                out.append((row.location, dict(decode_record(row))))
            except RowError as e:
                raise ScoreError(f"{row.location}: {e.message}") from None
    except DatasetError as e:
        raise ScoreError(str(e)) from None
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        records = read_records(Path(args.input))
        model = open_reward_model(args.model, args.device, args.dtype)
        tokenizer_dir = args.tokenizer or model.default_tokenizer()
        if tokenizer_dir is None:
            raise ScoreError(f"{args.model}: no data.tokenizer and no hf/ dir; pass --tokenizer")
        tokenizer = load_tokenizer(tokenizer_dir)
        encoder = RowEncoder(tokenizer, args.chat_template, args.max_length, args.truncate)
        scores = score_records(model, encoder, records, args.batch_size)
    except (ScoreError, TokenizerError, DatasetError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    lines = [
        json.dumps({**record, "score": score}, ensure_ascii=False) + "\n"
        for (_, record), score in zip(records, scores, strict=True)
    ]
    if args.output:
        atomic_write_text(args.output, "".join(lines))
        print(f"scored {len(lines)} rows -> {args.output}", file=sys.stderr)
    else:
        sys.stdout.write("".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
