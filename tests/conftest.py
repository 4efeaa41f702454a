import os

import torch

# Without a GPU, Triton kernels run on CPU tensors in Triton's interpreter.
# It must be switched on before triton is first imported. With a GPU the
# harness (tests/harness.py) runs the Triton backend on CUDA tensors instead.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
