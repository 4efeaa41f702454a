"""The HTTP layer of `forkdec serve` against a scripted engine (tests/serve_fixtures.py):
OpenAI request and response shapes through the real `openai` client, streaming,
errors, the waiting queue, metrics. The real engine behind it: tests/test_serve_engine.py."""
from __future__ import annotations

import json
import threading
import time

import httpx
import pytest

pytest.importorskip("fastapi", reason="the server's extra (fastapi) is not installed")
openai = pytest.importorskip("openai", reason="the openai client is not installed (test extra)")

from forkdec.serve.app import create_app  # noqa: E402
from forkdec.serve.service import Service  # noqa: E402
from engine_fixtures import ByteTokenizer  # noqa: E402
from serve_fixtures import ScriptDriver  # noqa: E402
from serve_server import running  # noqa: E402

MODEL = "tiny"


@pytest.fixture
def server():
    driver = ScriptDriver()
    service = Service(driver, ByteTokenizer(), MODEL, context=512, vocab_size=272, max_waiting=8)
    with running(create_app(service)) as url:
        yield url, driver, service


def client(url: str):
    return openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)


def test_completion_n4_texts_usage_and_logprobs(server):
    url, _, _ = server
    r = client(url).completions.create(model=MODEL, prompt="hi", n=4, max_tokens=64, seed=3, logprobs=2)
    prompt = list(b"hi")
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    for i, c in enumerate(r.choices):
        assert c.text == ScriptDriver.text(prompt, 3, i).decode()
        assert c.finish_reason == "stop"
        assert c.logprobs.token_logprobs == [-0.5] * (len(c.text) + 1)  # + the EOS token
        assert c.logprobs.top_logprobs[0] == {c.text[0]: -0.5, "A": -1.5}
    assert r.usage.prompt_tokens == 2  # once, not once per choice
    assert r.usage.completion_tokens == sum(len(c.text) + 1 for c in r.choices)


def test_max_tokens_and_stop_string(server):
    url, _, _ = server
    c = client(url)
    r = c.completions.create(model=MODEL, prompt="hi", max_tokens=5, seed=1)
    assert r.choices[0].text == "answe" and r.choices[0].finish_reason == "length"
    r = c.completions.create(model=MODEL, prompt="hi", max_tokens=64, seed=1, stop=["seed"])
    assert r.choices[0].text == f"answer {sum(b'hi') % 97} "


def test_chat_n2_and_logprobs(server):
    url, _, _ = server
    r = client(url).chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], n=2,
                                            seed=5, logprobs=True, top_logprobs=1, max_tokens=100)
    prompt = ByteTokenizer().encode(ByteTokenizer().apply_chat_template([{"role": "user", "content": "x"}]))
    assert r.choices[1].message.content == ScriptDriver.text(prompt, 5, 1).decode()
    assert r.choices[0].message.role == "assistant"
    lp = r.choices[0].logprobs.content
    assert lp[0].logprob == -0.5 and len(lp[0].top_logprobs) == 2


@pytest.mark.parametrize("chat", [False, True])
def test_stream_equals_whole(server, chat):
    url, _, _ = server
    c = client(url)
    kw = dict(model=MODEL, n=3, seed=7, max_tokens=40, stop=["choice 2"])
    if chat:
        whole = c.chat.completions.create(messages=[{"role": "user", "content": "q"}], **kw)
        texts = {ch.index: ch.message.content for ch in whole.choices}
        chunks = list(c.chat.completions.create(messages=[{"role": "user", "content": "q"}], stream=True, **kw))
        got = {i: "".join(ch.choices[0].delta.content or "" for ch in chunks
                          if ch.choices and ch.choices[0].index == i) for i in range(3)}
    else:
        whole = c.completions.create(prompt="q", **kw)
        texts = {ch.index: ch.text for ch in whole.choices}
        chunks = list(c.completions.create(prompt="q", stream=True, **kw))
        got = {i: "".join(ch.choices[0].text for ch in chunks if ch.choices and ch.choices[0].index == i)
               for i in range(3)}
    assert got == texts
    assert texts[2].endswith(" ")  # cut before "choice 2": the held-back prefix "c", "ch", ... never leaked
    finishes = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert len(finishes) == 3


def test_stream_usage_and_done(server):
    url, _, _ = server
    with httpx.stream("POST", url + "/v1/completions", json={"model": MODEL, "prompt": "a", "max_tokens": 3,
                                                             "stream": True, "stream_options": {"include_usage": True}},
                      timeout=30) as r:
        lines = [ln for ln in r.iter_lines() if ln]
    assert lines[-1] == "data: [DONE]"
    last = json.loads(lines[-2][len("data: "):])
    assert last["usage"]["completion_tokens"] == 3 and last["choices"] == []
    assert len(lines) == 3 + 2  # one chunk per token, usage, [DONE]


