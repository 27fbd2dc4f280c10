#!/usr/bin/env python
"""Pairwise preprocessing throughput: pairs/s of ``preprocess --format pairwise``.

Builds (once, cached under ``--work``) a byte-level BPE tokenizer with a 32k vocabulary trained on
a synthetic Zipf-distributed corpus (a stand-in for a GPT-2-class fast tokenizer: no download
is possible here), writes ``--pairs`` conversational pairs of about ``--tokens`` tokens each
(prompt with a system turn, chosen and rejected of about a third each, ChatML template), and runs
the one-pass pairwise preprocessing with ``--workers`` processes. Prints pairs/s over the
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
_SYLLABLES = (
    "ka to ri an el mon sta per ing tion re de ble er ly ous ment pro con ter al ic ist un ver ness"
).split()


def _vocabulary(n: int = 30000, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    words: set[str] = set()
    while len(words) < n:
        words.add("".join(rng.choice(_SYLLABLES) for _ in range(rng.choice([1, 2, 2, 3, 3, 4]))))
    return sorted(words)


class TextGen:
    """Zipf-distributed pseudo-English (punctuation every ~12 words)."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.words = _vocabulary()
        self.cum = list(_cumulative([1 / (i + 1) for i in range(len(self.words))]))

    def __call__(self, n_words: int) -> str:
        ws = self.rng.choices(self.words, cum_weights=self.cum, k=n_words)
        out = [w + self.rng.choice(".,?!") if self.rng.random() < 0.08 else w for w in ws]
        return " ".join(out).capitalize()


def _cumulative(xs: list[float]) -> list[float]:
    total, out = 0.0, []
    for x in xs:
        total += x
        out.append(total)
    return out


def build_tokenizer(work: Path) -> Path:
    from megatron.tokenizer.build import build_byte_level_bpe

    out = work / "tokenizer32k"
    if not (out / "tokenizer.json").is_file():
        gen = TextGen(1)
        build_byte_level_bpe((gen(200) for _ in range(20000)), 32000, out)
    return out


def write_pairs(path: Path, pairs: int, tokens: int, seed: int = 0) -> None:
    gen = TextGen(seed)
    words = max(3, int(tokens / 3 * 0.72))  # ~1.4 tokens per word with this tokenizer
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
    data = args.work / f"pairs_{args.pairs}_{args.tokens}.jsonl"
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
