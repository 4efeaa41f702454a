"""The llama.cpp peer runner (bench/llama_cpp_peer.py): argument checks and the skip
reason run everywhere; the decode itself, in the peer's own process (bench/llama_cpp_process.py),
only where that interpreter has llama-cpp-python (an optional, separately built peer, absent in CI)."""
import sys

import pytest

from forkdec.bench.llama_cpp_peer import SKIP_REASON, llama_cpp_generate
from forkdec.bench.llama_cpp_process import llama_available, llama_python, run_llama_jobs

PYTHON = llama_python(None)
MISSING = llama_available(PYTHON)


@pytest.fixture
def gguf(tmp_path):
    path = tmp_path / "m.gguf"
    path.write_bytes(b"GGUF")
    return str(path)


def _args(gguf, **change):
    args = dict(gguf_path=gguf, prompt_ids=[1, 2, 3], n=2, max_new_tokens=4, temperature=0.7, seed=0, threads=2)
    args.update(change)
    return args


@pytest.mark.parametrize("change,name", [
    (dict(gguf_path="/no/such/model.gguf"), "gguf_path"), (dict(prompt_ids=[]), "prompt_ids"),
    (dict(prompt_ids=[1, -2]), "prompt_ids"), (dict(prompt_ids=[1, 2.0]), "prompt_ids"), (dict(n=0), "n"),
    (dict(n=True), "n"), (dict(max_new_tokens=0), "max_new_tokens"), (dict(temperature=-0.1), "temperature"),
    (dict(temperature=float("nan")), "temperature"), (dict(seed=-1), "seed"), (dict(seed=2**32), "seed"),
    (dict(threads=0), "threads"), (dict(top_p=0.0), "top_p"), (dict(top_k=-1), "top_k"),
])
def test_bad_arguments_raise_value_error_naming_them(gguf, change, name):
    with pytest.raises(ValueError, match=f"^{name}:"):
        llama_cpp_generate(**_args(gguf, **change))


def test_without_llama_cpp_good_arguments_raise_import_error_with_the_skip_reason(gguf, monkeypatch):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # makes `import llama_cpp` fail, installed or not
    with pytest.raises(ImportError) as info:
        llama_cpp_generate(**_args(gguf))
    assert str(info.value) == SKIP_REASON
    assert "pip install llama-cpp-python" in SKIP_REASON and "not installed" in SKIP_REASON


@pytest.mark.skipif(MISSING is not None, reason=f"{MISSING}: {SKIP_REASON}")
def test_batched_decode_on_the_default_model():
    from forkdec.models import default_model_path

    try:
        path = default_model_path()
    except RuntimeError as e:
        pytest.skip(str(e))
    prompt = [1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 28, 2]  # a short ChatML-like id sequence
    def generate(*args, **kw):
        names = ("gguf_path", "prompt_ids", "n", "max_new_tokens", "temperature")
        return run_llama_jobs(PYTHON, "llama_cpp_peer", "llama_cpp_generate", [dict(zip(names, args), **kw)])[0]

    greedy = generate(path, prompt, 3, 6, 0.0, ignore_eos=True)
    assert greedy["generated_tokens"] == 18 and all(len(t) == 6 for t in greedy["tokens"])
    # Every sequence starts from the one shared prompt: greedy paths must agree token for token.
    assert greedy["tokens"][0] == greedy["tokens"][1] == greedy["tokens"][2]
    assert greedy["version"].startswith("llama-cpp-python") and greedy["decode_seconds"] > 0
    sampled = generate(path, prompt, 4, 8, 1.0, seed=1, ignore_eos=True)
    assert len({tuple(t) for t in sampled["tokens"]}) > 1  # one RNG, four draws per step: paths diverge
    again = generate(path, prompt, 4, 8, 1.0, seed=1, ignore_eos=True)
    assert again["tokens"] == sampled["tokens"]  # seeded: reproducible
