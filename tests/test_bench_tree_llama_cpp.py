"""The llama.cpp peers of `forkdec bench tree` on the default model, tiny sizes, in the peer's own process
(the interpreter `forkdec bench tree` would use: /work/llamavenv's when present). Skipped, with the reason,
where that interpreter cannot import llama_cpp (CI: llama-cpp-python is an optional, separately built peer)."""
import pytest

from forkdec.bench.llama_cpp_peer import SKIP_REASON
from forkdec.bench.llama_cpp_process import llama_available, llama_python, run_llama_jobs

PYTHON = llama_python(None)
MISSING = llama_available(PYTHON)
pytestmark = pytest.mark.skipif(MISSING is not None, reason=f"{MISSING}: {SKIP_REASON}")

PROMPT = [1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 28, 2]  # a short ChatML-like id sequence


@pytest.fixture(scope="module")
def path():
    from forkdec.models import default_model_path

    try:
        return default_model_path()
    except RuntimeError as e:
        pytest.skip(str(e))


def test_tree_by_sequence_copy(path):
    base = dict(gguf_path=path, prompt_ids=PROMPT, depth=2, branching=2, node_tokens=3, threads=2)
    greedy, sampled, again, cut = run_llama_jobs(PYTHON, "llama_cpp_tree_peer", "llama_cpp_tree_decode", [
        dict(base, temperature=0.0), dict(base, temperature=1.0, seed=1), dict(base, temperature=1.0, seed=1),
        dict(base, temperature=1.0, seed=1, last_level_steps=1)])
    assert [v["nodes"] for v in greedy["levels"]] == [2, 4]
    assert [len(v["step_seconds"]) for v in greedy["levels"]] == [3, 3]
    assert greedy["generated_tokens"] == 2 * 3 + 4 * 3 and greedy["unique_tokens"] == len(PROMPT) + 18
    # every leaf descends from the one prompt: greedy chains agree token for token
    chains = greedy["leaf_tokens"]
    assert len(chains) == 4 and all(len(c) == 6 for c in chains) and all(c == chains[0] for c in chains)
    # sampled: leaves 0,1 are the children of the first level-1 node, 2,3 of the second (the parent keeps
    # its id as its first child); siblings share their parent's 3 tokens and then diverge
    s = sampled["leaf_tokens"]
    assert s[0][:3] == s[1][:3] and s[2][:3] == s[3][:3]
    assert len({tuple(c) for c in s}) > 1
    assert again["leaf_tokens"] == s  # seeded: reproducible
    assert [len(v["step_seconds"]) for v in cut["levels"]] == [3, 1] and cut["generated_tokens"] == 2 * 3 + 4
    assert [c[:4] for c in cut["leaf_tokens"]] == [c[:4] for c in s]  # the same draws, stopped early
    assert "n_seq_max 4" in greedy["settings"] and greedy["version"].startswith("llama-cpp-python")


def test_fewshot_equals_each_question_decoded_alone(path):
    prefix, questions = PROMPT[:6], [PROMPT[6:], PROMPT[6:9], [28, 2]]
    # 128 paths: 255 // 128 = one question per group, so the prefix is shared across three groups
    (shared,) = run_llama_jobs(PYTHON, "llama_cpp_fewshot_peer", "llama_cpp_fewshot", [
        dict(gguf_path=path, prefix_ids=prefix, question_ids=questions, n=128, max_new_tokens=4, temperature=0.0,
             threads=2)])
    alone = run_llama_jobs(PYTHON, "llama_cpp_peer", "llama_cpp_generate", [
        dict(gguf_path=path, prompt_ids=prefix + q, n=1, max_new_tokens=4, temperature=0.0, threads=2,
             ignore_eos=True) for q in questions])
    assert shared["groups"] == [1, 1, 1]
    assert shared["prompt_tokens_prefilled"] == len(prefix) + sum(len(q) for q in questions)
    assert shared["generated_tokens"] == 3 * 128 * 4
    for paths, one in zip(shared["tokens"], alone):
        assert len(paths) == 128 and all(p == one["tokens"][0] for p in paths)
    assert shared["tokens"][0][0] != shared["tokens"][2][0]  # different questions, different answers


def test_fewshot_sampled_paths_diverge(path):
    (r,) = run_llama_jobs(PYTHON, "llama_cpp_fewshot_peer", "llama_cpp_fewshot", [
        dict(gguf_path=path, prefix_ids=PROMPT[:6], question_ids=[PROMPT[6:], [28, 2]], n=4, max_new_tokens=6,
             temperature=0.7, seed=3, threads=2)])
    assert r["groups"] == [2] and all(len({tuple(p) for p in q}) > 1 for q in r["tokens"])
