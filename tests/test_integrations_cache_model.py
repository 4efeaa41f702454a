"""forkdec_cache on the default model (SmolLM2-135M as transformers loads the GGUF, fp32).

Perplexity: WikiText-2 test, one 384-token window fed in 64-token chunks (pages of 64,
the 128-token window flushes at 192, 256, 320 and 384 tokens), through
`model(chunk, past_key_values=forkdec_cache(model, kind))` vs forkdec.eval.perplexity of
the same kind with forkdec's own GGUF model. With fp32 K/V (DynamicCache) the two agree to
1e-8; the quantized kinds agree to 2e-3 relative, the noise floor of a 4-bit cache on this model: a rounding-level
change anywhere flips quantization codes, and transformers' own eager and sdpa attention
(both exact fp32) already give PPLs 1e-3 (xquant-4), 6e-4 (kivi-4) and 8e-5
(xquant-latent-4) apart through the same cache (measured on a 512-token window). Exact
agreement of the cache semantics is tested on tiny checkpoints (test_integrations_cache.py).

Greedy generate: a 64-token prompt (one whole page) and 72 new tokens with -r0 kinds, so the
prompt and then the path's first 64 tokens are quantized page by page at the same positions
as forkdec's Engine quantizes them (the Engine keeps a prompt's pages and each path's own pages
separately, each with its own residual window; with R > 0 that keeps up to R prompt tokens
in fp16 that a single-sequence cache would have flushed, so the two are compared at r0).
"""
from __future__ import annotations

import pytest
import torch

from cache_fixtures import hf_perplexity
from integrations_fixtures import NEEDS_MODEL, NEEDS_TRANSFORMERS, load_default_hf

pytestmark = [NEEDS_TRANSFORMERS, NEEDS_MODEL]
DATA = "/work/shared/data/wikitext-2/test.txt"
WINDOW, CHUNK = 384, 64


@pytest.fixture(scope="module")
def own():
    from forkdec.models import load_model
    return load_model(dtype=torch.float32)


@pytest.fixture(scope="module")
def ids(own):
    import os

    from forkdec.eval import read_tokens
    from integrations_fixtures import WIKI

    return read_tokens(DATA if os.path.exists(DATA) else WIKI, own[1], WINDOW)


@pytest.fixture(scope="module")
def fp32_ppl(own, ids):
    from forkdec.eval import perplexity
    return perplexity(own[0], ids, "fp32", window=WINDOW, chunk=CHUNK, windows=1).ppl


@pytest.mark.parametrize("kv", ["kivi-4", "xquant-latent-4", "xquant-4"])
def test_ppl_equals_forkdec_eval(own, ids, fp32_ppl, kv):
    from forkdec.eval import perplexity

    hf, _ = load_default_hf()
    hf.set_attn_implementation("sdpa")
    want = perplexity(own[0], ids, kv, window=WINDOW, chunk=CHUNK, windows=1).ppl
    got = hf_perplexity(hf, ids, kv, window=WINDOW, chunk=CHUNK, windows=1)
    assert got == pytest.approx(want, rel=2e-3), (got, want)
    assert abs(want / fp32_ppl - 1) > 2e-3  # the quantization shows beyond the tolerance


def _prompt(tok, n: int = 64) -> str:
    """A WikiText prefix whose re-encoding is exactly n tokens (one whole page)."""
    import os

    from integrations_fixtures import WIKI

    with open(DATA if os.path.exists(DATA) else WIKI, encoding="utf-8") as f:
        ids = tok.encode(f.read(20000))
    for k in range(n, n + 16):
        text = tok.decode(ids[:k])
        if len(tok.encode(text)) == n:
            return text
    raise AssertionError(f"no prefix re-encodes to {n} tokens")


@pytest.mark.parametrize("kv", ["kivi-4-r0", "xquant-latent-4-r0", "xquant-4-r0"])
def test_greedy_generate_equals_forkdec_engine(own, kv):
    import forkdec
    from forkdec.engine import SamplingParams
    from forkdec.integrations.transformers_cache import forkdec_cache

    hf, _ = load_default_hf()
    hf.set_attn_implementation("sdpa")
    model, tok = own
    prompt = _prompt(tok)
    params = SamplingParams(temperature=0.0, max_new_tokens=72, ignore_eos=True, seed=0)
    want = forkdec.Engine((model, tok), kv=kv).generate([prompt], n=1, params=params, chat=False)[0][0].token_ids
    x = torch.tensor([tok.encode(prompt)])
    with forkdec_cache(hf, kv) as cache:
        got = hf.generate(x, attention_mask=torch.ones_like(x), past_key_values=cache, do_sample=False,
                          max_new_tokens=72, min_new_tokens=72, pad_token_id=2)[0, 64:].tolist()
        # the prompt's page at prefill, the path's first page once 64 of its 71 cached tokens are in
        assert cache.layers[0].streams[next(iter(cache.layers[0].streams))].quantized_len == 128
    assert got == want
