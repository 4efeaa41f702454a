"""forkdec ops: validated Python faces over the `torch.ops.forkdec` kernels."""
from forkdec.ops.attention import (CascadeLevel, append_kv, attention, cascade_attention, merge_state,
                                   merge_states)
from forkdec.ops.sampling import sample
from forkdec.ops.softmax import softmax

__all__ = ["CascadeLevel", "append_kv", "attention", "cascade_attention", "merge_state", "merge_states", "sample", "softmax"]
