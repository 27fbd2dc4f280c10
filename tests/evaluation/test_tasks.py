"""Task lookup, the shipped tasks' data, the adapter's pieces and every bad-input error of
``tools/eval.py`` (each one line ``error: ...``, exit status 1, never a traceback)."""

from __future__ import annotations

import builtins
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron.evaluation import EvalError
from megatron.evaluation.tasks import LOCAL_TASKS, check_include_path, resolve_tasks
from tests.tools.helpers import load_tool

pytest.importorskip("lm_eval", reason="lm-eval is a test dependency (pip install -e '.[eval]')")
ROOT = Path(__file__).resolve().parents[2]

MC_TASK = """task: my_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: rows.jsonl
test_split: test
output_type: multiple_choice
doc_to_text: "{{q}}"
doc_to_choice: "{{[a, b]}}"
doc_to_target: 0
metric_list:
  - metric: acc
"""


def test_shipped_rows_are_the_demos_first_held_out_examples():
    spec = importlib.util.spec_from_file_location("demo_tool_t", ROOT / "tools" / "demo.py")
    demo = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = demo
    spec.loader.exec_module(demo)
    valid = demo.make_splits(demo.QUICK)["valid"][:64]
    assert valid == demo.make_splits(demo.FULL)["valid"][:64]  # the quick demo holds them out too
    rows = [json.loads(x) for x in (LOCAL_TASKS / "data" / "demo_heldout.jsonl").read_text().split("\n") if x]  # fmt: skip
    assert [(r["prompt"], r["answer"], r["corrupted"]) for r in rows] == [
        (e.prompt, e.answer, e.corrupted) for e in valid
    ]
    assert all(r["task"] == r["prompt"].split()[0] for r in rows)


def test_local_data_files_resolve_next_to_the_yaml(tmp_path, monkeypatch):
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "my_mc.yaml").write_text(MC_TASK)
    (tasks / "rows.jsonl").write_text('{"q": "1+1=", "a": " 2", "b": " 3"}\n')
    monkeypatch.chdir(tmp_path.parent)  # anywhere but the YAML's directory
    manager, specs = resolve_tasks(["my_mc", "demo_mc"], [tasks])
    assert specs[0]["dataset_kwargs"]["data_files"] == {"test": str(tasks / "rows.jsonl")}
    assert specs[1]["dataset_kwargs"]["data_files"]["test"] == str(
        LOCAL_TASKS / "data" / "demo_heldout.jsonl"
    )
    loaded = manager.load(specs)["tasks"]
    assert len(loaded["my_mc"].dataset["test"]) == 1


def test_include_path_without_yamls(tmp_path):
    (tmp_path / "notes.txt").write_text("no tasks here")
    with pytest.raises(EvalError, match=r"no task YAML files"):
        check_include_path(tmp_path)
    with pytest.raises(EvalError, match=r"not a directory"):
        check_include_path(tmp_path / "missing")


def test_unknown_task_lists_close_matches():
    with pytest.raises(EvalError, match=r"unknown task 'demo_mcc'; did you mean demo_mc"):
        resolve_tasks(["demo_mcc"])


