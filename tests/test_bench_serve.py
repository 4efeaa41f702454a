"""`forkdec bench serve`'s plumbing on the CPU: the load generator against a scripted server
(one that honours n, and one that ignores it), and the report it writes."""
from __future__ import annotations

import argparse

import pytest

pytest.importorskip("fastapi", reason="the server's extra (fastapi) is not installed")

from engine_fixtures import ByteTokenizer  # noqa: E402
from serve_fixtures import ScriptDriver  # noqa: E402
from serve_server import running  # noqa: E402

from forkdec.bench.serve import report  # noqa: E402
from forkdec.bench.serve_load import run_load  # noqa: E402
from forkdec.serve.app import create_app  # noqa: E402
from forkdec.serve.service import Service  # noqa: E402


class OneChoiceDriver(ScriptDriver):
    """A server that ignores n, as llama-cpp-python's does."""

    def start(self, r):
        r.n = 1
        return super().start(r)


@pytest.mark.parametrize("driver_cls,requests_made", [(ScriptDriver, 3), (OneChoiceDriver, 3 * 4)])
def test_load_counts_requests_tokens_and_latencies(driver_cls, requests_made, tmp_path):
    service = Service(driver_cls(), ByteTokenizer(), "m", context=512, vocab_size=272)
    with running(create_app(service)) as url:
        res = run_load(url, "m", ["q1", "q2", "q3"], clients=2, n=4, max_tokens=6, max_seconds=60)
    assert len(res.timings) == requests_made  # the one-choice server is asked again for each missing choice
    s = res.summary()
    assert s["requests"] == 3 and s["errors"] == 0
    assert s["tokens"] == 3 * 4 * 6  # every choice runs to max_tokens (the scripts are longer)
    assert 0 < s["ttft_p50"] <= s["ttft_p90"] and 0 <= s["itl_p50"] <= s["itl_p90"]
    args = argparse.Namespace(questions=3, n=4, max_tokens=6, threads=2, out=str(tmp_path))
    report(args, [2], {("forkdec", 2): s, ("llama.cpp", 2): {**s, "tokens_per_s": s["tokens_per_s"] / 2}}, "0.0")
    text = (tmp_path / "serve.md").read_text()
    assert "| forkdec | 2 | 3 (0 err) |" in text and "2.00x" in text
