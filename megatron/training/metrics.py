"""Training metrics: a rank-0 console line per interval, a JSONL file, optional TensorBoard/wandb."""

from __future__ import annotations

import fnmatch
import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from megatron.utils import atomic_write_text, log_rank0


def _hms(seconds: float) -> str:
    seconds = max(int(seconds), 0)
    return f"{seconds // 3600:02d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def format_line(
    step: int,
    total: int,
    values: dict[str, float],
    elapsed: float,
    eta: float,
    shown: Sequence[str] | None = None,
) -> str:
    """``step 10/20 | loss 4.1234 | lr 1.0e-03 | ...`` with the well-known keys first.

    ``shown``: ``fnmatch`` patterns of the other keys to print (``None``: all of them).
    """
    parts = [f"step {step}/{total}"]
    fmt = {
        "loss": "{:.4f}",
        "lr": "{:.2e}",
        "grad_norm": "{:.3f}",
        "tokens_per_s": "{:.0f}",
        "samples_per_s": "{:.2f}",
    }
    names = {"tokens_per_s": "tokens/s", "samples_per_s": "samples/s"}
    for key, f in fmt.items():
        if key in values:
            parts.append(f"{names.get(key, key)} {f.format(values[key])}")
    for key, v in sorted(values.items()):
        if key in fmt or key in ("step", "step_time"):
            continue
        if shown is None or any(fnmatch.fnmatchcase(key, p) for p in shown):
            parts.append(f"{key} {v:.4g}")
    parts += [f"elapsed {_hms(elapsed)}", f"eta {_hms(eta)}"]
    return " | ".join(parts)


class MetricsLogger:
    """Writes metrics on rank 0 only; other ranks hold a no-op instance.

    Args:
        run_dir: directory of ``metrics.jsonl`` (appended to, so a resumed run continues it;
            :meth:`resume` first drops the records of steps that will run again).
        enabled: True on global rank 0.
        tensorboard: also write TensorBoard scalars (needs the ``tensorboard`` extra).
        wandb_project: also log to Weights & Biases under this project (needs ``wandb``).
        config: resolved config dict, passed to wandb.
    """

    def __init__(
        self,
        run_dir: str | Path,
        enabled: bool,
        tensorboard: bool = False,
        wandb_project: str | None = None,
        config: dict[str, Any] | None = None,
    ) -> None:
        self.enabled = enabled
        self.start = time.time()
        self._file = self._tb = self._wandb = None
        if not enabled:
            return
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        self.path = run_dir / "metrics.jsonl"
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
        if wandb_project:
            import wandb

            self._wandb = wandb.init(project=wandb_project, config=config or {}, dir=str(run_dir))

    def resume(self, step: int) -> None:
        """Drop the records this run writes again, so that each step is in the file once.

        A run starting at ``step`` (the checkpoint's; 0 for a fresh start) logs the train records
        of steps ``> step`` and the validation records of steps ``> step``, plus step 0's
        baseline when ``step`` is 0. Records from an earlier attempt that crashed after its last
        checkpoint are those; the file is rewritten atomically without them (a line that is
        not JSON, e.g. one cut by the crash, is dropped too).

        Args:
            step: The step training resumes from.
        """
        if not self.enabled:
            return
        self._file.close()
        kept, dropped = [], 0
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                record_step = int(json.loads(line)["step"])
            except (ValueError, KeyError, TypeError):
                record_step = None
            if record_step is not None and (record_step < step or 0 < step == record_step):
                kept.append(line + "\n")
            else:
                dropped += 1
        if dropped:
            previous = self.path.with_name(self.path.stem + ".prev.jsonl")
            # why: a fresh start (step 0) in a reused logging.dir drops every record; keep the
            # earlier attempt's file next to the new one rather than lose it
            if step == 0:
                atomic_write_text(previous, self.path.read_text(encoding="utf-8"))
            atomic_write_text(self.path, "".join(kept))
            log_rank0(
                "%s: dropped %d records of an earlier attempt that this run, starting at step %d, "
                "logs again%s",
                self.path,
                dropped,
                step,
                f" (the earlier file is kept as {previous})" if step == 0 else "",
                level=logging.WARNING,
            )
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115

    def log(self, step: int, values: dict[str, float], split: str = "train") -> None:
        """Record ``values`` at ``step`` under ``split`` (``train``/``valid``)."""
        if not self.enabled:
            return
        record = {"step": step, "split": split, "time": round(time.time() - self.start, 3)}
        record.update({k: float(v) for k, v in values.items()})
        if self._file.closed:  # e.g. Trainer.evaluate() after train(): the file only
            self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            for k, v in values.items():
                self._tb.add_scalar(f"{split}/{k}", v, step)
        if self._wandb is not None:
            self._wandb.log({f"{split}/{k}": v for k, v in values.items()}, step=step)

    def console(
        self,
        step: int,
        total: int,
        values: dict[str, float],
        first_step: int,
        shown: Sequence[str] | None = None,
    ) -> None:
        """Log the one-line summary (``shown``: see :func:`format_line`; ``metrics.jsonl`` keeps
        every key); ETA extrapolates the steps done in this process."""
        elapsed = time.time() - self.start
        done = max(step - first_step, 1)
        eta = elapsed / done * (total - step)
        log_rank0(format_line(step, total, values, elapsed, eta, shown))

    def close(self) -> None:
        """Close the outputs; a later :meth:`log` reopens ``metrics.jsonl`` (only)."""
        if self._file is not None:
            self._file.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()
        self._tb = self._wandb = None
