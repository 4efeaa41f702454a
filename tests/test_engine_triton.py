"""The engine's GPU path under the interpreter: the tiny model decoding with every
op on the triton backend (append_kv, prefill attention, the decode CascadePlan,
sampling) gives the cpu backend's tokens."""
from __future__ import annotations

import functools
import importlib.util
import os

import pytest

import forkdec
import forkdec.ops as ops
from forkdec.engine import Engine, SamplingParams
from engine_fixtures import ByteTokenizer, TinyLlama

pytestmark = [
    pytest.mark.skipif(forkdec._extension.load() is None,
                       reason=f"C++ extension unavailable: {forkdec._extension.error()}"),
    pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed"),
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                       reason="needs the Triton interpreter (tests/conftest.py sets it when there is no GPU)"),
]

PROMPTS = ["the quick brown fox j", "0123456789abcdef012"]
SAMPLE, PLAN_INIT = ops.sample_with_logprobs, ops.CascadePlan.__init__


def _generate(monkeypatch, backend: str, params: SamplingParams):
    monkeypatch.setenv("FORKDEC_ENGINE_BACKEND", backend)  # attention, append_kv, cascade (engine/attend.py)
    calls = []

    def sample_on(*args, **kwargs):
        calls.append(kwargs["backend"])
        return SAMPLE(*args, **kwargs)
    monkeypatch.setattr(ops, "sample_with_logprobs", sample_on)  # the engine's one sampler call per step
    seen = []

    def plan_init(self, *args, **kwargs):
        PLAN_INIT(self, *args, **kwargs)
        seen.append(self.backend)
    monkeypatch.setattr(ops.CascadePlan, "__init__", plan_init)
    eng = Engine(TinyLlama(seed=1), tokenizer=ByteTokenizer(), page_size=8)
    out = eng.generate(PROMPTS, n=[2, 3], params=params, chat=False)
    assert set(calls) == {backend} and set(seen) == {backend}, (calls, seen)  # the steps ran on `backend`
    return [[c.token_ids for c in paths] for paths in out]


@pytest.mark.parametrize("params", [SamplingParams(temperature=0, max_new_tokens=6),
                                    SamplingParams(temperature=0.8, top_k=20, max_new_tokens=5, seed=7)],
                         ids=["greedy", "sampled"])
def test_engine_on_triton_gives_the_cpu_tokens(monkeypatch, params):
    cpu = _generate(monkeypatch, "cpu", params)
    triton = _generate(monkeypatch, "triton", params)
    assert triton == cpu
