"""What the ours-vs-TRL benchmarks share: each side in a fresh subprocess, its result as JSON.

``run_sides(script, argv)`` runs ``script --side ours|trl --launched-at T ARGV`` one after the
other (a side's ``ru_maxrss`` is then its own peak) and returns each side's result; the child
calls ``child_result(...)`` to print it. ``tiny_llama_config`` is the random model both train.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

GIB = 2**30


def maxrss_bytes() -> int:
    """This process's peak resident memory."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def tiny_llama_config(args: Any, tokenizer: Any, max_positions: int) -> Any:
    """A ``LlamaConfig`` of ``args.hidden`` / ``args.layers`` / ``args.heads`` (half as many
    key/value heads, MLP 2h) over ``tokenizer``'s vocabulary."""
    from transformers import LlamaConfig

    return LlamaConfig(
        hidden_size=args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=max(args.heads // 2, 1),
        intermediate_size=args.hidden * 2,
        vocab_size=len(tokenizer),
        max_position_embeddings=max_positions,
        rms_norm_eps=1e-5,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )


def child_result(run: Callable[[], dict], threads: int, launched_at: float) -> None:
    """Run one side (``run()``) with ``threads`` torch threads; print its result with the peak
    memory and the time from the launch to its first step (``first_step_at`` in the result)."""
    import torch

    torch.set_num_threads(threads)
    res = run()
    res["maxrss"] = maxrss_bytes()
    res["to_first_step"] = res.pop("first_step_at") - launched_at
    print("RESULT " + json.dumps(res))


def run_sides(script: str | Path, argv: list[str], root: Path) -> dict[str, dict]:
    """Each side's result, ours first then TRL's (exits naming a side that failed)."""
    results = {}
    for side in ("ours", "trl"):
        cmd = [sys.executable, str(script), "--side", side, "--launched-at", str(time.time())]
        proc = subprocess.run([*cmd, *argv], capture_output=True, text=True, cwd=root)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode or not lines:
            sys.exit(f"{side} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
        results[side] = json.loads(lines[-1].removeprefix("RESULT "))
    return results


def step_timer() -> Any:
    """A transformers ``TrainerCallback`` recording TRL's step times (``.step_times``), when its
    first step ended (``.first_step_at``, wall clock) and its logged losses (``.losses``)."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self) -> None:
            self.step_times: list[float] = []
            self.losses: list[float] = []
            self.first_step_at: float | None = None

        def on_step_begin(self, _args, _state, _control, **kwargs):
            self.t0 = time.perf_counter()

        def on_step_end(self, _args, state, _control, **kwargs):
            self.step_times.append(time.perf_counter() - self.t0)
            if state.global_step == 1:
                self.first_step_at = time.time()

        def on_log(self, _args, _state, _control, logs=None, **kwargs):
            if logs and "loss" in logs:
                self.losses.append(float(logs["loss"]))

    return StepTimer()
