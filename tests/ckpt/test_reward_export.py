"""Reward models through the converters and ``tools/score.py``.

A tiny random ``*ForSequenceClassification`` (``num_labels: 1``) per architecture (Llama with
Llama-3 rope scaling, Mistral with a sliding window of 8, Qwen2 with tied embeddings, GPT-NeoX with
parallel residual) converts to a native ``model.head: value`` checkpoint whose value at each
sequence's last token equals transformers' pooled logits (3 right-padded rows of 13, 9 and 5
tokens with an attention mask), from TP = 1 and TP = 2 shards and in a real TP = 2 group; the way
back gives identical tensors and logits. ``tools/score.py`` gives the same scores from a native
checkpoint and from its export, tokenizes rows as pairwise preprocessing does, and names the
file:line of a bad row.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from megatron.ckpt import ConversionError
from megatron.ckpt.convert import convert_hf_to_native, convert_native_to_hf, reward_pad_token_id
from megatron.ckpt.hf_config import model_config_from_section
from megatron.ckpt.layout import resolve_checkpoint
from megatron.ckpt.native import load_tp_shard, read_model_shards
from megatron.model.gpt import GPTModel
from megatron.parallel.state import ParallelState
from tests.ckpt.hf_models import hf_config, load_hf_tensors, save_random_classifier
from tests.dist_pool import DistPool
from tests.tools.helpers import checkpoint_config, load_tool

TOL = 1e-5
PAD = 1  # the tiny tokenizer's <|pad|>; never drawn in the test sequences
LENGTHS = (13, 9, 5)
CASES = {"llama": "llama3", "mistral": "mistral_window", "qwen2": "qwen2_tied", "gpt_neox": "neox_parallel"}  # fmt: skip
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _batch(vocab: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(tokens [3, 13] right-padded with PAD, lengths [3])``."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.full((len(LENGTHS), max(LENGTHS)), PAD, dtype=torch.int64)
    for i, n in enumerate(LENGTHS):
        tokens[i, :n] = torch.randint(2, vocab, (n,), generator=g)
    return tokens, torch.tensor(LENGTHS)


@pytest.fixture(scope="module")
def rms(tmp_path_factory) -> dict[str, dict]:
    """Per architecture: the HF dir, its state dict, a batch, HF's scores, TP=1/2 conversions."""
    root = tmp_path_factory.mktemp("rm")
    out = {}
    for i, (arch, case) in enumerate(CASES.items()):
        cfg = hf_config(case, num_labels=1, pad_token_id=PAD)
        model = save_random_classifier(cfg, root / arch / "hf", seed=i)
        tokens, lengths = _batch(cfg.vocab_size, seed=i)
        mask = (torch.arange(tokens.shape[1])[None] < lengths[:, None]).long()
        with torch.no_grad():
            logits = model(tokens, attention_mask=mask).logits.squeeze(-1)  # [3]
        sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
        native = {}
        for tp in (1, 2):
            native[tp] = root / arch / f"tp{tp}"
            convert_hf_to_native(root / arch / "hf", native[tp], tp_size=tp)
        out[arch] = dict(hf=root / arch / "hf", sd=sd, tokens=tokens, lengths=lengths,
                         logits=logits, native=native)  # fmt: skip
    return out


