"""Tokenizer: byte-level BPE from GGUF metadata or a Hugging Face tokenizer.json, plus chat templates.

Encoding and decoding run in the `tokenizers` library; chat templates are
rendered with jinja2 the way Hugging Face renders them.
"""
from __future__ import annotations

import datetime
import json
import os
from typing import Any

# GGUF token types (llama.cpp's llama_token_type).
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6


class Tokenizer:
    """Text <-> token ids for a model, with its chat template.

    encode(text, add_bos=False) -> list[int]; decode(ids, skip_special=True) -> str;
    apply_chat_template(messages, add_generation_prompt=True) -> str.
    Special tokens written in the text (e.g. "<|im_start|>") encode to their ids.
    """

    def __init__(self, backend: Any, *, bos_token_id: int | None, eos_token_ids: list[int],
                 chat_template: str | None, bos_token: str | None = None, eos_token: str | None = None) -> None:
        self._tok = backend
        self.bos_token_id = bos_token_id
        self.eos_token_ids = list(eos_token_ids)
        self.chat_template = chat_template
        self.bos_token = bos_token
        self.eos_token = eos_token
        self._template = None

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        if not isinstance(text, str):
            raise ValueError(f"text: expected str, got {type(text).__name__}")
        ids = self._tok.encode(text, add_special_tokens=False).ids
        if add_bos:
            if self.bos_token_id is None:
                raise ValueError("add_bos: this tokenizer has no BOS token")
            ids = [self.bos_token_id] + ids
        return ids

    def decode(self, ids: list[int], skip_special: bool = True) -> str:
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"ids: {bad[0]} is outside the vocabulary [0, {self.vocab_size})")
        return self._tok.decode(ids, skip_special_tokens=skip_special)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, **variables: Any) -> str:
        """The conversation rendered with the model's chat template (jinja2, as transformers does).
        `variables` reach the template too (e.g. tools=..., for templates that use them)."""
        if self.chat_template is None:
            raise ValueError("messages: this model has no chat template")
        if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
            raise ValueError("messages: expected a list of {'role': ..., 'content': ...} dicts")
        if self._template is None:
            self._template = _compile_template(self.chat_template)
        context = {"bos_token": self.bos_token or "", "eos_token": self.eos_token or "", **variables}
        return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt, **context)

    def save(self, path: str) -> None:
        """Write tokenizer.json and tokenizer_config.json (with the chat template) into the
        directory `path`, readable by `from_hf_dir` and by transformers' AutoTokenizer."""
        os.makedirs(path, exist_ok=True)
        self._tok.save(os.path.join(path, "tokenizer.json"))
        cfg = {"bos_token": self.bos_token, "eos_token": self.eos_token, "chat_template": self.chat_template,
               "add_bos_token": False, "tokenizer_class": "PreTrainedTokenizerFast"}
        with open(os.path.join(path, "tokenizer_config.json"), "w", encoding="utf-8") as f:
            json.dump({k: v for k, v in cfg.items() if v is not None}, f, ensure_ascii=False, indent=1)

    # ---- construction ----

    @classmethod
    def from_gguf(cls, reader: Any) -> "Tokenizer":
        """From a GGUF file's `tokenizer.ggml.*` metadata (GPT-2 byte-level BPE).
        `reader`: a path or an already opened `gguf_loader.open_gguf(path)`."""
        from tokenizers import AddedToken, decoders, models, pre_tokenizers
        from tokenizers import Tokenizer as Backend

        from forkdec.models.gguf_loader import field, open_gguf

        if isinstance(reader, (str, os.PathLike)):
            reader = open_gguf(os.fspath(reader))
        kind = field(reader, "tokenizer.ggml.model")
        if kind != "gpt2":
            raise ValueError(f"model: tokenizer type {kind!r} is not supported (only GPT-2 byte-level BPE, 'gpt2')")
        tokens = list(field(reader, "tokenizer.ggml.tokens"))
        merges = [tuple(m.split(" ", 1)) for m in field(reader, "tokenizer.ggml.merges", [])]
        types = list(field(reader, "tokenizer.ggml.token_type", [_NORMAL] * len(tokens)))
        vocab = {t: i for i, t in enumerate(tokens)}
        backend = Backend(models.BPE(vocab, merges, fuse_unk=False, byte_fallback=False))
        backend.pre_tokenizer = _pre_tokenizer(field(reader, "tokenizer.ggml.pre"), pre_tokenizers)
        backend.decoder = decoders.ByteLevel()
        special = [AddedToken(t, special=True, normalized=False)
                   for t, ty in zip(tokens, types) if ty in (_CONTROL, _USER_DEFINED)]
        backend.add_special_tokens(special)
        bos = field(reader, "tokenizer.ggml.bos_token_id")
        eos_ids = []
        for key in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id"):
            v = field(reader, key)
            if v is not None and int(v) not in eos_ids:
                eos_ids.append(int(v))
        return cls(backend, bos_token_id=None if bos is None else int(bos), eos_token_ids=eos_ids,
                   chat_template=field(reader, "tokenizer.chat_template"),
                   bos_token=None if bos is None else tokens[int(bos)],
                   eos_token=tokens[eos_ids[0]] if eos_ids else None)

    @classmethod
    def from_hf_dir(cls, path: str) -> "Tokenizer":
        """From a Hugging Face directory's tokenizer.json (+ tokenizer_config.json, config.json)."""
        from tokenizers import Tokenizer as Backend

        file = os.path.join(path, "tokenizer.json")
        if not os.path.isfile(file):
            raise ValueError(f"model: {path!r} has no tokenizer.json")
        backend = Backend.from_file(file)
        cfg = _read_json(os.path.join(path, "tokenizer_config.json"))
        model_cfg = _read_json(os.path.join(path, "config.json"))
        template = cfg.get("chat_template")
        jinja = os.path.join(path, "chat_template.jinja")
        if template is None and os.path.isfile(jinja):
            with open(jinja, encoding="utf-8") as f:
                template = f.read()
        bos_token, eos_token = _token_text(cfg.get("bos_token")), _token_text(cfg.get("eos_token"))
        bos = backend.token_to_id(bos_token) if bos_token else model_cfg.get("bos_token_id")
        eos = model_cfg.get("eos_token_id")
        eos_ids = [] if eos is None else [int(e) for e in (eos if isinstance(eos, list) else [eos])]
        if eos_token and backend.token_to_id(eos_token) is not None and backend.token_to_id(eos_token) not in eos_ids:
            eos_ids.append(backend.token_to_id(eos_token))
        return cls(backend, bos_token_id=bos, eos_token_ids=eos_ids, chat_template=template,
                   bos_token=bos_token, eos_token=eos_token)


