"""`python -m forkdec` is the `forkdec` command line, and `--json -` puts the JSON alone on
standard output (what people read goes to standard error)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

import forkdec

pytestmark = pytest.mark.skipif(forkdec._extension.load() is None,
                                reason=f"C++ extension unavailable: {forkdec._extension.error()}")


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "forkdec", *args], capture_output=True, text=True, timeout=600)


def test_generate_json_to_stdout_with_per_token_signals():
    r = run("generate", "What is 2 + 3?", "-n", "2", "--max-new-tokens", "6", "--seed", "0", "--no-progress",
            "--json", "-")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)  # nothing but the JSON on stdout
    assert "answer:" in r.stderr and "stats:" in r.stderr
    for p in out["paths"]:
        assert len(p["token_logprobs"]) == len(p["token_confidences"]) == len(p["token_ids"])
        assert sum(p["token_logprobs"]) == pytest.approx(p["cumulative_logprob"], abs=1e-4)


def test_search_json_to_stdout():
    r = run("generate", "Hi", "--search", "beam", "--beam-width", "2", "-n", "1", "--max-new-tokens", "4",
            "--json", "-")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["search"] == "beam" and "stats:" in r.stderr


def test_bad_option_is_one_line_and_exit_2():
    r = run("generate", "Hi", "--weights", "int3")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "weights" in r.stderr
