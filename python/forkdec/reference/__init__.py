"""Plain-PyTorch reference implementations: the ground truth for every backend.

One function per op, reused by the tests and the benchmarks.
"""
from forkdec.reference.attention import append_kv, attention, cascade_attention, merge_state, merge_states
from forkdec.reference.layer_ops import add_rms_norm, rms_norm, rope_qkv, silu_and_mul
from forkdec.reference.qlinear import qlinear
from forkdec.reference.sampling import filtered_probs, sample, sample_with_logprobs, token_signals
from forkdec.reference.softmax import softmax
from forkdec.reference.speculative import chain_speculative_sampling, verify_tree_greedy, verify_tree_sampling
from forkdec.reference.xquant import xquant_attention

__all__ = ["add_rms_norm", "append_kv", "attention", "cascade_attention", "chain_speculative_sampling",
           "filtered_probs", "merge_state", "merge_states", "qlinear", "rms_norm", "rope_qkv", "sample",
           "sample_with_logprobs", "silu_and_mul", "softmax", "token_signals", "verify_tree_greedy",
           "verify_tree_sampling", "xquant_attention"]
