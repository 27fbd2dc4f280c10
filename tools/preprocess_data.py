#!/usr/bin/env python
"""Tokenize a corpus into an indexed dataset (PREFIX.* files and PREFIX.meta.json) in one pass.

Formats: text (pretraining documents), sft (messages or prompt/completion, with a loss mask),
pairwise (prompt/chosen/rejected, the prompt stored once), unpaired (KTO: prompt/completion/label,
or --from-pairwise) and prompt (prompts only). See megatron/data/formats/ for each row schema.

Examples:
    python tools/preprocess_data.py --input data/train.jsonl --output-prefix data/train_text \\
        --tokenizer tokenizers/tiny --workers 4
    python tools/preprocess_data.py --format pairwise --input prefs.jsonl --input more.parquet \\
        --output-prefix data/prefs --tokenizer tok/ --max-length 2048 \\
        --length-policy truncate_prompt --workers 8

The logic lives in megatron/data/preprocess.py; this file only parses flags and prints.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout

from megatron.data.indexed import DatasetError  # noqa: E402
from megatron.data.preprocess import FORMATS, PreprocessOptions, preprocess  # noqa: E402
from megatron.tokenizer import TokenizerError  # noqa: E402


def _add_post_training_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--chat-template",
        default=None,
        metavar="FILE|none",
        help="conversational rows: a Jinja template file, or 'none' (plain-string rows only); "
        "default: the tokenizer's own template",
    )
    p.add_argument(
        "--loss-on",
        default="assistant",
        choices=["assistant", "last-turn", "all"],
        help="sft messages rows: which tokens are trained",
    )
    p.add_argument(
        "--max-length",
        type=int,
        default=None,
        help="longest sequence (prompt + longest completion) in tokens; default: no limit",
    )
    p.add_argument(
        "--length-policy",
        default="drop",
        choices=["drop", "truncate_prompt", "error"],
        help="rows over --max-length: drop them (counted), cut the prompt from the left keeping "
        "the completion, or report them as bad rows",
    )
    p.add_argument(
        "--boundary",
        default="resolve",
        choices=["resolve", "error"],
        help="prompt tokens not a prefix of the whole conversation's tokens (BPE merge across "
        "the boundary): keep the shared prefix as the prompt as TRL does (counted), or report "
        "the row as bad",
    )
    p.add_argument(
        "--from-pairwise",
        action="store_true",
        help="unpaired format: read pairwise rows, write chosen (label true) and rejected (false)",
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--input",
        action="append",
        required=True,
        metavar="PATH",
        help="input file or datasets.save_to_disk directory (repeatable): .jsonl, .json, .txt, "
        ".parquet, .csv",
    )
    p.add_argument("--output-prefix", required=True, metavar="PREFIX", help="output path prefix")
    p.add_argument(
        "--tokenizer", required=True, metavar="DIR", help="local Hugging Face tokenizer directory"
    )
    p.add_argument("--format", default="text", choices=sorted(FORMATS), help="row format")
    p.add_argument(
        "--text-key", default="text", help="text format: key/column holding the document text"
    )
    p.add_argument(
        "--append-eod",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="append the tokenizer's EOS token to every document",
    )
    p.add_argument(
        "--txt-mode",
        default="line",
        choices=["line", "file"],
        help=".txt inputs: one document per non-empty line, or one per file",
    )
    _add_post_training_args(p)
    p.add_argument("--workers", type=int, default=1, help="tokenizer processes")
    p.add_argument("--chunk-size", type=int, default=512, help="rows per work item")
    p.add_argument(
        "--on-error",
        default="fail",
        choices=["fail", "skip"],
        help="bad rows: fail (write nothing, exit 1) or skip (list them in PREFIX.errors.jsonl)",
    )
    p.add_argument(
        "--allow-empty",
        action="store_true",
        help="accept an input file without rows and a run that writes no rows (a 0-row "
        "dataset); by default either is an error naming the file",
    )
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        options = PreprocessOptions(
            data_format=args.format,
            text_key=args.text_key,
            append_eod=args.append_eod,
            txt_mode=args.txt_mode,
            chat_template=args.chat_template,
            loss_on=args.loss_on,
            max_length=args.max_length,
            length_policy=args.length_policy,
            boundary=args.boundary,
            from_pairwise=args.from_pairwise,
            on_error=args.on_error,
            allow_empty=args.allow_empty,
            workers=args.workers,
            chunk_size=args.chunk_size,
            show_progress=not args.no_progress,
        )
        summary = preprocess(args.input, args.output_prefix, args.tokenizer, options)
    except (DatasetError, TokenizerError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # e.g. the disk filled up while writing
        where = f"{exc.filename}: " if exc.filename else ""
        print(
            f"error: {where}{exc.strerror or exc}; check the path, its permissions and free "
            "space, then run again (a dataset without PREFIX.meta.json is not complete)",
            file=sys.stderr,
        )
        return 1
    print(summary.format())
    return 0


if __name__ == "__main__":
    sys.exit(main())