# Split patterns of the pre-tokenizers llama.cpp names in `tokenizer.ggml.pre` (the
# patterns of the models' own tokenizer.json files). Llama 3 groups digits by three,
# Qwen2 isolates each digit; both then map bytes without GPT-2's pattern.
_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
           r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
          r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_SPLITS = {"llama3": _LLAMA3, "llama-v3": _LLAMA3, "llama-bpe": _LLAMA3, "smaug-bpe": _LLAMA3,
           "falcon3": _LLAMA3, "dbrx": _LLAMA3, "qwen2": _QWEN2, "deepseek-r1-qwen": _QWEN2}
# GPT-2's pattern after splitting every digit alone (SmolLM's and StarCoder's tokenizer.json).
_DIGITS_THEN_GPT2 = ("smollm", "starcoder", "refact")


def _pre_tokenizer(pre: str | None, pre_tokenizers: Any) -> Any:
    from tokenizers import Regex

    if pre in _SPLITS:
        return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(_SPLITS[pre]), behavior="isolated"),
                                        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in _DIGITS_THEN_GPT2:
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    return byte_level  # "gpt2", "default" and names this table does not know: GPT-2's pattern


def _token_text(token: Any) -> str | None:
    if isinstance(token, dict):
        return token.get("content")
    return token


def _read_json(file: str) -> dict:
    if not os.path.isfile(file):
        return {}
    with open(file, encoding="utf-8") as f:
        return json.load(f)


def _compile_template(source: str) -> Any:
    """A jinja2 template in the sandbox and with the helpers transformers gives chat templates."""
    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = lambda x, indent=None: json.dumps(x, ensure_ascii=False, indent=indent)
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)  # Llama 3.x templates
    return env.from_string(source)
