"""forkdec ops: validated Python faces over the `torch.ops.forkdec` kernels."""
from forkdec.ops.attention import (CascadeLevel, append_kv, attention, cascade_attention, merge_state,
                                   merge_states)
from forkdec.ops.cascade_plan import CascadePlan
from forkdec.ops.sampling import sample
from forkdec.ops.softmax import softmax
from forkdec.ops.speculative import (VerifyResult, chain_speculative_sampling, verify_tree_greedy,
                                     verify_tree_sampling)
from forkdec.ops.xquant import xquant_attention

__all__ = ["append_kv", "attention", "cascade_attention", "CascadeLevel", "CascadePlan",
           "chain_speculative_sampling", "merge_state", "merge_states", "sample", "softmax", "verify_tree_greedy",
           "verify_tree_sampling", "VerifyResult", "xquant_attention"]
