"""The embedded demo (``make demo``): data generation -> tokenizer -> preprocessing -> training.

Everything it needs ships in the repository: a deterministic generator of small checkable tasks
(arithmetic, sorting, reversal), a byte-level BPE tokenizer trained on them, and the tiny model
preset. It trains on CPU with 2 data-parallel ranks (ZeRO-1) through ``deepy.py`` and prints the
learning metrics: the training loss per interval and the held-out loss before and after.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

WORDS = "apple river stone cloud tiger lemon piano robot candle forest window garden".split()


def task(rng: random.Random) -> str:
    """One line of a checkable task; the answer is a deterministic function of the question."""
    kind = rng.randrange(4)
    if kind == 0:
        a, b = rng.randrange(100), rng.randrange(100)
        return f"{a} + {b} = {a + b}"
    if kind == 1:
        xs = [rng.randrange(10) for _ in range(rng.randrange(3, 7))]
        return f"sort {' '.join(map(str, xs))} -> {' '.join(map(str, sorted(xs)))}"
    if kind == 2:
        w = rng.choice(WORDS)
        return f"reverse {w} -> {w[::-1]}"
    a, b = rng.randrange(2, 10), rng.randrange(2, 10)
    return f"{a} * {b} = {a * b}"


def write_corpus(path: Path, lines: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    texts = [task(rng) for _ in range(lines)]
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for t in texts:
            f.write(json.dumps({"text": t}) + "\n")
    return texts


def run(cmd: list[str]) -> None:
    print("$ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=ROOT, check=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="runs/demo", help="output directory (default runs/demo)")
    ap.add_argument("--train-iters", type=int, default=None, help="override training.train_iters")
    args = ap.parse_args()
    out = (ROOT / args.out).resolve()
    import shutil

    from megatron.tokenizer.build import build_byte_level_bpe

    # why: the demo regenerates its own output; a stale checkpoint would (rightly) be refused.
    shutil.rmtree(out / "ckpt", ignore_errors=True)
    (out / "logs" / "metrics.jsonl").unlink(missing_ok=True)

    texts = write_corpus(out / "raw" / "train.jsonl", 40_000, seed=1)
    write_corpus(out / "raw" / "valid.jsonl", 2_000, seed=2)
    build_byte_level_bpe(texts, 512, out / "tokenizer")
    for split in ("train", "valid"):
        run(
            [
                sys.executable,
                "tools/preprocess_data.py",
                "--format",
                "text",
                "--input",
                str(out / "raw" / f"{split}.jsonl"),
                "--output-prefix",
                str(out / "data" / split),
                "--tokenizer",
                str(out / "tokenizer"),
                "--workers",
                "2",
            ]
        )
    overrides = [
        f"data.train=[{{path: {out / 'data' / 'train'}}}]",
        f"data.valid=[{{path: {out / 'data' / 'valid'}}}]",
        f"checkpoint.save={out / 'ckpt'}",
        f"logging.dir={out / 'logs'}",
    ]
    if args.train_iters:
        overrides += [
            f"training.train_iters={args.train_iters}",
            f"checkpoint.save_interval={args.train_iters}",
        ]
    run(
        [
            sys.executable,
            "deepy.py",
            "train.py",
            "configs/models/tiny.yml",
            "configs/demo/lm.yml",
            *overrides,
        ]
    )
    valid = [json.loads(x) for x in (out / "logs" / "metrics.jsonl").read_text().splitlines()]
    valid = [r for r in valid if r["split"] == "valid"]
    if len(valid) >= 2:
        print(
            f"\nheld-out loss: {valid[0]['loss']:.3f} at step {valid[0]['step']} -> "
            f"{valid[-1]['loss']:.3f} at step {valid[-1]['step']}"
        )
    print(f"metrics: {out / 'logs' / 'metrics.jsonl'}; checkpoint: {out / 'ckpt'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
