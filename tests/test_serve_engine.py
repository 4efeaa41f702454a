"""`forkdec serve` on the real engine (the tiny model): the openai client against a
server on a loopback port, seeded results equal to the engine's own, concurrency
that changes nothing, and no page left held afterwards."""
from __future__ import annotations

import concurrent.futures

import pytest

import forkdec

pytest.importorskip("fastapi", reason="the server's extra (fastapi) is not installed")
openai = pytest.importorskip("openai", reason="the openai client is not installed (test extra)")

from engine_fixtures import ByteTokenizer, TinyLlama  # noqa: E402
from serve_server import running  # noqa: E402

from forkdec.engine import Engine, SamplingParams  # noqa: E402
from forkdec.engine.session import Session  # noqa: E402
from forkdec.serve.app import create_app  # noqa: E402
from forkdec.serve.cli import build_service  # noqa: E402

pytestmark = pytest.mark.skipif(forkdec._extension.load() is None,
                                reason=f"C++ extension unavailable: {forkdec._extension.error()}")
MODEL = "tiny"


@pytest.fixture(scope="module")
def server():
    service = build_service(TinyLlama(seed=0), ByteTokenizer(), MODEL, max_kv_bytes=8 << 20)
    with running(create_app(service)) as url:
        yield url, service


def client(url):
    return openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)


def session_texts(prompt_ids, n, params):
    """What a fresh engine Session decodes for the same request: the ground truth."""
    s = Session(Engine(TinyLlama(seed=0), tokenizer=ByteTokenizer()))
    ids = s.start(prompt_ids, n, params, chat=False)
    s.run()
    tok = ByteTokenizer()
    return [tok.decode(s.path(i).token_ids) for i in ids], [s.path(i).token_logprobs for i in ids]


def test_seeded_completion_equals_the_engine(server):
    url, service = server
    r = client(url).completions.create(model=MODEL, prompt="the quick brown", n=4, max_tokens=12, seed=11,
                                       temperature=0.9, logprobs=0)
    texts, lps = session_texts(list(b"the quick brown"), 4, SamplingParams(max_new_tokens=12, seed=11,
                                                                            temperature=0.9))
    assert [c.text for c in r.choices] == texts
    assert r.choices[2].logprobs.token_logprobs == pytest.approx(lps[2], abs=1e-5)
    assert r.usage.prompt_tokens == len(b"the quick brown") and r.usage.completion_tokens == 4 * 12


def test_chat_greedy_stream_equals_whole_and_top_logprobs(server):
    url, _ = server
    c = client(url)
    kw = dict(model=MODEL, messages=[{"role": "user", "content": "hello"}], temperature=0, max_tokens=10)
    whole = c.chat.completions.create(n=2, logprobs=True, top_logprobs=3, **kw)
    assert whole.choices[0].message.content == whole.choices[1].message.content  # greedy: the same path
    top = whole.choices[0].logprobs.content[0].top_logprobs
    assert len(top) == 3 and top[0].logprob >= top[1].logprob >= top[2].logprob
    assert whole.choices[0].logprobs.content[0].logprob == pytest.approx(top[0].logprob, abs=1e-6)  # greedy = argmax
    streamed = "".join(ch.choices[0].delta.content or "" for ch in c.chat.completions.create(stream=True, **kw)
                       if ch.choices)
    assert streamed == whole.choices[0].message.content


def test_min_tokens_and_stop_strings(server):
    url, _ = server
    c = client(url)
    r = c.completions.create(model=MODEL, prompt="ab", max_tokens=8, seed=1, extra_body={"min_tokens": 8,
                                                                                       "stop_token_ids": [e for e in range(272)
                                                                                                          if e != 97]})
    # every token but "a" stops a path, yet none may before 8 tokens: all 8 are drawn with the stops masked
    assert r.choices[0].text == "a" * 8 and r.choices[0].finish_reason == "length"


def test_sixteen_concurrent_clients_get_what_they_get_alone(server):
    url, service = server
    c = client(url)
    reqs = [dict(prompt=f"q{i} " * (1 + i % 3), n=1 + i % 4, max_tokens=4 + 3 * (i % 5), seed=i, temperature=0.8)
            for i in range(16)]
    alone = [[ch.text for ch in c.completions.create(model=MODEL, **r).choices] for r in reqs]
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        together = list(pool.map(lambda r: [ch.text for ch in c.completions.create(model=MODEL, **r).choices], reqs))
    assert together == alone  # per-path seeds: a request's choices do not depend on what runs beside it
    for r, got in zip(reqs, together):
        assert len(got) == r["n"]
    snap = service.scheduler.snapshot()
    assert snap["live_paths"] == 0 and snap["running_requests"] == 0
    session = service.driver.session
    assert session.paths == {}  # every finished path was forgotten
    assert session.pages_in_use == session.prefix.num_pages  # only the prefix cache holds pages now


def test_request_larger_than_the_budget_is_413(server):
    url, _ = server
    import httpx
    r = httpx.post(url + "/v1/completions", json={"model": MODEL, "prompt": "x", "n": 256, "max_tokens": 500})
    assert r.status_code == 413 and r.json()["error"]["param"] == "n"


def test_a_shared_prefix_is_reused_across_requests(server):
    url, _ = server
    c = client(url)
    system = "You are a careful solver of arithmetic word problems. " * 3
    first = c.chat.completions.create(model=MODEL, messages=[{"role": "system", "content": system},
                                                             {"role": "user", "content": "one"}], max_tokens=3, seed=0)
    second = c.chat.completions.create(model=MODEL, messages=[{"role": "system", "content": system},
                                                              {"role": "user", "content": "two"}], max_tokens=3, seed=0)
    page = 16
    assert second.usage.prompt_tokens_details.cached_tokens >= (len(system) // page) * page
    assert second.usage.prompt_tokens == first.usage.prompt_tokens


def test_a_quantized_kind_serves_what_a_fresh_session_decodes():
    """`--kv kivi-4-r0` (pages of 64 tokens quantized as soon as they fill): a seeded request of
    two choices running past a flush equals a fresh Session on the same kind, and the server
    holds no window slot and no page but its prefix cache's afterwards."""
    from test_kv_cache import tiny_model

    kv = "kivi-4-r0"
    model = tiny_model(seed=3, vocab_size=272)  # a forkdec.models model: quantized kinds read its weights
    service = build_service(model, ByteTokenizer(), MODEL, kv=kv, max_kv_bytes=8 << 20)
    params = SamplingParams(max_new_tokens=80, seed=5, temperature=0.8, top_k=40)
    s = Session(Engine(model, tokenizer=ByteTokenizer(), kv=kv, kv_budget_bytes=8 << 20))
    ids = s.start(list(b"the quick brown fox"), 2, params, chat=False)
    quantized = []
    s.run(lambda sess, events: quantized.append(int(sess.cache.quant.sum())))
    want = [ByteTokenizer().decode(s.path(i).token_ids) for i in ids]
    assert max(quantized) >= 1 and quantized[-1] == 0  # a choice's first page was quantized, then freed
    with running(create_app(service)) as url:
        r = client(url).completions.create(model=MODEL, prompt="the quick brown fox", n=2, max_tokens=80, seed=5,
                                           temperature=0.8, extra_body={"top_k": 40})
        assert [c.text for c in r.choices] == want
    session = service.driver.session
    assert session.cache.windowed_pages() == [] and session.pages_in_use == session.prefix.num_pages
