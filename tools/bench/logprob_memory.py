#!/usr/bin/env python
"""Peak memory of per-token log-probs (forward + backward): chunked vocab-parallel vs naive.

Two paths for ``log p(target)`` of ``n`` tokens through an ``lm_head`` of ``v`` rows:

* ``naive``: ``logits = h @ W.T`` (``[n, v]``), ``log_softmax``, ``gather`` — autograd keeps the
  ``[n, v]`` log-softmax output for backward and builds ``[n, v]`` gradients;
* ``chunked``: :func:`megatron.parallel.cross_entropy.chunked_vocab_parallel_log_probs`
  (``chunk_size`` tokens at a time, logits recomputed in backward; single rank, no TP group).

Each measurement runs in a fresh subprocess (so peaks are not shared) which allocates the inputs,
records ``ru_maxrss`` (the baseline: interpreter + torch + inputs), runs forward and backward of
``logp.sum()``, and records ``ru_maxrss`` again. Reported: the increase over the baseline (what
the log-prob computation itself adds) and the absolute peak. CPU only.

Example:
    python tools/bench/logprob_memory.py --vocab 131072 --tokens 8192 --hidden 1024 --dtype bf16
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # run from a checkout

GIB = 2**30


def _maxrss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def measure(mode: str, vocab: int, tokens: int, hidden: int, dtype: str, chunk: int) -> dict:
    """Run one forward + backward in this process; peaks in bytes (call in a fresh process)."""
    import torch

    from megatron.parallel.cross_entropy import chunked_vocab_parallel_log_probs

    torch.manual_seed(0)
    dt = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    h = (torch.randn(tokens, hidden) * 0.5).to(dt).requires_grad_()
    w = (torch.randn(vocab, hidden) * hidden**-0.5).to(dt).requires_grad_()
    target = torch.randint(0, vocab, (tokens,))
    base = _maxrss_bytes()
    t0 = time.perf_counter()
    if mode == "naive":
        logits = h @ w.t()
        logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, target[:, None]).squeeze(-1)
        del logits
    else:
        # chunk 0: the library's default (about 256 MiB of fp32 logits per chunk)
        logp, _ = chunked_vocab_parallel_log_probs(
            h, w, target, None, vocab, chunk_size=chunk or None
        )
    logp.sum().backward()
    seconds = time.perf_counter() - t0
    return {
        "mode": mode,
        "chunk": chunk if mode == "chunked" else None,
        "baseline": base,
        "peak": _maxrss_bytes(),
        "added": _maxrss_bytes() - base,
        "seconds": seconds,
        "logp_sum": float(logp.detach().sum()),
    }


def run_child(mode: str, args: argparse.Namespace, chunk: int) -> dict:
    """:func:`measure` in a fresh interpreter; its JSON result."""
    cmd = [sys.executable, __file__, "--child", mode, "--chunk", str(chunk)]
    for k in ("vocab", "tokens", "hidden", "dtype", "threads"):
        cmd += [f"--{k}", str(getattr(args, k))]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--vocab", type=int, default=131072)
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="bf16")
    p.add_argument(
        "--chunks", type=int, nargs="+", default=[0, 4096], help="chunk sizes (0: the default)"
    )
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    p.add_argument("--skip-naive", action="store_true", help="only the chunked path")
    p.add_argument("--child", choices=["naive", "chunked"], help=argparse.SUPPRESS)
    p.add_argument("--chunk", type=int, default=4096, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        import torch

        torch.set_num_threads(args.threads)
        res = measure(args.child, args.vocab, args.tokens, args.hidden, args.dtype, args.chunk)
        print(json.dumps(res))
        return
    print(
        f"vocab {args.vocab}, tokens {args.tokens}, hidden {args.hidden}, {args.dtype}, CPU, "
        f"{args.threads} threads; peak RSS per fresh process (forward + backward of sum log p)"
    )
    results = [] if args.skip_naive else [run_child("naive", args, 0)]
    results += [run_child("chunked", args, c) for c in args.chunks]
    naive = results[0] if not args.skip_naive else None
    print(f"{'path':<16}{'added GiB':>10}{'peak GiB':>10}{'time s':>8}{'ratio':>8}  sum log p")
    for r in results:
        name = r["mode"] + (f" c={r['chunk'] or 'auto'}" if r["mode"] == "chunked" else "")
        ratio = f"{r['added'] / naive['added']:.3f}" if naive else "-"
        print(
            f"{name:<16}{r['added'] / GIB:>10.2f}{r['peak'] / GIB:>10.2f}"
            f"{r['seconds']:>8.1f}{ratio:>8}  {r['logp_sum']:.6g}"
        )


if __name__ == "__main__":
    main()