def test_vote_extension(server):
    url, _, _ = server
    r = httpx.post(url + "/v1/completions", json={"model": MODEL, "prompt": "hi", "n": 4, "max_tokens": 64,
                                                  "vote": "majority"}, timeout=30).json()
    v = r["forkdec"]["votes"][0]
    assert v["strategy"] == "majority" and v["answer"] is not None and sum(v["votes"].values()) == 4


@pytest.mark.parametrize("body,status,param", [
    ({"model": MODEL, "prompt": "x", "n": 0}, 400, "n"),
    ({"model": MODEL, "prompt": "x", "n": "many"}, 400, "n"),
    ({"model": MODEL, "prompt": "x", "temperature": -1}, 400, "temperature"),
    ({"model": MODEL, "prompt": "x", "max_tokens": 10_000}, 400, "max_tokens"),
    ({"model": MODEL, "prompt": ""}, 400, "prompt"),
    ({"model": MODEL, "prompt": []}, 400, "prompt"),
    ({"model": MODEL, "prompt": [999999]}, 400, "prompt"),
    ({"model": MODEL, "prompt": "x", "stop": [""]}, 400, "stop"),
    ({"model": MODEL, "prompt": "x", "frequency_penalty": 1.0}, 400, "frequency_penalty"),
    ({"model": MODEL}, 400, "prompt"),
    ({"model": "gpt-9", "prompt": "x"}, 404, "model"),
    ({"model": MODEL, "prompt": "x", "n": 100, "max_tokens": 4}, 413, "n"),
])
def test_bad_requests_name_the_field(server, body, status, param):
    url, _, _ = server
    r = httpx.post(url + "/v1/completions", json=body, timeout=30)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["param"] == param and param in err["message"]
    ok = httpx.post(url + "/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 2}, timeout=30)
    assert ok.status_code == 200  # the server keeps serving


def test_malformed_json_and_chat_errors(server):
    url, _, _ = server
    r = httpx.post(url + "/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
    r = httpx.post(url + "/v1/chat/completions", json={"model": MODEL, "messages": []})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    r = httpx.post(url + "/v1/chat/completions", json={"model": MODEL, "messages": [{"role": "user", "content": "x"}],
                                                      "top_logprobs": 2})
    assert r.status_code == 400 and r.json()["error"]["param"] == "top_logprobs"


def test_models_health_metrics(server):
    url, _, _ = server
    assert httpx.get(url + "/health").json() == {"status": "ok"}
    assert [m.id for m in client(url).models.list().data] == [MODEL]
    client(url).completions.create(model=MODEL, prompt="hi", max_tokens=4)
    text = httpx.get(url + "/metrics").text
    assert "forkdec_generated_tokens_total 4.0" in text and "forkdec_waiting_requests 0.0" in text


def test_queue_bound_gives_429_and_server_recovers():
    driver = ScriptDriver(capacity=1, step_delay=0.02)
    service = Service(driver, ByteTokenizer(), MODEL, context=512, vocab_size=272, max_waiting=2)
    with running(create_app(service)) as url:
        results: list[int] = []

        def one() -> None:
            r = httpx.post(url + "/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 30}, timeout=60)
            results.append(r.status_code)
        threads = [threading.Thread(target=one) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert results.count(200) >= 3 and set(results) <= {200, 429} and 429 in results
        assert httpx.post(url + "/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 2}).status_code == 200
        assert driver.live_paths() == 0


def test_disconnected_stream_stops_its_paths():
    driver = ScriptDriver(step_delay=0.02)
    service = Service(driver, ByteTokenizer(), MODEL, context=512, vocab_size=272)
    with running(create_app(service)) as url:
        with httpx.stream("POST", url + "/v1/completions", json={"model": MODEL, "prompt": "x", "n": 2,
                                                                 "max_tokens": 500, "stream": True,
                                                                 "ignore_eos": True}) as r:
            for i, _ in enumerate(r.iter_lines()):
                if i > 3:
                    break
        deadline = time.time() + 10
        while driver.live_paths() and time.time() < deadline:
            time.sleep(0.05)
        assert driver.live_paths() == 0 and driver.started == 1
        assert service.scheduler.snapshot()["generated_tokens"] < 2 * 500  # stopped long before max_tokens
