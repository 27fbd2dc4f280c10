"""A model trained from scratch exports with its run's tokenizer (megatron/ckpt/run_tokenizer.py).

The checkpoint is a tiny random Llama converted to native, with no ``CKPT/hf`` template and a
``config.yml`` whose ``data`` section names a tokenizer directory without ``config.json`` (the
tiny byte-level BPE) and a training dataset known only by its ``PREFIX.meta.json``. Llama's
default token ids (bos 1, eos 2) differ from that tokenizer's (bos = eos = 0, pad 1), so a config
built without the tokenizer would stop generation on the wrong token.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import yaml

from megatron.ckpt.convert import convert_hf_to_native
from megatron.data.formats.chat import template_sha256
from megatron.data.meta import make_meta, write_meta
from megatron.tokenizer import load_tokenizer
from tests.ckpt.hf_models import LLAMA_SIZES, save_random_model
from tests.tools.helpers import load_tool

TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TEXTS = ["The cat sat on the mat.", "<|im_start|>user\nhi<|im_end|>", "Ünïcødé!"]


@pytest.fixture(scope="module")
def scratch(tmp_path_factory, tiny_tokenizer_dir) -> dict[str, Path]:
    """``native`` (TP=1, no hf/), ``tokenizer`` (a copy of the tiny one) and ``template``."""
    from transformers import LlamaConfig

    root = tmp_path_factory.mktemp("scratch")
    hf = save_random_model(LlamaConfig(**{**LLAMA_SIZES, "vocab_size": 512}), root / "hf").dir
    native = root / "native"
    convert_hf_to_native(hf, native)
    shutil.rmtree(native / "hf")  # trained here: no source model to take a template from
    tokenizer = shutil.copytree(tiny_tokenizer_dir, root / "tokenizer")
    assert not (tokenizer / "config.json").exists()
    template = root / "chatml.jinja"
    template.write_text(TEMPLATE, encoding="utf-8")
    return {"native": native, "tokenizer": tokenizer, "template": template}


def _run(scratch, tmp_path, *, data_tokenizer: bool, chat_source: str | None) -> Path:
    """A copy of the checkpoint whose config.yml names the tokenizer (or not) and a training
    dataset whose metadata records the tokenizer and ``chat_source`` (None: ``none``)."""
    ckpt = shutil.copytree(scratch["native"], tmp_path / "ckpt")
    prefix = tmp_path / "data" / "sft_train"
    prefix.parent.mkdir()
    tok = load_tokenizer(scratch["tokenizer"])
    text = None if chat_source is None else scratch["template"].read_text(encoding="utf-8")
    meta = make_meta(
        data_format="sft",
        tokenizer_name=str(scratch["tokenizer"]),
        vocab_size=tok.vocab_size,
        vocab_hash=tok.vocab_hash(),
        dtype="uint16",
        num_documents=0,
        num_tokens=0,
        sources=[],
        chat_template={"source": chat_source or "none", "sha256": template_sha256(text)},
    )
    write_meta(prefix, meta)
    config_path = next(ckpt.glob("iter_*")) / "config.yml"
    config = yaml.safe_load(config_path.read_text())
    config["data"] = {"train": [{"path": str(prefix), "weight": 1.0}], "seq_length": 16}
    if data_tokenizer:
        config["data"]["tokenizer"] = str(scratch["tokenizer"])
    config_path.write_text(yaml.safe_dump(config))
    return ckpt


def _export(ckpt: Path, out: Path, *extra: str) -> int:
    tool = load_tool("tools/ckpts/convert_native_to_hf.py")
    return tool.main(["--ckpt", str(ckpt), "--out", str(out), "--no-progress", *extra])


def test_scratch_model_exports_with_its_tokenizer(scratch, tmp_path, capsys):
    """data.tokenizer (no config.json) is carried; config.json and generation_config.json take
    its token ids; the export loads with AutoTokenizer and AutoModelForCausalLM."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ckpt = _run(scratch, tmp_path, data_tokenizer=True, chat_source=None)
    out = tmp_path / "out"
    assert _export(ckpt, out) == 0
    assert "(data.tokenizer of config.yml)" in capsys.readouterr().out
    source = AutoTokenizer.from_pretrained(scratch["tokenizer"])
    exported = AutoTokenizer.from_pretrained(out)
    assert [exported.encode(t) for t in TEXTS] == [source.encode(t) for t in TEXTS]
    assert exported.chat_template is None  # --chat-template none data: nothing to add
    ids = {"bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 1}
    assert {k: getattr(source, k) for k in ids} == ids
    config = json.loads((out / "config.json").read_text())
    generation = json.loads((out / "generation_config.json").read_text())
    assert {k: config[k] for k in ids} == ids
    assert {k: generation[k] for k in ids} == ids
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.generation_config.eos_token_id == source.eos_token_id


def test_tokenizer_and_chat_template_from_training_metadata(scratch, tmp_path, capsys):
    """Without data.tokenizer the tokenizer named in PREFIX.meta.json is carried, and the chat
    template file the data was rendered with (found by its recorded sha256) is written in."""
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(scratch["tokenizer"]).chat_template is None
    ckpt = _run(scratch, tmp_path, data_tokenizer=False, chat_source=str(scratch["template"]))
    out = tmp_path / "out"
    assert _export(ckpt, out) == 0
    assert "(the training data's PREFIX.meta.json)" in capsys.readouterr().out
    exported = AutoTokenizer.from_pretrained(out)
    assert exported.chat_template == TEMPLATE
    assert (out / "chat_template.jinja").read_text(encoding="utf-8") == TEMPLATE
    assert json.loads((out / "tokenizer_config.json").read_text())["chat_template"] == TEMPLATE
    assert exported.encode(TEXTS[0]) == load_tokenizer(scratch["tokenizer"]).encode(TEXTS[0])
    assert json.loads((out / "config.json").read_text())["eos_token_id"] == 0


def test_lost_chat_template_warns_and_chat_template_flag_writes_it(scratch, tmp_path, caplog):
    """A recorded template that no file holds any more cannot be recovered: a warning names
    --chat-template FILE, and that flag writes the template in."""
    from transformers import AutoTokenizer

    moved = tmp_path / "moved.jinja"
    shutil.copy(scratch["template"], moved)
    ckpt = _run(scratch, tmp_path, data_tokenizer=True, chat_source=str(tmp_path / "gone.jinja"))
    with caplog.at_level(logging.WARNING, logger="megatron.ckpt.run_tokenizer"):
        assert _export(ckpt, tmp_path / "lost") == 0
    assert "sha256" in caplog.text and "Pass --chat-template FILE" in caplog.text
    assert AutoTokenizer.from_pretrained(tmp_path / "lost").chat_template is None
    assert _export(ckpt, tmp_path / "given", "--chat-template", str(moved)) == 0
    assert AutoTokenizer.from_pretrained(tmp_path / "given").chat_template == TEMPLATE


def test_no_tokenizer_warns_and_exports_the_weights(scratch, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    ckpt = _run(scratch, tmp_path, data_tokenizer=False, chat_source=None)
    next(tmp_path.glob("data/*.meta.json")).unlink()
    out = tmp_path / "out"
    assert _export(ckpt, out) == 0
    err = capsys.readouterr().err
    assert "warning: no tokenizer found" in err and "pass --tokenizer DIR" in err
    assert not (out / "tokenizer.json").exists()
    AutoModelForCausalLM.from_pretrained(out)
    assert _export(ckpt, tmp_path / "flag", "--tokenizer", str(scratch["tokenizer"])) == 0
    assert (tmp_path / "flag" / "tokenizer.json").read_bytes() == (
        scratch["tokenizer"] / "tokenizer.json"
    ).read_bytes()
    assert _export(ckpt, tmp_path / "bad", "--tokenizer", str(tmp_path / "data")) == 1
    assert "not a tokenizer directory" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
