"""tools/inspect_data.py and the post-training flags of tools/preprocess_data.py."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

from megatron.data.meta import read_meta
from tests.data.conftest import CHATML, write_jsonl

REPO = Path(__file__).resolve().parents[2]


def _tool(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cli_pairwise_then_inspect(tmp_path, tiny_tokenizer_dir, capsys):
    (tmp_path / "chatml.jinja").write_text(CHATML)
    rows = [
        {
            "prompt": [{"role": "user", "content": "the model reads"}],
            "chosen": [{"role": "assistant", "content": "a red bicycle"}],
            "rejected": [{"role": "assistant", "content": "the river"}],
            "margin": 0.5,
        },
        {"prompt": "Say:", "chosen": " yes", "rejected": " yes"},  # identical: a bad row
    ]
    src = write_jsonl(tmp_path / "p.jsonl", rows)
    prefix = tmp_path / "out" / "prefs"
    cmd = [
        sys.executable, "tools/preprocess_data.py", "--no-progress", "--format", "pairwise",
        "--input", str(src), "--output-prefix", str(prefix), "--tokenizer", str(tiny_tokenizer_dir),
        "--chat-template", str(tmp_path / "chatml.jinja"), "--max-length", "64",
        "--length-policy", "truncate_prompt",
    ]  # fmt: skip
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert res.returncode == 1 and f"{src}:2: 'chosen' and 'rejected' are identical" in res.stderr
    res = subprocess.run([*cmd, "--on-error", "skip"], cwd=REPO, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert "rows written  1" in res.stdout and "identical: 1" in res.stdout
    assert read_meta(prefix)["options"]["max_length"] == 64

    inspect = _tool("inspect_data")
    assert inspect.main([str(prefix), "--index", "0", "--tokens", "--color", "never"]) == 0
    out = capsys.readouterr().out
    assert "format        pairwise  (1 rows" in out and "skipped 1 (identical: 1)" in out
    assert "margin=0.5" in out
    assert "<|im_start|>assistant\n⟦a red bicycle<|im_end|>\n⟧" in out
    assert "<|im_start|>assistant\n⟦the river<|im_end|>\n⟧" in out
    assert " T '<|im_end|>'" in out and " . '<|im_start|>'" in out
    assert inspect.main([str(prefix), "--index", "5"]) == 1
    assert inspect.main([str(tmp_path / "missing")]) == 1
    assert inspect.main([str(prefix), "--layouts", "--micro-batch", "4", "--seq-length", "64"]) == 0
    table = capsys.readouterr().out.split("layouts ")[1].splitlines()
    assert [ln.split()[0] for ln in table[2:5]] == ["padded", "packed", "prefix_shared"]
    assert float(table[4].split()[-2]) > 1.0  # prefix sharing saves token slots: one prompt less
