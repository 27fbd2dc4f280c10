"""RewardBench evaluation (``megatron/rewardbench.py``, ``tools/rewardbench.py``).

Section and overall scores against hand-worked values (the Reasoning weighting of ``math-prm``
vs ``hep-*``, ties counted wrong, absent sections, Prior Sets at half weight); a tiny random
Llama reward model (the tiny tokenizer's vocab) converted to a native checkpoint and exported
back gives identical per-subset accuracies and the same pair scores to fp32 round-off, in the
chat and the plain form, from JSONL, a JSON array and Parquet; bad input names its file:line.
The RewardBench-format rows are generated here (:func:`make_rewardbench_rows`).
"""

from __future__ import annotations

import json
import math
import random
import shutil
from pathlib import Path

import pytest

from megatron.rewardbench import (
    EXAMPLE_COUNTS,
    SUBSET_MAPPING,
    Pair,
    SubsetResult,
    format_table,
    pair_records,
    section_scores,
    summarize,
    tally,
)
from tests.conftest import make_english_corpus
from tests.data.conftest import CHATML
from tests.tools.helpers import checkpoint_config, load_tool

TOL = 1e-5
PAD = 1  # the tiny tokenizer's <|pad|>
SAMPLE_SUBSETS = {
    "alpacaeval-easy": 4, "mt-bench-med": 3, "donotanswer": 4, "math-prm": 4, "hep-python": 3,
    "shp": 3, "my-own-set": 2,
}  # fmt: skip


def make_rewardbench_rows(per_subset: dict[str, int], seed: int = 0) -> list[dict]:
    """RewardBench-format rows: per subset that many ``{"prompt", "chosen", "rejected",
    "subset", "id"}``, a short question and two different English answers of 1-3 sentences
    (deterministic for a seed)."""
    rng = random.Random(seed)
    docs = make_english_corpus(200, seed=seed)
    rows = []
    for subset, n in per_subset.items():
        for _ in range(n):
            chosen, rejected = rng.sample(docs, 2)
            topic = rng.choice(docs).split(" ")[1]
            rows.append({"prompt": f"Tell me about {topic}.", "chosen": chosen,
                         "rejected": rejected, "subset": subset, "id": len(rows)})  # fmt: skip
    return rows


def _results(counts: dict[str, tuple[int, int]]) -> dict[str, SubsetResult]:
    """``{subset: (correct, n)}`` as tallies without ties."""
    return {s: SubsetResult(n=n, correct=c, ties=0) for s, (c, n) in counts.items()}


# ---- the section math, by hand -------------------------------------------------------------------
def test_partial_sections_by_hand():
    results = _results({
        "alpacaeval-easy": (9, 10), "mt-bench-easy": (1, 2),            # Chat
        "donotanswer": (2, 4),                                          # Safety
        "math-prm": (1, 4), "hep-python": (3, 3), "hep-go": (1, 2),     # Reasoning
        "my-own-set": (0, 5),                                           # other
    })  # fmt: skip
    report = summarize(results)
    # Chat: weights 100 and 28 (RewardBench's counts, not the rows here): (0.9*100 + 0.5*28)/128
    chat = (90 + 14) / 128
    assert chat == 0.8125
    # Reasoning: math-prm weighs 984 (= 6 x 164), each hep-* 164: (246 + 164 + 82) / 1312
    reasoning = (0.25 * 984 + 1.0 * 164 + 0.5 * 164) / (984 + 2 * 164)
    assert reasoning == 0.375
    sections = {name: s["score"] for name, s in report["sections"].items()}
    assert sections == {"Chat": chat, "Chat Hard": None, "Safety": 0.5, "Reasoning": reasoning}
    assert report["score"] == pytest.approx((0.8125 + 0.5 + 0.375) / 3) == 0.5625
    assert (report["sections_present"], report["partial"]) == (3, True)
    assert report["other_subsets"] == ["my-own-set"]
    assert report["subsets"]["my-own-set"] == {
        "n": 5, "correct": 0, "ties": 0, "accuracy": 0.0, "section": None}  # fmt: skip
    assert report["prior_sets"] is None and report["score_with_prior_sets"] is None
    assert report["sections"]["Chat Hard"]["missing_subsets"] == list(SUBSET_MAPPING["Chat Hard"])
    # subsets listed in RewardBench's order, others last
    assert list(report["subsets"])[:3] == ["alpacaeval-easy", "mt-bench-easy", "donotanswer"]
    table = format_table(report)
    assert "PARTIAL: 3 of 4 sections, 6 of 23 subsets" in table
    (chat_hard,) = [line for line in table.splitlines() if line.startswith("Chat Hard ")]
    assert chat_hard.split() == ["Chat", "Hard", "-", "0/6", "absent"]
    assert "other (in no section): my-own-set" in table


