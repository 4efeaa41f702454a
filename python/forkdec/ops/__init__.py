"""forkdec ops: validated Python faces over the `torch.ops.forkdec` kernels."""
from forkdec.ops.attention import (CascadeLevel, append_kv, attention, cascade_attention, merge_state,
                                   merge_states)
from forkdec.ops.cascade_plan import CascadePlan
from forkdec.ops.layer_ops import add_rms_norm, rms_norm, rope_qkv, silu_and_mul
from forkdec.ops import llama_layers as _llama_layers  # noqa: F401  (registers the op's fake)
from forkdec.ops.qlinear import QuantizedWeight, qlinear
from forkdec.ops.sampling import SampleOutput, sample, sample_with_logprobs
from forkdec.ops.softmax import softmax
from forkdec.ops.speculative import (VerifyResult, chain_speculative_sampling, verify_tree_greedy,
                                     verify_tree_sampling)
from forkdec.ops.xquant import xquant_attention

__all__ = ["add_rms_norm", "append_kv", "attention", "cascade_attention", "CascadeLevel", "CascadePlan",
           "chain_speculative_sampling", "merge_state", "merge_states", "qlinear", "QuantizedWeight", "rms_norm",
           "rope_qkv", "sample", "sample_with_logprobs", "SampleOutput", "silu_and_mul", "softmax", "verify_tree_greedy",
           "verify_tree_sampling", "VerifyResult", "xquant_attention"]
