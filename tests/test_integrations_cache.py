"""forkdec's quantized cache kinds as transformers Cache classes (forkdec.integrations.transformers_cache).

The requirement: perplexity through `model(ids, past_key_values=forkdec_cache(model, kind))`
equals forkdec.eval.perplexity of the same kind on the same tokens (same windows and chunks).
On tiny random checkpoints (loaded by transformers and, from the same files, by forkdec) the
XQuant kinds agree to 1e-5 relative in fp32 (measured <= 4e-7) while the quantization itself
moves PPL by far more. KIVI kinds agree to 2e-4 (measured 1e-6 at 4 bits, 1e-4 at 2 bits): forkdec's
QuantizedKVCache attends over its fp16 window with q cast to fp16 (cache/quantized.py, kivi branch of
_attend_part); with that cast removed the two agree to 2e-7 (checked by hand). The default model
(SmolLM2-135M, transformers loading the GGUF) is in test_integrations_cache_model.py.
"""
from __future__ import annotations

import math

import pytest
import torch

from cache_fixtures import hf_perplexity, tiny_checkpoint
from forkdec.integrations.quantized_stream import QuantizedStream
from forkdec.xquant.accounting import bytes_held
from forkdec.xquant.quantize import dequantize, quantize
from integrations_fixtures import NEEDS_TRANSFORMERS, tiny_hf

pytestmark = NEEDS_TRANSFORMERS

KINDS = ["kivi-4-r64", "kivi-2-g32-r0", "xquant-4-r64", "xquant-3-g32-r0", "xquant-latent-4-g32-r0",
         "xquant-latent-3-k32-g32-r64"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("ckpt"))


@pytest.fixture(scope="module")
def ids():
    torch.manual_seed(1)
    return torch.randint(0, 96, (512,)).tolist()


def forkdec_ppl(model, ids, kv, chunk):
    from forkdec.eval import perplexity
    return perplexity(model, ids, kv, window=256, chunk=chunk, windows=2).ppl


@pytest.mark.parametrize("kv", KINDS)
@pytest.mark.parametrize("chunk", [40, 128])
def test_ppl_equals_forkdec_eval_on_the_same_checkpoint(tiny, ids, kv, chunk):
    hf, own = tiny
    want = forkdec_ppl(own, ids, kv, chunk)
    got = hf_perplexity(hf, ids, kv, window=256, chunk=chunk, windows=2)
    assert got == pytest.approx(want, rel=2e-4 if kv.startswith("kivi") else 1e-5)
    # not vacuous: the quantized pages move PPL far more than the tolerance
    assert abs(want / forkdec_ppl(own, ids, "fp32", chunk) - 1) > 1e-3


