"""Training curves of one or more runs, read from their ``metrics.jsonl`` and drawn to an image.

A run directory's ``metrics.jsonl`` (written by :class:`megatron.training.metrics.MetricsLogger`)
holds one JSON object per line: ``step`` (int), ``split`` (``"train"`` or ``"valid"``), ``time``
and the metric values. :func:`read_metrics` turns it into
``{split: {metric: [(step, value), ...]}}`` sorted by step:

* A resumed run may log a step again; the last line for a ``(split, step)`` wins, as a whole
  row (a metric the earlier row had and the last one lacks has no point at that step).
* A value that is not a finite number (a string, ``null``, a bool, ``NaN``, ``inf``) is skipped
  for that metric only; matplotlib cannot place it, and an ``inf`` would flatten the axis.
* A line that is not a JSON object with an int ``step`` and a string ``split`` is an error naming
  ``FILE:LINE``, except a last line without its newline: a write in progress (a live run) or one
  cut by a crash, skipped with a warning.

:func:`plot_runs` draws one subplot per metric in a grid (title: the metric, x axis: ``step``),
one colour per run, training as lines (optionally a trailing moving average over ``smooth``
points) and validation as lines with markers (never smoothed), with a legend of run names (the
directory's basename, with as many parent names as it takes to tell equal basenames apart). The
image is written atomically; its format follows the suffix of ``out`` (``.png``, ``.svg``,
``.pdf``, ...). With ``metrics=None`` it draws ``loss`` and the first of
:data:`SECONDARY_METRICS` any run has.

matplotlib is an optional dependency (``pip install -e ".[plot]"``), imported on first use; the
figure is a :class:`matplotlib.figure.Figure` on the Agg canvas, so no pyplot global state and no
display is involved. Every problem with the input raises :class:`PlotError`.

Example:
    >>> from pathlib import Path
    >>> from megatron.plotting import plot_runs
    >>> plot_runs([Path("runs/demo/sft"), Path("runs/demo/dpo")], None, Path("curves.png"))
"""

from __future__ import annotations

import difflib
import io
import json
import logging
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from megatron.utils import atomic_write_bytes

if TYPE_CHECKING:
    from matplotlib.figure import Figure

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
"""Name of the metrics file inside a run directory."""

RECORD_KEYS = frozenset({"step", "split", "time"})
"""Keys of a metrics record that are not metrics."""

SECONDARY_METRICS = ("rewards/accuracies", "accuracy", "sft/nll", "reward")
"""Drawn next to ``loss`` by default: the first of these that any run has."""

SPLITS = ("train", "valid")
"""Splits drawn, in this order (a record of any other split is read but not drawn)."""

INSTALL_HINT = 'pip install matplotlib (or pip install -e ".[plot]")'
"""How to get the optional dependency."""

MIN_MATPLOTLIB = (3, 8)
"""Oldest matplotlib supported (``loc="outside ..."`` figure legends)."""

Curves = dict[str, dict[str, list[tuple[int, float]]]]
"""``{split: {metric: [(step, value), ...]}}``, each list sorted by step."""


class PlotError(ValueError):
    """Input that cannot be plotted (or no matplotlib); the message names the file and the fix."""


def read_metrics(run_dir: str | Path) -> Curves:
    """The curves of one run, read from ``run_dir/metrics.jsonl``.

    Args:
        run_dir: A run directory holding ``metrics.jsonl``.

    Returns:
        ``{split: {metric: [(step, value), ...]}}``, each list sorted by step; the last record of
        a ``(split, step)`` wins, and values that are not finite numbers are skipped (see the
        module docstring).

    Raises:
        PlotError: ``run_dir`` is not a directory or has no ``metrics.jsonl``, or a line is not a
            JSON object with an int ``step`` and a string ``split`` (``FILE:LINE: message``).
    """
    run_dir = Path(run_dir)
    path = run_dir / METRICS_FILE
    if not run_dir.is_dir():
        raise PlotError(f"{run_dir}: run directory not found")
    if not path.is_file():
        raise PlotError(f"{path}: not found (is {run_dir} a run directory?)")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise PlotError(f"{path}: cannot read: {e}") from None
    lines = text.split("\n")  # a complete file ends with "\n", leaving "" last
    rows: dict[tuple[str, int], dict[str, Any]] = {}
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            split, step, row = _parse_record(line)
        except PlotError as e:
            if lineno == len(lines):  # no newline after it: still being written, or cut
                logger.warning("%s:%d: skipped an incomplete last line (%s)", path, lineno, e)
                continue
            raise PlotError(f"{path}:{lineno}: {e}") from None
        rows[split, step] = row
    curves: Curves = {}
    for (split, step), row in sorted(rows.items(), key=lambda kv: kv[0][1]):
        for key, value in row.items():
            if key in RECORD_KEYS or not _is_finite_number(value):
                continue
            curves.setdefault(split, {}).setdefault(key, []).append((step, float(value)))
    return curves