def _native_scores(ckpt: Path, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    args = model_config_from_section(checkpoint_config(ckpt)["model"], 1)
    model = GPTModel(args, ParallelState.single()).eval()
    model.load_state_dict(load_tp_shard(ckpt / "iter_0000000", args, 1, 0), strict=True)
    with torch.no_grad():
        values = model(tokens, None, torch.zeros_like(tokens))["values"]  # [b, s]
    return values[torch.arange(len(lengths)), lengths - 1]


@pytest.mark.parametrize("tp", [1, 2])
@pytest.mark.parametrize("arch", list(CASES))
def test_hf_to_native_scores_match_hf(arch, tp, rms):
    rm = rms[arch]
    ckpt = rm["native"][tp]
    section = checkpoint_config(ckpt)["model"]
    assert section["head"] == "value"
    assert yaml.safe_load((ckpt / "model.yml").read_text())["model"]["head"] == "value"
    shards = read_model_shards(ckpt / "iter_0000000")
    assert len(shards) == tp
    for sd in shards:
        assert "value_head.weight" in sd and "lm_head.weight" not in sd
        assert torch.equal(sd["value_head.weight"], rm["sd"]["score.weight"])  # replicated
    scores = _native_scores(ckpt, rm["tokens"], rm["lengths"])
    diff = (scores - rm["logits"]).abs().max().item()
    print(f"reward parity {arch} (TP={tp} shards): max|diff| = {diff:.2e}")
    assert diff <= TOL


@pytest.mark.parametrize("arch", list(CASES))
def test_native_to_hf_round_trip_is_exact(arch, rms, tmp_path):
    rm = rms[arch]
    ckpt = rm["native"][2]
    out = convert_native_to_hf(
        ckpt, tmp_path / "hf", config=checkpoint_config(ckpt), extras_dir=ckpt / "hf"
    )
    back = load_hf_tensors(out)
    assert back.keys() == rm["sd"].keys() and "lm_head.weight" not in back
    assert all(torch.equal(back[k], t) for k, t in rm["sd"].items())
    cfg = json.loads((out / "config.json").read_text())
    cls = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "gpt_neox": "GPTNeoX"}[arch]
    assert cfg["architectures"] == [f"{cls}ForSequenceClassification"]
    assert (cfg["id2label"], cfg["pad_token_id"]) == ({"0": "LABEL_0"}, PAD)
    assert not (out / "generation_config.json").exists()
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(out, attn_implementation="eager")
    mask = (torch.arange(rm["tokens"].shape[1])[None] < rm["lengths"][:, None]).long()
    with torch.no_grad():
        logits = model.eval()(rm["tokens"], attention_mask=mask).logits.squeeze(-1)
    assert torch.equal(logits, rm["logits"])
    # and back again: the export converts to the same native shards
    again = tmp_path / "again"
    convert_hf_to_native(out, again, tp_size=2)
    for a, b in zip(read_model_shards(again / "iter_0000000"),
                    read_model_shards(ckpt / "iter_0000000"), strict=True):  # fmt: skip
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _tp2_scores(rank: int, world: int, items: list) -> dict[str, float]:
    """One rank of a TP=2 group: each case's TP=2 shard in a TP=2 GPTModel; max |diff|."""
    torch.set_num_threads(1)
    state = ParallelState.build(world)
    diffs = {}
    for arch, ckpt, tokens, lengths, expected in items:
        args = model_config_from_section(checkpoint_config(Path(ckpt))["model"], world)
        model = GPTModel(args, state).eval()
        sd = load_tp_shard(Path(ckpt) / "iter_0000000", args, world, state.tp_rank)
        model.load_state_dict(sd, strict=True)
        with torch.no_grad():
            values = model(tokens, None, torch.zeros_like(tokens))["values"]
        scores = values[torch.arange(len(lengths)), lengths - 1]
        diffs[arch] = (scores - expected).abs().max().item()
    return diffs


@pytest.mark.slow
def test_tp2_group_scores_match_hf(rms):
    pool = DistPool(2)
    try:
        items = [
            (a, str(r["native"][2]), r["tokens"], r["lengths"], r["logits"]) for a, r in rms.items()
        ]
        per_rank = pool.run(_tp2_scores, items)
    finally:
        pool.close()
    for rank, diffs in enumerate(per_rank):
        for arch, diff in diffs.items():
            print(f"reward parity {arch} (TP=2 group, rank {rank}): max|diff| = {diff:.2e}")
            assert diff <= TOL, (arch, rank, diff)


def test_reward_conversion_errors(rms, tmp_path):
    src = rms["mistral"]["hf"]
    three = shutil.copytree(src, tmp_path / "three")
    cfg = json.loads((three / "config.json").read_text())
    cfg["id2label"] = {str(i): f"LABEL_{i}" for i in range(3)}
    (three / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConversionError, match="MistralForSequenceClassification with num_labels 3"):
        convert_hf_to_native(three, tmp_path / "o1")
    ckpt = rms["mistral"]["native"][1]
    with pytest.raises(ConversionError, match=r"--pad-token-id: pad token id 300 is not in"):
        convert_native_to_hf(
            ckpt, tmp_path / "o3", config=checkpoint_config(ckpt), pad_token_id=300
        )
    assert not any((tmp_path / f"o{i}").exists() for i in (1, 3))


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_pipeline_layout_holds_the_value_head(arch, rms, tmp_path):
    """A PP=2 conversion writes the value head in the last stage's layer file (``value.weight``)
    and reads back (and exports) exactly like the non-pipeline checkpoint."""
    from megatron.ckpt.native import is_pipeline_checkpoint, read_model_shard

    out = tmp_path / "pp2"
    convert_hf_to_native(rms[arch]["hf"], out, tp_size=2, pp_size=2)
    root, tag = resolve_checkpoint(out)
    assert is_pipeline_checkpoint(root / tag)
    flat_root, flat_tag = resolve_checkpoint(rms[arch]["native"][2])
    for rank in (0, 1):
        piped, flat = (
            read_model_shard(root / tag, rank),
            read_model_shard(flat_root / flat_tag, rank),
        )
        assert sorted(piped) == sorted(flat) and "value_head.weight" in piped
        assert all(torch.equal(piped[k], flat[k]) for k in flat)
    convert_native_to_hf(out, tmp_path / "hf", config=checkpoint_config(out))
    back = load_file_weights(tmp_path / "hf")
    assert torch.equal(back["score.weight"], rms[arch]["sd"]["score.weight"])