# ---- the stream: flush rule and storage ---------------------------------------------------------
def test_stream_flushes_whole_pages_and_reads_what_forkdec_pages_hold():
    torch.manual_seed(0)
    s = QuantizedStream(96, 4, 32, "channel", page_size=64, residual=64, window_dtype=torch.float16)
    x = torch.randn(2, 300, 96) * torch.linspace(0.1, 5, 96)
    lens = []
    for start in range(0, 300, 50):
        s.append(x[:, start:start + 50])
        s.flush()
        lens.append((s.quantized_len, s.window.shape[1]))
    # window >= residual + page -> flush the oldest pages; afterwards 64 <= window < 128
    assert lens == [(0, 50), (0, 100), (64, 86), (128, 72), (128, 122), (192, 108)]
    got = s.read()
    xh = x.half().float()
    for b in range(2):
        for page in range(3):
            rows = slice(64 * page, 64 * page + 64)
            want = dequantize(quantize(xh[b, rows], 4, 32, "channel"))
            torch.testing.assert_close(got[b, rows], want, rtol=0, atol=0)
    torch.testing.assert_close(got[:, 192:], xh[:, 192:], rtol=0, atol=0)
    assert not torch.equal(got[:, :192], xh[:, :192])
    assert s.nbytes() == 2 * (192 * 96 // 2 + 4 * 192 * 96 // 32 + 108 * 96 * 2)


def test_stream_token_axis_and_row_selection():
    torch.manual_seed(0)
    s = QuantizedStream(64, 3, 32, "token", page_size=64, residual=0, window_dtype=torch.bfloat16)
    x = torch.randn(3, 130, 64)
    s.append(x)
    s.flush()
    assert (s.quantized_len, s.window.shape[1]) == (128, 2)
    full = s.read()
    s.select_rows(torch.tensor([2, 0, 0]))
    torch.testing.assert_close(s.read(), full[[2, 0, 0]], rtol=0, atol=0)
    torch.testing.assert_close(full[1, :64], dequantize(quantize(x[1, :64].bfloat16().float(), 3, 32, "token")),
                               rtol=0, atol=0)


@pytest.mark.parametrize("kv", ["kivi-4-r64", "xquant-latent-4-g32-r64", "xquant-4-r0"])
def test_nbytes_equals_forkdec_accounting(tiny, kv):
    from forkdec.integrations.transformers_cache import forkdec_cache
    from forkdec.integrations.transformers_model import model_config

    hf, _ = tiny
    with forkdec_cache(hf, kv) as cache, torch.no_grad():
        # 256 tokens: the window holds whole pages, so forkdec's page-granular count is exact
        for start in range(0, 256, 64):
            hf(torch.arange(start, start + 64)[None] % 96, past_key_values=cache, use_cache=True)
        assert cache.get_seq_length() == 256
        positions = 0 if kv.startswith("kivi") else 256 * 8
        assert cache.nbytes() == bytes_held(kv, model_config(hf), 256) + positions


# ---- generate, batches, hooks --------------------------------------------------------------------
@pytest.mark.parametrize("kv", ["kivi-4-g32-r0", "xquant-latent-4-g32-r0", "xquant-4-r0"])
def test_generate_equals_a_chunked_forward_loop(tiny, kv):
    """generate(past_key_values=cache) over a 70-token prompt: prefill, then one token per step,
    flushing pages as it goes; the same tokens as a manual greedy loop through a fresh cache."""
    from forkdec.integrations.transformers_cache import forkdec_cache

    hf, _ = tiny
    torch.manual_seed(2)
    prompt = torch.randint(3, 96, (1, 70))
    with forkdec_cache(hf, kv) as cache:
        out = hf.generate(prompt, attention_mask=torch.ones_like(prompt), past_key_values=cache,
                          max_new_tokens=24, do_sample=False, eos_token_id=None, pad_token_id=0)[0, 70:].tolist()
        assert cache.get_seq_length() == 70 + 23 and cache.layers[0].streams[next(iter(
            cache.layers[0].streams))].quantized_len == 64
    want, ids = [], prompt
    with forkdec_cache(hf, kv) as cache, torch.no_grad():
        for _ in range(24):
            logits = hf(ids, past_key_values=cache, use_cache=True).logits[0, -1]
            want.append(int(logits.argmax()))
            ids = torch.tensor([[want[-1]]])
    assert out == want


def test_batched_rows_are_independent(tiny):
    from forkdec.integrations.transformers_cache import forkdec_cache

    hf, _ = tiny
    torch.manual_seed(3)
    toks = torch.randint(0, 96, (2, 150))
    with torch.no_grad():
        logits = []
        with forkdec_cache(hf, "xquant-latent-4-g32-r0") as cache:
            for start in range(0, 150, 50):
                logits.append(hf(toks[:, start:start + 50], past_key_values=cache, use_cache=True).logits)
            batched = torch.cat(logits, 1)
            rows = cache.positions
        assert torch.equal(rows, torch.arange(150).expand(2, 150))
        for b in range(2):
            single = []
            with forkdec_cache(hf, "xquant-latent-4-g32-r0") as cache:
                for start in range(0, 150, 50):
                    single.append(hf(toks[b:b + 1, start:start + 50], past_key_values=cache, use_cache=True).logits)
            torch.testing.assert_close(batched[b], torch.cat(single, 1)[0], atol=1e-4, rtol=1e-4)


def test_hooks_capture_only_their_cache_and_are_removed(tiny):
    from transformers import DynamicCache

    from forkdec.integrations.transformers_cache import forkdec_cache

    hf, _ = tiny
    attn = hf.model.layers[0].self_attn
    before = len(attn._forward_pre_hooks)
    cache = forkdec_cache(hf, "xquant-4-r0")
    assert len(attn._forward_pre_hooks) == before + 1
    with torch.no_grad():
        hf(torch.arange(8)[None], past_key_values=DynamicCache(), use_cache=True)  # another cache: not captured
        assert cache._captured == {}
        hf(torch.arange(8)[None], past_key_values=cache, use_cache=True)
    cache.close()
    assert len(attn._forward_pre_hooks) == before
    with pytest.raises(ValueError, match="^cache: layer 0: no attention input was captured"):
        with torch.no_grad():
            hf(torch.arange(8)[None], past_key_values=cache, use_cache=True)
    forkdec_cache(hf, "xquant-4-r0")  # dropped at once: its hooks go with it
    import gc
    gc.collect()
    assert len(attn._forward_pre_hooks) == before


# ---- bad input ------------------------------------------------------------------------------------
@pytest.mark.parametrize("kv,match", [
    ("kivi-5", "^kv: 'kivi-5': kivi supports bits"),
    ("zquant-4", "^kv: unknown cache kind"),
    ("kivi-4-g128", "^kv: 'kivi-4-g128': the v stream is 64 wide, not a multiple of group size 128"),
    ("xquant-latent-4-k96-g32", "^kv: .xquant-latent-4-k96-g32.: latent rank 96 exceeds the KV width 64"),
    ("fp16", "^kv: 'fp16': the transformers cache supports"),
    ("xquant-cl-4", "^kv: 'xquant-cl-4': the transformers cache supports"),
    ("xquant-latent-2-k32-g32-r0-cal", "^kv: .*calibrated latents need a forkdec model"),
])
def test_bad_kind_raises_naming_kv_before_any_work(tiny, kv, match):
    from forkdec.integrations.transformers_cache import forkdec_cache

    hf, _ = tiny
    hooks = len(hf.model.layers[0].self_attn._forward_pre_hooks)
    with pytest.raises(ValueError, match=match):
        forkdec_cache(hf, kv)
    assert len(hf.model.layers[0].self_attn._forward_pre_hooks) == hooks


def test_unsupported_model_type_raises_naming_the_model():
    import transformers

    from forkdec.integrations.transformers_cache import forkdec_cache

    cfg = transformers.GPT2Config(n_layer=1, n_embd=64, n_head=2, vocab_size=50)
    with pytest.raises(ValueError, match="^model: model type 'gpt2' is not supported"):
        forkdec_cache(transformers.GPT2LMHeadModel(cfg), "kivi-4")


@pytest.mark.parametrize("model_type", ["mistral", "qwen2"])
def test_other_families_run_and_stay_close_to_the_dynamic_cache(model_type):
    """Mistral and Qwen2 (q/k/v biases): 8-bit latents with the window on are within 1% of DynamicCache."""
    from transformers import DynamicCache

    from forkdec.integrations.transformers_cache import forkdec_cache

    hf = tiny_hf(model_type)
    torch.manual_seed(4)
    toks = torch.randint(0, 97, (1, 200))
    with torch.no_grad():
        ref = hf(toks, past_key_values=DynamicCache(), use_cache=True).logits
        for kv in ("xquant-latent-8-g32-r64", "xquant-8-r0", "kivi-4-g32-r64"):
            with forkdec_cache(hf, kv) as cache:
                got = torch.cat([hf(toks[:, s:s + 50], past_key_values=cache, use_cache=True).logits
                                 for s in range(0, 200, 50)], 1)
            err = (got - ref).abs().max() / ref.abs().max()
            assert 0 < err < (0.05 if kv.startswith("kivi") else 0.01), (kv, float(err))
    assert math.isfinite(float(got.sum()))