def _parse_record(line: str) -> tuple[str, int, dict[str, Any]]:
    """``(split, step, record)`` of one line; :class:`PlotError` (no location) if malformed."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise PlotError(f"not valid JSON ({e})") from None
    if not isinstance(row, dict):
        raise PlotError(f"expected a JSON object, got {type(row).__name__}")
    step, split = row.get("step"), row.get("split")
    if isinstance(step, bool) or not isinstance(step, int):
        raise PlotError(f'"step" must be an int, got {step!r}')
    if not isinstance(split, str):
        raise PlotError(f'"split" must be a string, got {split!r}')
    return split, step, row


def _is_finite_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def available_metrics(runs: Sequence[Curves]) -> list[str]:
    """Every metric any of ``runs`` has in a drawn split, sorted."""
    return sorted({m for curves in runs for s in SPLITS for m in curves.get(s, {})})


def select_metrics(runs: Sequence[Curves], requested: Sequence[str] | None) -> list[str]:
    """The metrics to draw: ``requested`` (each checked to exist), or the default.

    Args:
        runs: The curves of each run (see :func:`read_metrics`).
        requested: Metric names in drawing order, or None for the default: ``loss`` and the first
            of :data:`SECONDARY_METRICS` present, each if any run has it.

    Returns:
        Metric names, duplicates removed, in order.

    Raises:
        PlotError: ``requested`` is empty or names a metric no run has (the message lists the
            metrics that exist and the close matches), or no default metric exists.
    """
    available = available_metrics(runs)
    if not available:
        raise PlotError("the runs have no train or valid metrics to plot")
    shown = ", ".join(available)
    if requested is None:
        secondary = [m for m in SECONDARY_METRICS if m in available][:1]
        chosen = [m for m in ["loss", *secondary] if m in available]
        if not chosen:
            raise PlotError(f"no loss or {'/'.join(SECONDARY_METRICS)} metric; pick from {shown}")
        return chosen
    if not requested:
        raise PlotError(f"no metrics requested; pick from {shown}")
    problems = []
    for name in requested:
        if name not in available:
            close = difflib.get_close_matches(name, available, n=3)
            hint = f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""
            problems.append(f"unknown metric {name!r}{hint}")
    if problems:
        raise PlotError(f"{'; '.join(problems)}; the runs have: {shown}")
    return list(dict.fromkeys(requested))


def run_labels(run_dirs: Sequence[str | Path]) -> list[str]:
    """Legend names: each directory's basename, with parent names added until they differ.

    Raises:
        PlotError: the same directory is given twice.
    """
    paths = [Path(d).resolve() for d in run_dirs]
    for i, p in enumerate(paths):
        if p in paths[:i]:
            raise PlotError(f"{run_dirs[i]}: run directory given twice")
    depth = [1] * len(paths)
    while True:
        labels = ["/".join(p.parts[-k:]) for p, k in zip(paths, depth, strict=True)]
        clashes = {x for x in labels if labels.count(x) > 1}
        if not clashes:
            return labels
        for i, label in enumerate(labels):
            if label in clashes:  # distinct resolved paths: some depth tells them apart
                depth[i] += 1


def moving_average(values: Sequence[float], n: int) -> list[float]:
    """Trailing mean over the last ``n`` values (fewer at the start, so no point is lost)."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= n:
            total -= values[i - n]
        out.append(total / min(i + 1, n))
    return out


def _matplotlib() -> tuple[type, type, type]:
    """``(Figure, FigureCanvasAgg, Line2D)``, imported on first use.

    Raises:
        PlotError: matplotlib is not installed, or older than :data:`MIN_MATPLOTLIB`.
    """
    try:
        import matplotlib
    except ImportError:
        raise PlotError(f"plotting needs matplotlib: {INSTALL_HINT}") from None
    version = tuple(int(x) for x in re.findall(r"\d+", matplotlib.__version__)[:2])
    if version < MIN_MATPLOTLIB:
        need = ".".join(map(str, MIN_MATPLOTLIB))
        raise PlotError(f"plotting needs matplotlib>={need}, found {matplotlib.__version__}")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    return Figure, FigureCanvasAgg, Line2D


