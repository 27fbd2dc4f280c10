#!/usr/bin/env python
"""Wall time and peak memory of the checkpoint converters on a large random-weight Llama.

Example (the figures in tools/ckpts/README.md):
    python tools/bench/ckpt_convert.py --work /tmp/ckpt_bench --preset llama3.2-3b --tp 2

Writes a random-weight Hugging Face checkpoint (bf16, 2 GiB safetensors shards + index) tensor by
tensor, never holding the model in memory, then runs each tool in its own process:

1. ``convert_hf_to_native.py --tp N``
2. ``reshard.py --tp 2N``
3. ``convert_native_to_hf.py`` (from the TP=N checkpoint)

and compares every exported tensor with the original, bit for bit (streamed). "peak RSS" is the
tool's own ``ru_maxrss``; it includes pages of memory-mapped input files (file-backed, which the
kernel can drop). "anon" and "file" are the peaks of the anonymous and file-backed parts, sampled
every 20 ms: "anon" is the memory a conversion really needs.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))  # run from a checkout

PRESETS = {
    "llama3.2-1b": dict(
        hidden_size=2048,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        intermediate_size=8192,
        tie_word_embeddings=True,
    ),
    "llama3.2-3b": dict(
        hidden_size=3072,
        num_hidden_layers=28,
        num_attention_heads=24,
        num_key_value_heads=8,
        intermediate_size=8192,
        tie_word_embeddings=True,
    ),
    "llama3-8b": dict(
        hidden_size=4096,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        intermediate_size=14336,
        tie_word_embeddings=False,
    ),
}
COMMON = dict(
    vocab_size=128256,
    max_position_embeddings=8192,
    rms_norm_eps=1e-5,
    rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
    dtype="bfloat16",
)


def write_random_llama(preset: str, out: Path, shard_bytes: int = 2 * 2**30) -> int:
    """A random bf16 Llama checkpoint written shard by shard; returns its size in bytes."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from megatron.ckpt.hf_io import SafetensorsWriter

    config = LlamaConfig(**PRESETS[preset], **COMMON)
    with torch.device("meta"):
        shapes = {
            k: v.shape for k, v in AutoModelForCausalLM.from_config(config).state_dict().items()
        }
    if config.tie_word_embeddings:
        shapes.pop("lm_head.weight")
    out.mkdir(parents=True)
    writer = SafetensorsWriter(out, shard_bytes)
    gen = torch.Generator().manual_seed(0)
    for name, shape in shapes.items():
        writer.add(name, torch.randn(shape, generator=gen, dtype=torch.bfloat16))
    writer.close()
    config.save_pretrained(out)
    return writer.total_bytes


def _status(pid: int) -> dict[str, int]:
    """RssAnon / RssFile / VmHWM of a process in KiB (empty once it has exited)."""
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return {}
    fields = (ln.split(":") for ln in lines if ln.startswith(("RssAnon", "RssFile", "VmHWM")))
    return {k: int(v.split()[0]) for k, v in fields}


def run_tool(name: str, *args: str) -> dict[str, float]:
    """Run ``tools/ckpts/NAME.py`` in a fresh process, sampling its memory every 20 ms.

    Returns wall time, the tool's own time, its peak RSS (``ru_maxrss``, which includes pages of
    memory-mapped files) and the sampled peaks of anonymous and file-backed resident memory.
    """
    cmd = [sys.executable, str(REPO / "tools" / "ckpts" / f"{name}.py"), *args, "--no-progress"]
    start = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    anon = file = 0
    while proc.poll() is None:
        st = _status(proc.pid)
        anon, file = max(anon, st.get("RssAnon", 0)), max(file, st.get("RssFile", 0))
        time.sleep(0.02)
    out, err = proc.communicate()
    wall = time.time() - start
    if proc.returncode:
        raise SystemExit(f"{name} failed:\n{err[-3000:]}")
    m = re.search(r"in ([\d.]+) s, peak RSS ([\d.]+) GiB", out)
    return {
        "wall_s": wall,
        "tool_s": float(m.group(1)),
        "peak_rss_gib": float(m.group(2)),
        "anon_gib": anon / 2**20,
        "file_gib": file / 2**20,
    }


def compare(a: Path, b: Path) -> int:
    """Number of tensors compared; raises if any differs."""
    from safetensors import safe_open

    def where(d: Path) -> dict[str, Path]:
        index = d / "model.safetensors.index.json"
        if index.is_file():
            return {k: d / f for k, f in json.loads(index.read_text())["weight_map"].items()}
        with safe_open(str(d / "model.safetensors"), "pt") as f:
            return {k: d / "model.safetensors" for k in f.keys()}

    wa, wb = where(a), where(b)
    if wa.keys() != wb.keys():
        raise SystemExit(f"key sets differ: {sorted(set(wa) ^ set(wb))[:5]}")
    for key in wa:
        with safe_open(str(wa[key]), "pt") as fa, safe_open(str(wb[key]), "pt") as fb:
            if not torch.equal(fa.get_tensor(key), fb.get_tensor(key)):
                raise SystemExit(f"{key} differs")
    return len(wa)


def _size(path: Path) -> float:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 2**30


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", required=True, type=Path, help="scratch directory (must not exist)")
    p.add_argument("--preset", choices=sorted(PRESETS), default="llama3.2-1b")
    p.add_argument("--tp", type=int, default=2)
    args = p.parse_args()
    work = args.work
    start = time.time()
    size = write_random_llama(args.preset, work / "hf")
    print(f"{args.preset}: {size / 2**30:.2f} GiB bf16 written in {time.time() - start:.0f} s")
    rows = {
        f"hf -> native TP={args.tp}": run_tool(
            "convert_hf_to_native",
            "--hf-dir",
            str(work / "hf"),
            "--out",
            str(work / "native"),
            "--tp",
            str(args.tp),
        ),  # fmt: skip
        f"reshard TP={args.tp} -> {2 * args.tp}": run_tool(
            "reshard",
            "--ckpt",
            str(work / "native"),
            "--out",
            str(work / "native2"),
            "--tp",
            str(2 * args.tp),
        ),  # fmt: skip
        f"native TP={args.tp} -> hf": run_tool(
            "convert_native_to_hf",
            "--ckpt",
            str(work / "native"),
            "--out",
            str(work / "back"),
            "--max-shard-size",
            "2",
        ),  # fmt: skip
    }
    outputs = [work / "native", work / "native2", work / "back"]
    print(
        f"{'step':<24} {'wall s':>7} {'tool s':>7} {'peak RSS':>9} {'anon':>6} {'file':>6} "
        f"{'written':>8}   (GiB)"
    )
    for (step, r), out in zip(rows.items(), outputs, strict=True):
        print(
            f"{step:<24} {r['wall_s']:7.1f} {r['tool_s']:7.1f} {r['peak_rss_gib']:9.2f} "
            f"{r['anon_gib']:6.2f} {r['file_gib']:6.2f} {_size(out):8.2f}"
        )
    print(f"round trip: {compare(work / 'hf', work / 'back')} tensors identical")
    return 0


if __name__ == "__main__":
    sys.exit(main())
