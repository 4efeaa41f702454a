"""The llama.cpp peer of `forkdec bench tree`: whether it runs, and its two workloads.

Each call starts a process of the interpreter that has llama-cpp-python
(bench/llama_cpp_process.py); forkdec's process never imports llama_cpp.
"""
from __future__ import annotations

from dataclasses import dataclass

from forkdec.bench.llama_cpp_peer import SKIP_REASON
from forkdec.bench.llama_cpp_process import llama_available, llama_python, run_llama_jobs


@dataclass
class LlamaPeer:
    """python: the peer's interpreter; threads: its decode and batch threads (forkdec's count);
    not_run: why it does not run (None: it runs)."""
    python: str
    threads: int
    gguf_path: str
    not_run: str | None = None

    @classmethod
    def from_args(cls, peers: bool | None, python: str | None, threads: int, gguf_path: str) -> "LlamaPeer":
        """peers None: run when the interpreter can import llama_cpp; False: never; True: must run."""
        python = llama_python(python)
        if peers is False:
            return cls(python, threads, gguf_path, "not run: --no-peers")
        missing = llama_available(python)
        if missing is not None:
            if peers:
                raise ValueError(f"--peers: {missing} (--llama-python names an interpreter with llama-cpp-python)")
            return cls(python, threads, gguf_path, f"not run: {missing}; {SKIP_REASON}")
        return cls(python, threads, gguf_path)

    def tree(self, prompt_ids: list[int], depth: int, node_tokens: int, seed: int,
             last_level_steps: int | None = None) -> dict:
        """bench/llama_cpp_tree_peer.py: branching 4, temperature 1 (as forkdec's tree)."""
        job = dict(gguf_path=self.gguf_path, prompt_ids=prompt_ids, depth=depth, branching=4,
                   node_tokens=node_tokens, temperature=1.0, seed=seed, threads=self.threads,
                   last_level_steps=last_level_steps)
        return run_llama_jobs(self.python, "llama_cpp_tree_peer", "llama_cpp_tree_decode", [job])[0]

    def fewshot(self, prefix_ids: list[int], question_ids: list[list[int]], n: int, max_new: int) -> dict:
        """bench/llama_cpp_fewshot_peer.py: temperature 0.7, seed 0, EOS ignored (as forkdec's few-shot)."""
        job = dict(gguf_path=self.gguf_path, prefix_ids=prefix_ids, question_ids=question_ids, n=n,
                   max_new_tokens=max_new, temperature=0.7, seed=0, threads=self.threads, ignore_eos=True)
        return run_llama_jobs(self.python, "llama_cpp_fewshot_peer", "llama_cpp_fewshot", [job])[0]