def test_reasoning_weighs_math_as_much_as_all_code():
    hep = {"hep-cpp": 1.0, "hep-go": 0.5, "hep-java": 0.5, "hep-js": 0.0, "hep-python": 1.0,
           "hep-rust": 0.0}  # fmt: skip
    acc = {"math-prm": 0.6, **hep}
    # 0.6 * 984 + 164 * (1 + .5 + .5 + 0 + 1 + 0) = 590.4 + 492 over 1968: (0.6 + 0.5) / 2
    assert section_scores(acc)["Reasoning"] == pytest.approx(0.55, abs=1e-15)
    assert section_scores(hep)["Reasoning"] == pytest.approx(0.5)  # code alone: its own mean
    assert section_scores({"math-prm": 0.6})["Reasoning"] == pytest.approx(0.6)


def test_full_benchmark_with_prior_sets_by_hand():
    per_section = {"Chat": (4, 5), "Chat Hard": (2, 5), "Safety": (9, 10), "Reasoning": (1, 2)}
    counts = {s: per_section[sec] for sec, subs in SUBSET_MAPPING.items() for s in subs}
    counts |= {"anthropic_helpful": (3, 5), "shp": (4, 5), "mtbench_human": (1, 1)}
    report = summarize(_results(counts))
    sections = {name: s["score"] for name, s in report["sections"].items()}
    assert sections == pytest.approx({"Chat": 0.8, "Chat Hard": 0.4, "Safety": 0.9,
                                      "Reasoning": 0.5}, abs=1e-15)  # fmt: skip
    assert report["score"] == pytest.approx((0.8 + 0.4 + 0.9 + 0.5) / 4) == pytest.approx(0.65)
    assert report["partial"] is False and "PARTIAL" not in format_table(report)
    # Prior Sets: the unweighted mean of those present (0.6, 0.8); the leaderboard weighs the
    # four sections 2 each and Prior Sets 1: (2 * 2.6 + 0.7) / 9
    assert report["prior_sets"] == {"score": pytest.approx(0.7), "subsets": ["anthropic_helpful", "shp"]}  # fmt: skip
    assert report["score_with_prior_sets"] == pytest.approx(5.9 / 9)
    assert report["other_subsets"] == ["mtbench_human"]
    assert len(EXAMPLE_COUNTS) == 23 and sum(map(len, SUBSET_MAPPING.values())) == 23


def test_ties_and_nan_count_as_wrong():
    pairs = [Pair(f"f:{i}", "p", "a", "b", "hep-go") for i in range(4)]
    pairs.append(Pair("f:5", "p", "a", "b", "hep-cpp"))
    chosen = [1.0, 2.0, 0.5, math.nan, 0.0]
    rejected = [0.0, 2.0, 0.7, 0.0, 0.0]
    results = tally(pairs, chosen, rejected)
    assert results == {"hep-go": SubsetResult(n=4, correct=1, ties=1),
                       "hep-cpp": SubsetResult(n=1, correct=0, ties=1)}  # fmt: skip
    assert summarize(results)["sections"]["Reasoning"]["score"] == pytest.approx(0.25 * 164 / 328)


def test_pair_records_forms():
    pair = Pair("f:1", "Why?", "Because.", "No.", "shp")
    chosen, rejected = pair_records(pair, "chat")
    assert chosen == {"messages": [{"role": "user", "content": "Why?"},
                                   {"role": "assistant", "content": "Because."}]}  # fmt: skip
    assert rejected["messages"][-1] == {"role": "assistant", "content": "No."}
    assert pair_records(pair, "plain") == ({"prompt": "Why?", "completion": "Because."},
                                           {"prompt": "Why?", "completion": "No."})  # fmt: skip
    turns = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
             {"role": "user", "content": "Why?"}]  # fmt: skip
    multi = Pair("f:2", turns, "Because.", "No.", "shp")
    assert pair_records(multi, "chat")[0]["messages"] == [*turns, {"role": "assistant",
                                                                   "content": "Because."}]  # fmt: skip
    from megatron.scoring import ScoreError

    with pytest.raises(ScoreError, match=r"^f:2: 'prompt' is a message list, which needs a chat"):
        pair_records(multi, "plain")


# ---- native checkpoint vs its Hugging Face export ------------------------------------------------
@pytest.fixture(scope="module")
def rm(tiny_tokenizer_dir, tmp_path_factory) -> dict[str, Path]:
    """A tiny random Llama reward model: native TP=1 checkpoint, its export, the data."""
    from megatron.ckpt.convert import convert_hf_to_native, convert_native_to_hf
    from tests.ckpt.hf_models import hf_config, save_random_classifier

    root = tmp_path_factory.mktemp("rewardbench")
    save_random_classifier(hf_config("llama3", num_labels=1, pad_token_id=PAD), root / "src", 3)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(tiny_tokenizer_dir / name, root / "src" / name)
    native = root / "native"
    convert_hf_to_native(root / "src", native, tp_size=1)
    export = convert_native_to_hf(native, root / "export", config=checkpoint_config(native),
                                  extras_dir=native / "hf")  # fmt: skip
    (root / "chatml.jinja").write_text(CHATML)
    rows = make_rewardbench_rows(SAMPLE_SUBSETS)
    (root / "rb.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"native": native, "export": export, "template": root / "chatml.jinja",
            "data": root / "rb.jsonl", "root": root, "rows": rows}  # fmt: skip


