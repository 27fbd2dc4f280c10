#!/usr/bin/env python
"""KTO step time: KL sequences forwarded without gradient (the default) vs appended to the batch.

KTO's KL reference point needs each example's prompt with another example's completion; its
log-probs are detached. By default (``Collator(separate_kl=True)``) the step forwards those KL
sequences as a sub-batch of their own under ``no_grad``; the alternative (what pipeline-parallel
runs do) appends them to the examples, so they go through the gradient-enabled forward and the
backward too. One run generates unpaired rows (random English prose, prompts and completions of
``--tokens`` tokens each), preprocesses them, and trains the same model, data and seed in two
fresh single-rank subprocesses, one per mode. Printed: median step time over steps 3..N, the
ratio appended / separate, peak RSS of each, and the first losses (identical to round-off: the
two forms compute the same loss).

Example:
    python tools/bench/kto_kl_forward.py --work /tmp/kto_bench --steps 12
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # run from a checkout


def prepare(work: Path, args: argparse.Namespace) -> Path:
    """Tokenizer, unpaired rows and their preprocessed dataset; returns the run config path."""
    import yaml

    from megatron.data.preprocess import PreprocessOptions, preprocess
    from megatron.tokenizer.build import build_byte_level_bpe
    from tests.conftest import make_english_corpus

    work.mkdir(parents=True, exist_ok=True)
    docs = make_english_corpus(4 * args.rows, seed=3)
    tok = build_byte_level_bpe(docs, vocab_size=args.vocab, out_dir=work / "tok")
    rng = random.Random(0)
    words = " ".join(docs).split()

    def text(n: int) -> str:
        start = rng.randrange(len(words) - n)
        return " " + " ".join(words[start : start + n])

    rows = [
        {
            "prompt": text(args.tokens // 2),
            "completion": text(args.tokens // 2),
            "label": i % 2 == 0,
        }
        for i in range(args.rows)
    ]
    (work / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    options = PreprocessOptions(data_format="unpaired", chat_template="none")
    preprocess([work / "rows.jsonl"], work / "data", tok, options)
    cfg = {
        "model": {
            "num_layers": args.layers,
            "hidden_size": args.hidden,
            "num_attention_heads": args.hidden // 64,
            "vocab_size": args.vocab,
            "max_position_embeddings": 4 * args.tokens,
            "norm": "rmsnorm",
            "activation": "swiglu",
        },
        "data": {
            "train": [{"path": str(work / "data")}],
            "seq_length": 4 * args.tokens,
            "tokenizer": str(tok),
            "layout": "padded",
        },
        "objective": {"name": "kto", "beta": 0.1},
        "reference": {"source": "model"},
        "optimizer": {"lr": 1e-4},
        "schedule": {"style": "constant"},
        "training": {
            "train_iters": args.steps,
            "micro_batch_size": args.batch,
            "global_batch_size": args.batch,
            "seed": 1,
        },
        "logging": {"log_interval": 1000, "dir": str(work / "logs")},
    }
    path = work / "kto.yml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def child(config: Path, mode: str) -> dict:
    """Train in this process (one rank); ``mode`` ``appended`` forces the pipeline-style batches."""
    from megatron.config import load_config
    from megatron.objectives.kto import KTO
    from megatron.training.distributed import init_distributed
    from megatron.training.trainer import Trainer

    if mode == "appended":
        plain = KTO.collate_options
        KTO.collate_options = lambda self, pipeline=False: plain(self, pipeline=True)
    init_distributed()
    history = Trainer(load_config([config], [], 1)).train()
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB -> GiB
    return {
        "step_time": [h["step_time"] for h in history],
        "loss": [h["loss"] for h in history],
        "peak_rss_gib": rss,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", default="/tmp/kto_kl_forward")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--rows", type=int, default=256)
    ap.add_argument("--tokens", type=int, default=128, help="tokens of a prompt + completion")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=2048)
    ap.add_argument("--child", choices=["separate", "appended"], help=argparse.SUPPRESS)
    ap.add_argument("--config", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print("RESULT " + json.dumps(child(Path(args.config), args.child)))
        return 0
    config = prepare(Path(args.work), args)
    results = {}
    for mode in ("separate", "appended"):
        cmd = [sys.executable, __file__, "--child", mode, "--config", str(config)]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, check=False)
        line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
        if proc.returncode or line is None:
            print(proc.stdout[-2000:], proc.stderr[-4000:], file=sys.stderr)
            return 1
        results[mode] = json.loads(line.removeprefix("RESULT "))
    med = {m: statistics.median(r["step_time"][2:]) for m, r in results.items()}
    print(
        f"model {args.layers} layers h={args.hidden}, micro-batch {args.batch} examples "
        f"(+{args.batch} KL sequences) of ~{args.tokens} tokens, fp32, 1 rank, {args.steps} steps"
    )
    for mode, r in results.items():
        print(
            f"  {mode:<9} median step {1000 * med[mode]:7.1f} ms   peak RSS "
            f"{r['peak_rss_gib']:.2f} GiB   losses {', '.join(f'{x:.5f}' for x in r['loss'][:3])}"
        )
    print(f"appended / separate step time: {med['appended'] / med['separate']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
