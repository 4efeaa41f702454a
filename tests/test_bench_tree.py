"""`forkdec bench tree` (bench/tree.py and its llama.cpp peers): the report's arithmetic and tables on
synthetic results, option checks, the peer switch, the peers' argument checks, and a run of the cheap
sections. The llama.cpp decode itself is tested in tests/test_bench_tree_llama_cpp.py."""
import argparse
import subprocess
import sys

import pytest

from forkdec.bench import tree
from forkdec.bench.llama_cpp_fewshot_peer import llama_cpp_fewshot
from forkdec.bench.llama_cpp_process import run_llama_jobs
from forkdec.bench.llama_cpp_tree_peer import llama_cpp_tree_decode
from forkdec.bench.tree_peers import LlamaPeer


def test_split_shared_prefix_keeps_at_least_one_own_id():
    prefix, own = tree.split_shared_prefix([[1, 2, 3, 4], [1, 2, 5], [1, 2, 3, 9, 9]])
    assert prefix == [1, 2] and own == [[3, 4], [5], [3, 9, 9]]
    prefix, own = tree.split_shared_prefix([[1, 2], [1, 2]])  # identical prompts: each keeps its last id
    assert prefix == [1] and own == [[2], [2]]


def _levels(nodes, steps, step_s=0.5, copy_s=0.25):
    return [{"nodes": n, "copy_seconds": copy_s, "step_seconds": [step_s] * k} for n, k in zip(nodes, steps)]


def test_tree_throughput_counts_one_token_per_node_per_step_and_cuts_the_last_level():
    levels = _levels([4, 16], [3, 3])
    assert tree.tree_throughput(levels) == (4 * 3 + 16 * 3, 2 * 0.25 + 6 * 0.5)
    assert tree.tree_throughput(levels, 1) == (4 * 3 + 16, 2 * 0.25 + 4 * 0.5)
    cut = tree._cut_levels(levels, 1)
    assert [len(v["step_seconds"]) for v in cut] == [3, 1] and len(levels[1]["step_seconds"]) == 3
    # alternating layouts: each holds every other step of a level, cut by the step's index in the level
    odd = [{"nodes": 4, "copy_seconds": 0.0, "step_seconds": [1.0, 2.0, 3.0], "step_index": [1, 3, 5]}]
    assert tree.tree_throughput(odd, 4) == (8, 3.0) and tree._cut_levels(odd, 4)[0]["step_seconds"] == [1.0, 2.0]


def _forkdec_decode(step_s):
    return {"leaves": 16, "levels": _levels([4, 16], [4, 4], step_s), "step_times": [step_s] * 3,
            "kv_tokens_read": 400, "unique_tokens": 380, "sum_leaf_contexts": 4976, "plan_seconds_per_step": 1e-3}


def test_decode_section_compares_forkdec_and_llama_cpp_over_the_same_steps():
    r = {"tree cascade": _forkdec_decode(0.1), "two-level": _forkdec_decode(0.2)}
    # llama.cpp ran only 2 of the last level's 4 steps, each 4x forkdec's tree step
    llama = {"levels": _levels([4, 16], [4, 2], 0.4), "unique_tokens": 364, "settings": "2 threads, n_seq_max 16"}
    for lv in r["tree cascade"]["levels"] + r["two-level"]["levels"] + llama["levels"]:
        lv["copy_seconds"] = 0.0
    text = tree.decode_section(r, llama, "", 300, 2, 4)
    assert "first 2 of the last level's 4 steps" in text and "steps 0-1 of level 2" in text
    assert "llama.cpp's, over the same steps: 4.00x" in text and "two-level / llama.cpp: 2.00x" in text
    assert "| 2 | 16 | 100 | 200 | 400 | 2 | 4.0 |" in text and "llama.cpp settings: 2 threads, n_seq_max 16." in text
    missing = tree.decode_section(r, None, "not run: no interpreter at /x", 300, 2, 4)
    assert "not run: no interpreter at /x" in missing and "over the same steps" not in missing


def test_fewshot_section_rows_and_ratio():
    v = {"seconds": 10.0, "prefill_seconds": 4.0, "prompt_tokens_prefilled": 2100, "prompt_tokens_reused": 900,
         "generated_tokens": 64, "questions": 4}
    cold = dict(v, questions=2, prompt_tokens_prefilled=4000, prompt_tokens_reused=0)
    r = {"questions": 4, "n": 2, "max_new_tokens": 8, "prefix cache": v, "no prefix cache": cold}
    llama = dict(v, seconds=25.0, groups=[4], settings="groups of 4")
    text = tree.fewshot_section(r, llama, "", 2000)
    assert "| forkdec, prefix cache | 2100 | 900 | 4.0 | 10.0 | 64 | 6.4 |" in text
    assert "no prefix cache (first 2 questions only)" in text and "groups of 4" in text
    assert "llama.cpp / forkdec with the prefix cache: 2.50x" in text


def _args(**change):
    args = dict(sections="fold,decode", prompt_tokens=1, depth=1, node_tokens=1, questions=1, paths=1,
                prefix_tokens=1, fewshot_tokens=1, beam_tokens=1, cold_questions=0, llama_last_level_steps=0,
                threads=None, beam_widths="4,8")
    args.update(change)
    return argparse.Namespace(**args)


