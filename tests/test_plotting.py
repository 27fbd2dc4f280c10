"""megatron/plotting.py and tools/plot_metrics.py: reading metrics.jsonl, picking metrics, the
image, and every input error (named by file and line) surfacing as ``error:`` and exit 1."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import pytest

from megatron.plotting import (
    PlotError,
    build_figure,
    moving_average,
    plot_runs,
    read_metrics,
    run_labels,
    select_metrics,
)
from tests.tools.helpers import load_tool

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_run(run_dir: Path, records: list[dict], tail: str = "") -> Path:
    """A run directory whose metrics.jsonl holds ``records`` (then ``tail`` verbatim)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    lines = "".join(json.dumps(r) + "\n" for r in records)
    (run_dir / "metrics.jsonl").write_text(lines + tail, encoding="utf-8")
    return run_dir


def dpo_records(steps: int = 6, loss0: float = 0.69) -> list[dict]:
    rows = [{"step": 0, "split": "valid", "time": 0.1, "loss": loss0, "rewards/accuracies": 0.5}]
    for s in range(1, steps + 1):
        row = {"step": s, "split": "train", "time": 0.1 * s, "loss": loss0 / s, "lr": 1e-4}
        rows.append({**row, "rewards/accuracies": min(1.0, 0.5 + 0.1 * s), "reward": 0.1 * s})
    rows.append({"step": steps, "split": "valid", "time": 1.0, "loss": loss0 / steps})
    return rows


def test_read_metrics_last_record_of_a_step_wins_and_bad_values_are_skipped(tmp_path):
    run = write_run(
        tmp_path / "run",
        [
            {"step": 0, "split": "valid", "time": 0.0, "loss": 0.9},
            {"step": 1, "split": "train", "time": 0.1, "loss": 0.8, "lr": 1.0},
            {"step": 2, "split": "train", "time": 0.2, "loss": 0.7, "lr": 2.0},
            {"step": 3, "split": "train", "time": 0.3, "loss": 0.6},  # crashed after this
            # resumed from step 1: steps 2 and 3 again, whole rows replaced
            {"step": 2, "split": "train", "time": 5.0, "loss": 0.75, "note": "x", "acc": None},
            {"step": 3, "split": "train", "time": 5.1, "loss": float("nan"), "lr": 3.0},
            {"step": 4, "split": "train", "time": 5.2, "loss": 0.5, "flag": True},
        ],
    )
    curves = read_metrics(run)
    assert curves == {
        "valid": {"loss": [(0, 0.9)]},
        "train": {
            "loss": [(1, 0.8), (2, 0.75), (4, 0.5)],  # NaN at 3 skipped
            "lr": [(1, 1.0), (3, 3.0)],  # step 2's last row has no lr
        },
    }


def test_an_incomplete_last_line_is_skipped_with_a_warning(tmp_path, caplog):
    run = write_run(tmp_path / "live", dpo_records(2), tail='{"step": 3, "split": "tr')
    with caplog.at_level(logging.WARNING, logger="megatron.plotting"):
        curves = read_metrics(run)
    assert [s for s, _ in curves["train"]["loss"]] == [1, 2]
    assert f"{run / 'metrics.jsonl'}:5: skipped an incomplete last line" in caplog.text


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"step": 3, "split": "train", "loss": 0.1', "not valid JSON"),
        ("[1, 2]", "expected a JSON object, got list"),
        ('{"split": "train", "loss": 0.1}', '"step" must be an int, got None'),
        ('{"step": 3.0, "split": "train"}', '"step" must be an int, got 3.0'),
        ('{"step": 3, "loss": 0.1}', '"split" must be a string, got None'),
    ],
)
def test_a_malformed_line_names_file_and_line(tmp_path, line, message):
    run = write_run(tmp_path / "run", dpo_records(1), tail=line + "\n" + json.dumps({}) + "\n")
    with pytest.raises(PlotError) as err:
        read_metrics(run)
    assert str(err.value).startswith(f"{run / 'metrics.jsonl'}:4: {message}")