def _run(model: Path, data: Path, out: Path | None, *extra: str) -> int:
    argv = ["--model", str(model), "--input", str(data), *extra]
    return load_tool("tools/rewardbench.py").main(argv + (["--output", str(out)] if out else []))


@pytest.mark.parametrize("form", ["chat", "plain"])
def test_native_and_export_agree(rm, tmp_path, capsys, form):
    template = str(rm["template"]) if form == "chat" else "none"
    flags = ["--chat-template", template, "--batch-size", "5"]
    reports = {}
    for kind in ("native", "export"):
        assert _run(rm[kind], rm["data"], tmp_path / f"{kind}.json", *flags) == 0
        reports[kind] = json.loads((tmp_path / f"{kind}.json").read_text())
    native, export = reports["native"], reports["export"]
    assert native["form"] == export["form"] == form
    assert native["subsets"] == export["subsets"]  # identical counts and accuracies
    assert native["sections"] == export["sections"] and native["score"] == export["score"]
    diff = max(abs(a[k] - b[k]) for a, b in zip(native["pairs"], export["pairs"], strict=True)
               for k in ("chosen_score", "rejected_score"))  # fmt: skip
    assert diff <= TOL, f"native vs HF export ({form}): max |score difference| {diff:.2e}"
    assert [p["id"] for p in native["pairs"]] == [r["id"] for r in rm["rows"]]
    assert {s: r["n"] for s, r in native["subsets"].items()} == SAMPLE_SUBSETS
    assert native["partial"] and native["sections"]["Chat Hard"]["score"] is None
    assert native["prior_sets"]["subsets"] == ["shp"] and native["other_subsets"] == ["my-own-set"]
    assert len({round(p["chosen_score"], 6) for p in native["pairs"]}) == len(rm["rows"])
    out = capsys.readouterr().out
    assert f"form {form}" in out and "PARTIAL: 3 of 4 sections, 5 of 23 subsets" in out
    assert "score w/ Prior Sets" in out


def test_json_array_and_parquet_inputs_match_jsonl(rm, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    flags = ["--chat-template", str(rm["template"])]
    array = tmp_path / "rb.json"
    array.write_text(json.dumps(rm["rows"], indent=1))
    parquet = tmp_path / "rb.parquet"
    pq.write_table(pa.Table.from_pylist(rm["rows"]), parquet)
    reports = []
    for data in (rm["data"], array, parquet):
        assert _run(rm["native"], data, tmp_path / "r.json", *flags) == 0
        report = json.loads((tmp_path / "r.json").read_text())
        reports.append({k: report[k] for k in ("subsets", "sections", "score", "pairs")})
    assert reports[0] == reports[1] == reports[2]


def test_bad_inputs_name_file_and_line(rm, tmp_path, capsys):
    row = rm["rows"][0]
    good = json.dumps(row)
    t = ["--chat-template", str(rm["template"])]
    cases = [
        ([good, json.dumps({k: v for k, v in row.items() if k != "subset"})], t,
         ":2: missing key 'subset' (keys present: 'chosen', 'id', 'prompt', 'rejected')"),
        ([good, "{not json"], t, ":2: invalid JSON"),
        ([good, good, json.dumps({**row, "chosen": 3})], t, ":3: 'chosen' must be a string, got int"),
        ([json.dumps({**row, "prompt": ""})], t, ":1: 'prompt' is empty"),
        ([good, json.dumps(row["prompt"])], t, ":2: expected a JSON object, got str"),
        ([good], [], "has no chat template; pass --chat-template FILE.jinja"),
        ([good, json.dumps({**row, "prompt": [{"role": "user", "content": "Hi"}]})],
         ["--chat-template", "none"], ":2: 'prompt' is a message list, which needs a chat"),
        ([good, good], ["--max-length", "12", *t], ":1: chosen: "),
    ]  # fmt: skip
    out = tmp_path / "out.json"
    for i, (lines, flags, message) in enumerate(cases):
        data = tmp_path / f"bad{i}.jsonl"
        data.write_text("\n".join(lines) + "\n")
        assert _run(rm["native"], data, out, *flags) == 1, message
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err, (message, err)
        if message.startswith(":"):
            assert err.startswith(f"error: {data}{message}"), err
        assert not out.exists()
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    other = tmp_path / "rows.csv"
    other.write_text("prompt,chosen\n")
    for path, message in [(empty, "no rows"), (other, "unknown input format '.csv'"),
                          (tmp_path / "missing.jsonl", "input not found")]:  # fmt: skip
        assert _run(rm["native"], path, out, *t) == 1
        assert capsys.readouterr().err == f"error: {path}: {message}" + (
            " (expected prompt, chosen, rejected, subset per row)" if path == empty else
            "; expected .jsonl, .json, .parquet" if path == other else "") + "\n"  # fmt: skip
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"not parquet")
    assert _run(rm["native"], broken, out, *t) == 1
    assert capsys.readouterr().err.startswith(f"error: {broken}: cannot read it as Parquet")
