"""forkdec ops: validated Python faces over the `torch.ops.forkdec` kernels."""
from forkdec.ops.attention import (CascadeLevel, append_kv, attention, cascade_attention, merge_state,
                                   merge_states)
from forkdec.ops.softmax import softmax
from forkdec.ops.speculative import (VerifyResult, chain_speculative_sampling, verify_tree_greedy,
                                     verify_tree_sampling)

__all__ = ["CascadeLevel", "append_kv", "attention", "cascade_attention", "merge_state", "merge_states", "softmax",
           "VerifyResult", "chain_speculative_sampling", "verify_tree_greedy", "verify_tree_sampling"]