def test_a_run_dir_without_metrics_is_an_error(tmp_path):
    with pytest.raises(PlotError, match="missing: run directory not found"):
        read_metrics(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(PlotError, match=r"empty/metrics.jsonl: not found"):
        read_metrics(tmp_path / "empty")


def test_default_metrics_are_loss_and_the_first_accuracy_like_one():
    dpo = {"train": {"loss": [(1, 1.0)], "reward": [(1, 0.1)], "rewards/accuracies": [(1, 1.0)]}}
    sft = {"train": {"loss": [(1, 1.0)], "sft/nll": [(1, 1.0)], "lr": [(1, 1.0)]}}
    assert select_metrics([dpo], None) == ["loss", "rewards/accuracies"]
    assert select_metrics([sft], None) == ["loss", "sft/nll"]
    assert select_metrics([sft, dpo], None) == ["loss", "rewards/accuracies"]
    assert select_metrics([{"valid": {"accuracy": [(0, 0.5)]}}], None) == ["accuracy"]
    assert select_metrics([{"train": {"lr": [(1, 1.0)]}}], ["lr", "lr"]) == ["lr"]
    with pytest.raises(PlotError, match="no loss or .* metric; pick from lr"):
        select_metrics([{"train": {"lr": [(1, 1.0)]}}], None)
    with pytest.raises(PlotError, match="no train or valid metrics"):
        select_metrics([{}], None)


def test_an_unknown_metric_lists_the_close_matches_and_what_exists():
    curves = {"train": {"loss": [(1, 1.0)], "rewards/accuracies": [(1, 1.0)], "lr": [(1, 0.1)]}}
    with pytest.raises(PlotError) as err:
        select_metrics([curves], ["loss", "rewards/accuracy", "zzz"])
    msg = str(err.value)
    assert "unknown metric 'rewards/accuracy' (did you mean 'rewards/accuracies'?)" in msg
    assert "unknown metric 'zzz'; the runs have: loss, lr, rewards/accuracies" in msg


def test_run_labels_add_parents_only_to_tell_equal_basenames_apart(tmp_path):
    dirs = [tmp_path / "a" / "dpo", tmp_path / "b" / "dpo", tmp_path / "b" / "sft"]
    assert run_labels(dirs) == ["a/dpo", "b/dpo", "sft"]
    nested = [tmp_path / "x" / "s" / "dpo", tmp_path / "y" / "s" / "dpo"]
    assert run_labels(nested) == ["x/s/dpo", "y/s/dpo"]
    with pytest.raises(PlotError, match="given twice"):
        run_labels([dirs[0], dirs[0] / ".." / "dpo"])


def test_moving_average_is_trailing_and_keeps_every_point():
    assert moving_average([1.0, 2.0, 3.0, 4.0, 5.0], 1) == [1.0, 2.0, 3.0, 4.0, 5.0]
    assert moving_average([1.0, 2.0, 3.0, 4.0, 5.0], 3) == [1.0, 1.5, 2.0, 3.0, 4.0]


def test_plot_runs_writes_a_png_with_one_subplot_per_metric(tmp_path):
    runs = [
        write_run(tmp_path / "a" / "dpo", dpo_records()),
        write_run(tmp_path / "b" / "dpo", dpo_records(loss0=0.8)),
    ]
    out = tmp_path / "plots" / "new" / "curves.png"  # parents are created
    assert plot_runs(runs, ["loss", "lr", "rewards/accuracies"], out, smooth=3) == out
    assert out.read_bytes().startswith(PNG_MAGIC)
    assert [p.name for p in out.parent.iterdir()] == ["curves.png"]  # no temp file left

    curves = {label: read_metrics(d) for label, d in zip(run_labels(runs), runs, strict=True)}
    fig = build_figure(curves, ["loss", "lr", "rewards/accuracies"], smooth=3)
    assert [ax.get_title() for ax in fig.axes] == ["loss", "lr", "rewards/accuracies"]
    assert {ax.get_xlabel() for ax in fig.axes} == {"step"}
    loss = fig.axes[0].get_lines()  # per run: train, then valid (with markers)
    assert len(loss) == 4 and loss[1].get_marker() == "o"
    assert loss[0].get_color() != loss[2].get_color()
    assert list(loss[0].get_ydata())[:2] == pytest.approx([0.69, (0.69 + 0.345) / 2])
    assert list(loss[1].get_ydata()) == pytest.approx([0.69, 0.115])  # valid: never smoothed
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert legend == ["a/dpo", "b/dpo", "train (mean of 3)", "valid"]
    with pytest.raises(PlotError, match="smooth must be >= 1"):
        plot_runs(runs, None, out, smooth=0)
    with pytest.raises(PlotError, match=r"curves.txt: unsupported image suffix"):
        plot_runs(runs, None, tmp_path / "curves.txt")


def test_the_tool_writes_the_default_metrics_and_reports_errors(tmp_path, capsys):
    tool = load_tool("tools/plot_metrics.py")
    run = write_run(tmp_path / "dpo", dpo_records())
    out = tmp_path / "out.png"
    assert tool.main([str(run), "--out", str(out), "--smooth", "2"]) == 0
    assert out.read_bytes().startswith(PNG_MAGIC)
    assert tool.main([str(tmp_path / "nope"), str(run), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert f"error: {tmp_path / 'nope'}: run directory not found" in err
    assert "Traceback" not in err
    assert tool.main([str(run), "--metrics", "los", "--out", str(out)]) == 1
    assert "error: unknown metric 'los' (did you mean 'loss'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        tool.main([str(run), "--metrics", " , "])
    assert exit_.value.code == 2


def test_missing_matplotlib_is_a_clear_error(tmp_path, monkeypatch, capsys):
    run = write_run(tmp_path / "dpo", dpo_records(1))
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now fails
    with pytest.raises(PlotError, match=r'pip install matplotlib \(or pip install -e "\.\[plot\]"'):
        plot_runs([run], None, tmp_path / "x.png")
    tool = load_tool("tools/plot_metrics.py")
    assert tool.main([str(run), "--out", str(tmp_path / "x.png")]) == 1
    assert "error: plotting needs matplotlib: pip install matplotlib" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()
