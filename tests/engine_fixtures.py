"""A tiny random-weight llama with forkdec.models' interface, a byte-level
tokenizer, and a plain decoder that uses no cache at all (the ground truth
for the engine's prefix sharing)."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

BOS, EOS, IM_START = 256, 257, 258
SPECIAL = {"<|endoftext|>": BOS, "<|im_end|>": EOS, "<|im_start|>": IM_START}


@dataclass
class TinyConfig:
    vocab_size: int = 272
    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 32
    intermediate_size: int = 192
    max_position_embeddings: int = 512
    rope_theta: float = 10000.0
    eos_token_ids: tuple[int, ...] = (EOS,)


class ByteTokenizer:
    """UTF-8 bytes are ids 0-255; three ChatML-style special tokens after them."""
    eos_token_ids = (EOS,)
    bos_token_id = BOS

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        ids = [BOS] if add_bos else []
        i = 0
        while i < len(text):
            for name, tid in SPECIAL.items():
                if text.startswith(name, i):
                    ids.append(tid)
                    i += len(name)
                    break
            else:
                ids += list(text[i].encode())
                i += 1
        return ids

    def decode(self, ids: list[int], skip_special: bool = True) -> str:
        names = {v: k for k, v in SPECIAL.items()}
        out, buf = [], bytearray()
        for t in ids:
            if t < 256:
                buf.append(t)
                continue
            out.append(buf.decode(errors="replace"))
            buf = bytearray()
            if not skip_special:
                out.append(names.get(t, f"<|{t}|>"))
        out.append(buf.decode(errors="replace"))
        return "".join(out)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
        return text + ("<|im_start|>assistant\n" if add_generation_prompt else "")


def _rms(x: Tensor, w: Tensor) -> Tensor:
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-5)).to(x.dtype) * w


def _rope(x: Tensor, positions: Tensor, theta: float) -> Tensor:
    d = x.shape[-1]
    inv = theta ** (-torch.arange(0, d, 2, dtype=torch.float32) / d)
    ang = positions.float()[:, None] * inv[None]
    cos, sin = ang.cos()[:, None, :], ang.sin()[:, None, :]
    x1, x2 = x.float()[..., : d // 2], x.float()[..., d // 2:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


class TinyLlama:
    """Random weights (seeded); forward(tokens [T], positions [T], attend, logits_rows) -> fp32 logits."""

    def __init__(self, config: TinyConfig | None = None, seed: int = 0, dtype: torch.dtype = torch.float32,
                 eos_bias: float = 0.0) -> None:
        self.config = c = config or TinyConfig()
        self.dtype = dtype
        g = torch.Generator().manual_seed(seed)

        def w(*shape, scale=None):
            return (torch.randn(*shape, generator=g) * (scale or 1 / math.sqrt(shape[-1]))).to(dtype)

        h, q, kv = c.hidden_size, c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
        self.embed = w(c.vocab_size, h, scale=1.0)
        self.layers = [dict(n1=torch.ones(h, dtype=dtype), n2=torch.ones(h, dtype=dtype), wq=w(q, h), wk=w(kv, h),
                            wv=w(kv, h), wo=w(h, q), wg=w(c.intermediate_size, h), wu=w(c.intermediate_size, h),
                            wd=w(h, c.intermediate_size)) for _ in range(c.num_layers)]
        self.norm = torch.ones(h, dtype=dtype)
        self.head = w(c.vocab_size, h, scale=1.0)  # untied: a tied head makes every token predict itself
        self.eos_bias = eos_bias  # makes EOS likelier, so sampled paths end at different steps
        self.calls: list[int] = []  # tokens per forward call, for tests that count compute

    def forward(self, tokens: Tensor, positions: Tensor, attend, logits_rows=None) -> Tensor:
        c = self.config
        self.calls.append(int(tokens.numel()))
        x = self.embed[tokens]
        t = tokens.numel()
        for i, L in enumerate(self.layers):
            y = _rms(x, L["n1"])
            q = _rope((y @ L["wq"].T).view(t, c.num_heads, c.head_dim), positions, c.rope_theta)
            k = _rope((y @ L["wk"].T).view(t, c.num_kv_heads, c.head_dim), positions, c.rope_theta)
            v = (y @ L["wv"].T).view(t, c.num_kv_heads, c.head_dim)
            x = x + attend(i, q, k, v).reshape(t, -1).to(self.dtype) @ L["wo"].T
            y = _rms(x, L["n2"])
            x = x + (torch.nn.functional.silu(y @ L["wg"].T) * (y @ L["wu"].T)) @ L["wd"].T
        if logits_rows is not None:
            x = x[logits_rows]
        # Scaled so logits have unit spread: sampling at temperature 1 is varied, and an EOS bias of a few units matters.
        logits = (_rms(x, self.norm) @ self.head.T).float() / math.sqrt(c.hidden_size)
        logits[:, EOS] += self.eos_bias
        return logits


def dense_causal_attend(layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Attention over exactly the given tokens, causal, no cache: the ground truth."""
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    out = torch.nn.functional.scaled_dot_product_attention(
        q.float().transpose(0, 1), k.float().transpose(0, 1), v.float().transpose(0, 1), is_causal=True)
    return out.transpose(0, 1).to(q.dtype)


def greedy_no_cache(model, prompt_ids: list[int], max_new_tokens: int, stop_ids: set[int]) -> list[int]:
    """Greedy decoding of one path, re-running the whole sequence every step."""
    ids = list(prompt_ids)
    out: list[int] = []
    with torch.inference_mode():
        for _ in range(max_new_tokens):
            t = torch.tensor(ids, dtype=torch.int64)
            logits = model.forward(t, torch.arange(len(ids)), dense_causal_attend, logits_rows=torch.tensor([len(ids) - 1]))
            tok = int(logits[0].argmax())
            out.append(tok)
            ids.append(tok)
            if tok in stop_ids:
                break
    return out