def test_lm_eval_missing_names_what_to_install(monkeypatch):
    from megatron.evaluation.errors import require_lm_eval

    real_import = builtins.__import__

    def no_lm_eval(name, *args, **kwargs):
        if name == "lm_eval" or name.startswith("lm_eval."):
            raise ImportError("No module named 'lm_eval'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_lm_eval)
    with pytest.raises(EvalError, match=r'pip install "lm-eval>=0.4.5,<0.5"'):
        require_lm_eval()


def test_requests_split_over_replicas_once_each():
    from megatron.evaluation.harness import split_for_rank

    lengths = [5, 9, 1, 9, 3, 7, 2]
    parts = [split_for_rank(7, lengths, r, 3) for r in range(3)]
    assert sorted(i for p in parts for i in p) == list(range(7))
    assert parts[0][0] in (1, 3) and parts[1][0] in (1, 3)  # the longest go first, spread out


def test_metrics_flattened_and_tabled():
    from megatron.evaluation.runner import flat_metrics, format_table

    results = {
        "results": {
            "demo_mc": {"alias": "demo_mc", "acc,none": 0.75, "acc_stderr,none": 0.1},
            "gsm": {"exact_match,strict": 0.5, "exact_match_stderr,strict": "N/A"},
        },
        "n-samples": {"demo_mc": {"effective": 8}},
    }
    assert flat_metrics(results) == {
        "eval/demo_mc/acc": 0.75,
        "eval/gsm/exact_match@strict": 0.5,
    }
    table = format_table(results).splitlines()
    assert table[0].split() == ["task", "metric", "value", "stderr", "n"]
    assert table[1].split() == ["demo_mc", "acc", "0.7500", "0.1000", "8"]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """``(lm checkpoint, value-head checkpoint)`` of tiny random models with a tokenizer."""
    from transformers import LlamaConfig

    from megatron.ckpt.convert import convert_hf_to_native
    from megatron.ckpt.hf_io import copy_hf_extras
    from megatron.tokenizer.build import build_byte_level_bpe
    from tests.ckpt.hf_models import LLAMA_SIZES, save_random_classifier, save_random_model

    root = tmp_path_factory.mktemp("eval_tool")
    tok = build_byte_level_bpe(["sort 1 2 3: 1 2 3"] * 50, 300, root / "tok")
    config = LlamaConfig(**{**LLAMA_SIZES, "vocab_size": 300}, eos_token_id=0, pad_token_id=1)
    save_random_model(config, root / "lm_hf")
    rm_config = LlamaConfig(**{**LLAMA_SIZES, "vocab_size": 300}, num_labels=1, pad_token_id=1)
    save_random_classifier(rm_config, root / "rm_hf")
    out = []
    for name in ("lm", "rm"):
        copy_hf_extras(tok, root / f"{name}_hf", with_config=False)
        out.append(convert_hf_to_native(root / f"{name}_hf", root / name))
    return out[0], out[1]


def _tool(argv, capsys):
    code = load_tool("tools/eval.py").main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_tool_runs_and_writes_results(checkpoints, tmp_path, capsys):
    lm, _ = checkpoints
    out = tmp_path / "r.json"
    argv = ["--ckpt", str(lm), "--tasks", "demo_mc", "--limit", "4", "--output", str(out)]
    code, stdout, _ = _tool(argv, capsys)
    assert code == 0
    assert "demo_mc" in stdout and "acc" in stdout
    saved = json.loads(out.read_text())
    assert saved["grid"] == {"tp": 1, "dp": 1}
    assert 0 <= saved["results"]["demo_mc"]["acc,none"] <= 1


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--tasks", "demo_mc", "--ckpt", "MISSING"], r"error: --ckpt MISSING"),
        (["--tasks", "demo_mcq", "--ckpt", "LM"], r"error: unknown task 'demo_mcq'; did you mean"),
        (["--tasks", "demo_gen", "--ckpt", "VALUE"], r"error: .*model\.head: value.*rewardbench"),
        (["--tasks", "demo_mc", "--ckpt", "LM", "--include-path", "EMPTY"], r"no task YAML"),
        (["--tasks", "demo_mc", "--ckpt", "LM", "--tp", "2"], r"not divisible by --tp 2"),
    ],
)
def test_tool_errors(checkpoints, tmp_path, capsys, argv, message):
    lm, value = checkpoints
    (tmp_path / "empty").mkdir()
    subst = {"LM": str(lm), "VALUE": str(value), "EMPTY": str(tmp_path / "empty")}
    subst["MISSING"] = str(tmp_path / "missing")
    message = message.replace("MISSING", str(tmp_path / "missing"))
    code, _, err = _tool([subst.get(a, a) for a in argv], capsys)
    assert code == 1
    assert err.count("\n") == 1 and "Traceback" not in err
    import re

    assert re.search(message, err), err


def test_deepy_passes_the_tools_flags_after_the_double_dash(tmp_path):
    from tests.helpers_runs import tiny_run_config
    from tests.training.helpers import write_config, write_markov_corpus

    prefix = write_markov_corpus(tmp_path / "corpus")
    cfg = write_config(tmp_path / "run.yml", tiny_run_config("markov", train=prefix))
    cmd = [sys.executable, "deepy.py", "--dry-run", "tools/eval.py", str(cfg)]
    cmd += ["launcher.nproc_per_node=2", "--", "--tasks", "demo_mc", "--ckpt", str(tmp_path)]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    assert f"tools/eval.py {cfg} launcher.nproc_per_node=2 -- --tasks demo_mc --ckpt" in done.stdout


def test_generation_stops_where_the_stop_callback_says():
    from megatron.ckpt.hf_config import model_config_from_section
    from megatron.model import GPTModel
    from megatron.model.generate import SamplingConfig, generate
    from megatron.parallel import ParallelState

    section = {
        "num_layers": 1, "hidden_size": 32, "num_attention_heads": 4, "vocab_size": 64,
        "max_position_embeddings": 64,
    }  # fmt: skip
    torch.manual_seed(0)
    model = GPTModel(model_config_from_section(section, 1), ParallelState.single())
    prompts = [[1, 2, 3], [4, 5]]
    sampling = SamplingConfig(max_new_tokens=12, temperature=0.0)
    full = generate(model, prompts, sampling).to_lists()
    seen = []

    def stop(tokens, lengths):
        seen.append(tokens.shape[1])
        return lengths >= torch.tensor([3, 5])  # row 0 after 3 tokens, row 1 after 5

    out = generate(model, prompts, sampling, stop=stop).to_lists()
    assert out == [full[0][:3], full[1][:5]]
    assert seen == [1, 2, 3, 4, 5]  # asked every step until every row was done


def test_generation_budget_over_the_model_length(checkpoints, tmp_path, capsys):
    lm, _ = checkpoints
    (tmp_path / "gen.yaml").write_text(
        MC_TASK.replace("my_mc", "my_gen")
        .replace("output_type: multiple_choice", "output_type: generate_until")
        .replace('doc_to_choice: "{{[a, b]}}"\ndoc_to_target: 0', 'doc_to_target: "{{a}}"')
        .replace("metric: acc", "metric: exact_match")
    )
    (tmp_path / "rows.jsonl").write_text('{"q": "1+1=", "a": " 2", "b": " 3"}\n')
    argv = ["--ckpt", str(lm), "--tasks", "my_gen", "--include-path", str(tmp_path)]
    code, _, err = _tool(argv, capsys)
    assert code == 1
    assert (
        "max_gen_toks 256 (lm-eval's default: 256)" in err
        and "max_position_embeddings is 64" in err
    )