def build_figure(runs: dict[str, Curves], metrics: Sequence[str], smooth: int = 1) -> Figure:
    """One subplot per metric, one colour per run (see the module docstring).

    Args:
        runs: ``{legend name: curves}`` in legend order (see :func:`read_metrics`).
        metrics: Metric names, one subplot each, row by row.
        smooth: Trailing moving average over this many training points (1: raw).

    Returns:
        The figure on an Agg canvas; ``figure.axes`` holds one axes per metric, in order.

    Raises:
        PlotError: no matplotlib, no metrics, or ``smooth < 1``.
    """
    Figure, FigureCanvasAgg, Line2D = _matplotlib()
    if not metrics:
        raise PlotError("no metrics to plot")
    if smooth < 1:
        raise PlotError(f"smooth must be >= 1, got {smooth}")
    ncols = math.ceil(math.sqrt(len(metrics)))
    nrows = math.ceil(len(metrics) / ncols)
    fig = Figure(figsize=(5.0 * ncols, 3.6 * nrows + 0.6), layout="constrained")
    FigureCanvasAgg(fig)
    grid = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax in grid[len(metrics) :]:
        ax.remove()
    colours = [f"C{i % 10}" for i in range(len(runs))]
    for ax, metric in zip(grid, metrics, strict=False):
        for colour, curves in zip(colours, runs.values(), strict=True):
            train = curves.get("train", {}).get(metric, [])
            valid = curves.get("valid", {}).get(metric, [])
            if train:
                steps, values = zip(*train, strict=True)
                ax.plot(steps, moving_average(values, smooth), color=colour, lw=1.2)
            if valid:
                steps, values = zip(*valid, strict=True)
                ax.plot(steps, values, color=colour, lw=1.2, ls="--", marker="o", ms=3.5)
        ax.set_title(metric)
        ax.set_xlabel("step")
        ax.grid(True, alpha=0.3)
    train_label = "train" if smooth == 1 else f"train (mean of {smooth})"
    handles = [
        Line2D([], [], color=c, lw=2, label=name) for c, name in zip(colours, runs, strict=True)
    ]
    handles += [
        Line2D([], [], color="0.3", lw=1.2, label=train_label),
        Line2D([], [], color="0.3", lw=1.2, ls="--", marker="o", ms=3.5, label="valid"),
    ]
    fig.legend(handles=handles, loc="outside upper center", ncols=min(len(handles), 6))
    return fig


def plot_runs(
    run_dirs: Sequence[str | Path],
    metrics: Sequence[str] | None,
    out: str | Path,
    smooth: int = 1,
) -> Path:
    """Read each run's ``metrics.jsonl``, draw the curves and write the image atomically.

    Args:
        run_dirs: Run directories, each holding ``metrics.jsonl``; legend in this order.
        metrics: Metric names to draw, or None for the default (see :func:`select_metrics`).
        out: Image path; the suffix picks the format (``.png``, ``.svg``, ``.pdf``, ...) and
            missing parent directories are created.
        smooth: Trailing moving average over this many training points (1: raw).

    Returns:
        ``out`` as a :class:`~pathlib.Path`.

    Raises:
        PlotError: a bad run directory, metrics file or metric name, an unsupported suffix,
            ``smooth < 1``, or no matplotlib.
    """
    out = Path(out)
    if not run_dirs:
        raise PlotError("no run directories given")
    if smooth < 1:
        raise PlotError(f"smooth must be >= 1, got {smooth}")
    _matplotlib()  # fail before reading the runs
    labels = run_labels(run_dirs)
    runs = {label: read_metrics(d) for label, d in zip(labels, run_dirs, strict=True)}
    chosen = select_metrics(list(runs.values()), metrics)
    fig = build_figure(runs, chosen, smooth)
    fmt = out.suffix[1:].lower()
    supported = fig.canvas.get_supported_filetypes()
    if fmt not in supported:
        raise PlotError(f"{out}: unsupported image suffix; use one of .{', .'.join(supported)}")
    buf = io.BytesIO()
    fig.savefig(buf, format=fmt, dpi=120)
    try:
        atomic_write_bytes(out, buf.getvalue())
    except OSError as e:
        raise PlotError(f"{out}: cannot write: {e}") from None
    return out
