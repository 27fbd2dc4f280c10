#!/usr/bin/env python
"""Pairwise preprocessing throughput: pairs/s of ``preprocess --format pairwise``.

Builds (once, cached under ``--work``) a byte-level BPE tokenizer with a 32k vocabulary trained on
real English prose — the sentences of the Python standard library's docstrings, the same on every
machine (a stand-in for a GPT-2-class fast tokenizer on chat data: no download is possible here) —
writes ``--pairs`` conversational pairs of about ``--tokens`` tokens each
(prompt with a system turn, chosen and rejected of about a third each, ChatML template), and runs
the one-pass pairwise preprocessing with ``--workers`` processes (special-token pieces and, for
this byte-level BPE, the pre-token memo of ``megatron/data/formats/chat.py``). Prints pairs/s over the
pipeline's wall time and over its CPU time (all processes), plus the machine's load average —
the figure is only comparable between runs on an otherwise idle machine.

Example:
    python tools/bench/preprocess_throughput.py --pairs 50000 --workers 2
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from a checkout

from megatron.data.preprocess import PreprocessOptions, preprocess  # noqa: E402
from megatron.tokenizer import load_tokenizer  # noqa: E402

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
_STDLIB = (
    "os re json collections typing argparse logging subprocess asyncio email http unittest doctest "
    "pathlib functools itertools inspect decimal fractions statistics random datetime calendar "
    "textwrap string difflib pickle shelve sqlite3 zipfile tarfile csv configparser hashlib hmac "
    "secrets socket ssl select threading multiprocessing sched queue contextvars dataclasses enum "
    "abc numbers math cmath array heapq bisect weakref types copy pprint reprlib io tempfile glob "
    "fnmatch shutil codecs unicodedata locale gettext optparse getopt ast dis tokenize symtable "
    "pyclbr compileall zipapp venv platform ctypes mmap signal warnings traceback gc builtins "
    "urllib.parse urllib.request smtplib imaplib ftplib uuid socketserver wave colorsys timeit "
    "xml.etree.ElementTree xml.dom.minidom html.parser tracemalloc pdb trace cProfile"
).split()


def _english_sentences() -> list[str]:
    """Real English prose: the sentences of the Python standard library's docstrings (the same
    on every machine with this Python; a stand-in for chat data, which cannot be downloaded)."""
    import importlib
    import inspect
    import re

    sentences: list[str] = []
    for name in _STDLIB:
        try:
            module = importlib.import_module(name)
        except Exception:  # noqa: BLE001 - a module missing on this Python is skipped
            continue
        for _, obj in inspect.getmembers(module):
            doc = inspect.getdoc(obj)
            if doc and len(doc) > 200:
                text = re.sub(r"\s+", " ", doc)
                sentences += [x for x in re.split(r"(?<=[.!?]) ", text) if len(x.split()) >= 4]
    return sorted(set(sentences))


class TextGen:
    """Random English sentences, concatenated and cut to a number of words."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.sentences = _english_sentences()

    def __call__(self, n_words: int) -> str:
        words: list[str] = []
        while len(words) < n_words:
            words += self.rng.choice(self.sentences).split()
        return " ".join(words[:n_words])


def build_tokenizer(work: Path) -> Path:
    from megatron.tokenizer.build import build_byte_level_bpe

    out = work / "tokenizer32k_english"
    if not (out / "tokenizer.json").is_file():
        build_byte_level_bpe(_english_sentences(), 32000, out)
    return out


def write_pairs(path: Path, pairs: int, tokens: int, seed: int = 0) -> None:
    gen = TextGen(seed)
    words = max(3, int(tokens / 3 * 0.68))  # ~1.45 tokens per word with this tokenizer
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(pairs):
            prompt = [
                {"role": "system", "content": "You are a helpful assistant."},
                {"role": "user", "content": gen(words - 6)},
            ]
            row = {
                "prompt": prompt,
                "chosen": [{"role": "assistant", "content": gen(words)}],
                "rejected": [{"role": "assistant", "content": gen(words)}],
            }
            f.write(json.dumps(row) + "\n")


def _cpu_seconds() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pairs", type=int, default=50000)
    p.add_argument("--tokens", type=int, default=300, help="approximate tokens per pair")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--chunk-size", type=int, default=512)
    p.add_argument("--work", type=Path, default=Path("runs/bench_preprocess"))
    p.add_argument("--whole", action="store_true", help="disable piecewise tokenization")
    args = p.parse_args(argv)

    args.work.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(args.work)
    template = args.work / "chatml.jinja"
    template.write_text(CHATML)
    data = args.work / f"english_pairs_{args.pairs}_{args.tokens}.jsonl"
    if not data.is_file():
        write_pairs(data, args.pairs, args.tokens)
    options = PreprocessOptions(
        data_format="pairwise",
        chat_template=str(template),
        workers=args.workers,
        chunk_size=args.chunk_size,
        split_special_tokens=not args.whole,
    )
    load_tokenizer(tok)  # import transformers before the clock starts
    cpu0 = _cpu_seconds()
    summary = preprocess([data], args.work / "out", tok, options)
    cpu = _cpu_seconds() - cpu0
    per_pair = summary.num_tokens / max(summary.rows_written, 1)
    print(summary.format())
    print(
        f"pairs/s       {summary.rows_per_s:.0f} (pipeline wall time, {args.workers} workers, "
        f"{per_pair:.0f} tokens per pair stored, tokenization {summary.tokenization})"
    )
    print(
        f"pairs/s/core  {summary.rows_read / cpu:.0f} (pairs per CPU-second of the whole call, "
        "all processes: what one uncontended core sustains)"
    )
    print(f"machine       {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