def load_file_weights(hf_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for f in sorted(hf_dir.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def test_pad_token_id_sources(tiny_tokenizer_dir, caplog):
    """--pad-token-id > the tokenizer's pad token > the template's; pad == EOS warns."""
    template = {"pad_token_id": 7, "eos_token_id": 5}
    with caplog.at_level(logging.WARNING, logger="megatron.ckpt.convert"):
        assert reward_pad_token_id(3, tiny_tokenizer_dir, template, 512) == 3
        assert reward_pad_token_id(None, tiny_tokenizer_dir, template, 512) == 1  # <|pad|>
        assert reward_pad_token_id(None, None, template, 512) == 7
        assert not caplog.records
        assert reward_pad_token_id(None, None, {}, 512) is None
        assert "no pad token id" in caplog.text
        caplog.clear()
        assert reward_pad_token_id(0, tiny_tokenizer_dir, None, 512) == 0  # <|endoftext|>
        assert "pad_token_id 0 (from --pad-token-id) is an EOS id" in caplog.text


# ---- tools/score.py -----------------------------------------------------------------------------
ROWS = [
    {"messages": [{"role": "user", "content": "Where is the cat?"},
                  {"role": "assistant", "content": "On the mat."}], "id": 0},
    {"messages": [{"role": "system", "content": "Be brief."},
                  {"role": "user", "content": "Hi"},
                  {"role": "assistant", "content": "Hello there, friend."},
                  {"role": "user", "content": "Bye"},
                  {"role": "assistant", "content": "Goodbye!"}]},
    {"messages": [{"role": "user", "content": "Only a question?"}]},
    {"prompt": "The quick brown fox", "completion": " jumps over the lazy dog."},
    {"prompt": "Why?", "completion": " Because.<|endoftext|>"},
    {"prompt": [{"role": "user", "content": "Name a colour."}],
     "completion": [{"role": "assistant", "content": "Blue."}]},
]  # fmt: skip


@pytest.fixture(scope="module")
def scored(rms, tiny_tokenizer_dir, tmp_path_factory) -> dict[str, Path]:
    """The Llama reward model (vocab 512) with the tiny tokenizer: native TP=2 and its export."""
    root = tmp_path_factory.mktemp("score")
    hf = shutil.copytree(rms["llama"]["hf"], root / "src")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(tiny_tokenizer_dir / name, hf / name)
    native = root / "native"
    convert_hf_to_native(hf, native, tp_size=2)
    export = convert_native_to_hf(native, root / "export", config=checkpoint_config(native),
                                  extras_dir=native / "hf")  # fmt: skip
    template = root / "chatml.jinja"
    template.write_text(CHATML)
    data = root / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return {"native": native, "export": export, "template": template, "data": data, "root": root}


def _score(model: Path, data: Path, out: Path, *extra: str) -> int:
    argv = ["--model", str(model), "--input", str(data), "--output", str(out), *extra]
    return load_tool("tools/score.py").main(argv)


def test_score_native_equals_export(scored, tmp_path):
    template = ["--chat-template", str(scored["template"]), "--batch-size", "4"]
    assert _score(scored["native"], scored["data"], tmp_path / "n.jsonl", *template) == 0
    assert _score(scored["export"], scored["data"], tmp_path / "h.jsonl", *template) == 0
    native = [json.loads(x) for x in (tmp_path / "n.jsonl").read_text().splitlines()]
    hf = [json.loads(x) for x in (tmp_path / "h.jsonl").read_text().splitlines()]
    assert [{k: v for k, v in r.items() if k != "score"} for r in native] == ROWS
    diff = max(abs(a["score"] - b["score"]) for a, b in zip(native, hf, strict=True))
    print(f"tools/score.py native vs HF export: max|diff| = {diff:.2e}")
    assert diff <= TOL
    assert len({round(r["score"], 6) for r in native}) == len(ROWS)  # the rows differ
    # one row alone through transformers' own pooling (pad id 1 never ends a row) agrees too
    from transformers import AutoModelForSequenceClassification

    from megatron.scoring import RowEncoder
    from megatron.tokenizer import load_tokenizer

    encoder = RowEncoder(load_tokenizer(scored["export"]), str(scored["template"]))
    model = AutoModelForSequenceClassification.from_pretrained(scored["export"]).eval()
    for row, want in zip(ROWS, hf, strict=True):
        with torch.no_grad():
            logit = model(torch.tensor([encoder.encode(row)])).logits.item()
        assert abs(logit - want["score"]) <= TOL


def test_score_tokens_match_pairwise_preprocessing(scored):
    """A scored row's tokens are a pairwise row's prompt + chosen, as preprocessing writes them."""
    from megatron.data.formats import FORMATS, EncodeContext
    from megatron.data.preprocess import PreprocessOptions
    from megatron.scoring import RowEncoder
    from megatron.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(scored["native"] / "hf")
    template = str(scored["template"])
    encoder = RowEncoder(tokenizer, template)
    ctx = EncodeContext(
        tokenizer, PreprocessOptions(data_format="pairwise", chat_template=template)
    )
    fmt = FORMATS["pairwise"]
    for row in (ROWS[0], ROWS[1], ROWS[3], ROWS[4], ROWS[5]):
        if "messages" in row:
            pair = {"chosen": row["messages"], "rejected": [*row["messages"][:-1],
                    {"role": "assistant", "content": "Something else."}]}  # fmt: skip
        else:
            pair = {"prompt": row["prompt"], "chosen": row["completion"]}
            other = " no." if isinstance(row["completion"], str) else [
                {"role": "assistant", "content": "No."}]  # fmt: skip
            pair["rejected"] = other
        (enc,) = fmt.encode(fmt.extract(pair, ctx.options), ctx)
        want = [*enc.arrays["prompt"].tolist(), *enc.arrays["chosen"].tolist()]
        assert encoder.encode(row) == want, row
    assert encoder.encode(ROWS[3])[-1] == tokenizer.eos_id  # EOS appended, as in training


def test_score_bad_rows_name_the_line(scored, tmp_path, capsys):
    out = tmp_path / "out.jsonl"
    template = ["--chat-template", str(scored["template"])]
    cases = [
        ([json.dumps(ROWS[3]), "{not json"], [], ":2: invalid JSON"),
        ([json.dumps(ROWS[3]), json.dumps({"text": "x"})], [],
         ":2: missing key 'messages' (or 'prompt' and 'completion'); keys present: 'text'"),
        ([json.dumps({"prompt": "a", "completion": 3})], [], ":1: 'completion' must be a string"),
        ([json.dumps(ROWS[0])], ["--chat-template", "none"], ":1: conversational rows need a chat template"),
        ([json.dumps(ROWS[4]), json.dumps(ROWS[1])], ["--max-length", "20", *template],
         re.compile(r":2: 77 tokens \(prompt \d+ \+ completion \d+\) > --max-length 20")),
    ]  # fmt: skip
    for i, (lines, extra, message) in enumerate(cases):
        data = tmp_path / f"bad{i}.jsonl"
        data.write_text("\n".join(lines) + "\n")
        assert _score(scored["native"], data, out, *extra) == 1
        err = capsys.readouterr().err
        assert err.startswith(f"error: {data}:"), err
        assert (message in err) if isinstance(message, str) else message.search(err), err
        assert not out.exists()
    data = tmp_path / "long.jsonl"
    data.write_text(json.dumps(ROWS[1]) + "\n")
    assert _score(scored["native"], data, out, *template) == 0
    whole = json.loads(out.read_text())["score"]
    assert _score(scored["native"], data, out, "--max-length", "20", "--truncate", *template) == 0
    assert json.loads(out.read_text())["score"] != whole  # scored on the prompt's last tokens
    assert _score(scored["root"], data, out) == 1
    assert "neither a Hugging Face model directory" in capsys.readouterr().err
