"""Plain-PyTorch reference implementations: the ground truth for every backend.

One function per op, reused by the tests and the benchmarks.
"""
from forkdec.reference.attention import append_kv, attention, cascade_attention, merge_state, merge_states
from forkdec.reference.softmax import softmax
from forkdec.reference.speculative import chain_speculative_sampling, verify_tree_greedy, verify_tree_sampling

__all__ = ["append_kv", "attention", "cascade_attention", "merge_state", "merge_states", "softmax",
           "chain_speculative_sampling", "verify_tree_greedy", "verify_tree_sampling"]