@pytest.mark.parametrize("change,name", [
    (dict(sections="fold,trees"), "--sections"), (dict(depth=0), "--depth"), (dict(node_tokens=0), "--node-tokens"),
    (dict(paths=0), "--paths"), (dict(cold_questions=-1), "--cold-questions"),
    (dict(llama_last_level_steps=-1), "--llama-last-level-steps"), (dict(threads=0), "--threads"),
    (dict(beam_widths="4,0"), "--beam-widths"), (dict(beam_widths="a"), "--beam-widths"),
])
def test_bad_options_raise_value_error_naming_them(change, name):
    with pytest.raises(ValueError, match=f"^{name}:"):
        tree.check_args(_args(**change))
    assert tree.check_args(_args()) == {"fold", "decode"}


def test_bad_option_on_the_command_line_exits_2_with_one_line():
    proc = subprocess.run([sys.executable, "-m", "forkdec", "bench", "tree", "--depth", "0"], capture_output=True,
                          text=True)
    assert proc.returncode == 2 and proc.stderr.strip() == "forkdec bench: --depth: must be >= 1, got 0"


def test_peer_switch_says_why_it_does_not_run(tmp_path):
    missing = str(tmp_path / "python")
    assert LlamaPeer.from_args(False, None, 2, "m.gguf").not_run == "not run: --no-peers"
    peer = LlamaPeer.from_args(None, missing, 2, "m.gguf")
    assert peer.not_run.startswith(f"not run: no interpreter at {missing}") and "llama-cpp-python" in peer.not_run
    with pytest.raises(ValueError, match="^--peers: no interpreter"):
        LlamaPeer.from_args(True, missing, 2, "m.gguf")
    # an interpreter without llama_cpp (a stub sys.modules entry would not cross the process)
    no_llama = tmp_path / "nollama"
    no_llama.write_text(f"#!/bin/sh\nexec {sys.executable} -S -c \"import sys; sys.exit(1)\"\n")
    no_llama.chmod(0o755)
    assert "llama_cpp is not importable" in LlamaPeer.from_args(None, str(no_llama), 2, "m.gguf").not_run


@pytest.fixture
def gguf(tmp_path):
    path = tmp_path / "m.gguf"
    path.write_bytes(b"GGUF")
    return str(path)


@pytest.mark.parametrize("change,name", [
    (dict(depth=0), "depth"), (dict(depth=5), "depth"), (dict(branching=0), "branching"),
    (dict(branching=2.0), "branching"), (dict(node_tokens=0), "node_tokens"), (dict(depth=True), "depth"),
    (dict(last_level_steps=0), "last_level_steps"), (dict(last_level_steps=5), "last_level_steps"),
    (dict(prompt_ids=[]), "prompt_ids"), (dict(temperature=-1.0), "temperature"),
])
def test_tree_peer_checks_arguments_before_loading_llama_cpp(gguf, change, name):
    args = dict(gguf_path=gguf, prompt_ids=[1, 2], depth=4, branching=4, node_tokens=4, temperature=1.0)
    args.update(change)
    with pytest.raises(ValueError, match=f"^{name}:"):
        llama_cpp_tree_decode(**args)


@pytest.mark.parametrize("change,name", [
    (dict(question_ids=[]), "question_ids"), (dict(question_ids=[[1], []]), "question_ids"), (dict(n=256), "n"),
    (dict(prefix_ids=[]), "prefix_ids"), (dict(prefix_ids=[1, -1]), "prefix_ids"), (dict(max_new_tokens=0), "max_new_tokens"),
])
def test_fewshot_peer_checks_arguments_before_loading_llama_cpp(gguf, change, name):
    args = dict(gguf_path=gguf, prefix_ids=[1, 2], question_ids=[[3], [4, 5]], n=8, max_new_tokens=4, temperature=0.7)
    args.update(change)
    with pytest.raises(ValueError, match=f"^{name}:"):
        llama_cpp_fewshot(**args)


def test_runner_loads_the_peer_modules_without_forkdec_and_reports_failures(gguf):
    # In the child, forkdec is a stub (bench/ as forkdec.bench, a stand-in validation module); a job with a bad
    # argument fails there with the peer's ValueError, which surfaces as a failed process, not as a result.
    job = dict(gguf_path=gguf, prompt_ids=[1], depth=9, branching=4, node_tokens=1, temperature=1.0)
    with pytest.raises(subprocess.CalledProcessError):
        run_llama_jobs(sys.executable, "llama_cpp_tree_peer", "llama_cpp_tree_decode", [job])


def test_cheap_sections_write_the_report(tmp_path):
    assert tree.run(["--quick", "--sections", "fold,metadata", "--out", str(tmp_path)]) == 0
    report = (tmp_path / "tree.md").read_text()
    assert "## 1. Folding" in report and "## 2. Metadata" in report and "- threads:" in report
    assert "command: forkdec bench tree --quick --sections fold,metadata" in report
    assert (tmp_path / "tree.json").is_file()
