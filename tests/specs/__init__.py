"""Harness specs, one module per op family; importing this package registers them."""
from specs import attention, layer_ops, qlinear, sampling, softmax, speculative, xquant  # noqa: F401
