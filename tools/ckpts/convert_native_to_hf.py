#!/usr/bin/env python
"""Convert a native checkpoint (any TP and PP size, any ZeRO stage) into a Hugging Face model
directory.

Example:
    python tools/ckpts/convert_native_to_hf.py --ckpt runs/zephyr-dpo --out hf/zephyr-dpo \\
        --hf-template ckpts/mistral-7b-sft-beta-tp2/hf

Writes safetensors shards + index, config.json, generation_config.json and the tokenizer;
`AutoModelForCausalLM.from_pretrained(OUT)` loads it. A reward model (model.head: value) is
written as <Arch>ForSequenceClassification (num_labels 1, score.weight, no lm_head; load it with
`AutoModelForSequenceClassification`) with pad_token_id from --pad-token-id, else the
tokenizer's pad token, else the template's (see megatron.ckpt.convert.reward_pad_token_id).

The config fields and generation config come from --hf-template (the source model, or a
converted checkpoint's hf/); default: CKPT/hf, else data.tokenizer of the checkpoint's config.yml
when that directory holds a config.json. The tokenizer is --tokenizer, else the template's, else
data.tokenizer, else the one the run's first training dataset was built with (PREFIX.meta.json),
so a model trained from scratch exports with its tokenizer; without a template, config.json and
generation_config.json take its bos/eos/pad ids. A chat template the training data was rendered
with but the tokenizer lacks is written into the export (--chat-template FILE to choose it);
see megatron/ckpt/run_tokenizer.py. The logic lives in megatron/ckpt/; this file only parses
flags and prints.
"""

from __future__ import annotations

import argparse
import logging
import resource
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from a checkout

from megatron.ckpt import ConversionError  # noqa: E402
from megatron.ckpt.convert import DTYPES, HF_DIR, convert_native_to_hf  # noqa: E402
from megatron.ckpt.hf_config import SUPPORTED_ARCHITECTURES  # noqa: E402
from megatron.ckpt.native import read_checkpoint_config  # noqa: E402
from megatron.ckpt.run_tokenizer import (  # noqa: E402
    check_recorded_vocab,
    find_run_tokenizer,
    training_chat_template,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--ckpt", required=True, metavar="DIR", help="checkpoint dir or its iter_* dir")
    p.add_argument("--out", required=True, metavar="DIR", help="new output directory")
    p.add_argument(
        "--arch",
        choices=SUPPORTED_ARCHITECTURES,
        help="model_type; None: the template's, else inferred",
    )
    p.add_argument("--hf-template", metavar="DIR", help="HF dir for config fields and tokenizer")
    p.add_argument(
        "--tokenizer",
        metavar="DIR",
        help="tokenizer to export; None: the template's, else data.tokenizer, else the training "
        "data's (PREFIX.meta.json)",
    )
    p.add_argument(
        "--chat-template",
        metavar="FILE",
        help="Jinja chat template for the exported tokenizer; None: the training data's when "
        "the tokenizer lacks it",
    )
    p.add_argument(
        "--dtype", choices=sorted(DTYPES), help="weights dtype; None keeps the stored one"
    )
    p.add_argument(
        "--fp32-master",
        action="store_true",
        help="ZeRO 1-2: export the optimizer's fp32 master weights instead of the module's",
    )
    p.add_argument("--max-shard-size", type=float, default=5.0, help="shard size in GiB")
    p.add_argument(
        "--pad-token-id",
        type=int,
        metavar="ID",
        help="reward models: config.json pad_token_id (HF scores each row at its last non-pad "
        "token, so it must never end a real sequence); None: the tokenizer's pad token",
    )
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return p.parse_args(argv)


def template_dir(root: Path, config: dict[str, Any], given: str | None) -> Path | None:
    """--hf-template, else ROOT/hf, else data.tokenizer when it holds a config.json."""
    if given:
        return Path(given)
    if (root / HF_DIR).is_dir():
        return root / HF_DIR
    tokenizer = (config.get("data") or {}).get("tokenizer")
    if tokenizer and (Path(tokenizer) / "config.json").is_file():
        return Path(tokenizer)
    return None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    start = time.time()
    try:
        root, config = read_checkpoint_config(args.ckpt)
        extras = template_dir(root, config, args.hf_template)
        tokenizer = find_run_tokenizer(config, extras, args.tokenizer)
        if tokenizer is None:
            print(
                "warning: no tokenizer found (no --tokenizer, no template tokenizer, no "
                "data.tokenizer directory, none in the training data's PREFIX.meta.json): "
                "writing no tokenizer files, and config.json keeps transformers' default token "
                "ids; pass --tokenizer DIR (the directory the data was preprocessed with)",
                file=sys.stderr,
            )
        else:
            print(f"tokenizer: {tokenizer.path} ({tokenizer.source})")
            check_recorded_vocab(config, tokenizer.path)
        tokenizer_dir = tokenizer.path if tokenizer else None
        chat_template = training_chat_template(config, tokenizer_dir, args.chat_template)
        out = convert_native_to_hf(
            args.ckpt,
            args.out,
            config=config,
            arch=args.arch,
            extras_dir=extras,
            tokenizer_dir=tokenizer_dir,
            chat_template=chat_template,
            dtype=args.dtype,
            fp32_master=args.fp32_master,
            max_shard_bytes=int(args.max_shard_size * 2**30),
            pad_token_id=args.pad_token_id,
            show_progress=not args.no_progress,
        )
    except ConversionError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"wrote {out} in {time.time() - start:.1f} s, peak RSS {peak:.2f} GiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
