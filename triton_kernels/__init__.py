"""Triton kernels of forkdec (CUDA tensors, or CPU tensors under TRITON_INTERPRET=1)."""
