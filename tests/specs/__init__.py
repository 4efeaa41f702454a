"""Harness specs, one module per op family; importing this package registers them."""
from specs import attention, layer_ops, sampling, softmax, speculative, xquant  # noqa: F401
