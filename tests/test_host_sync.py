"""No host synchronisation per layer on the Triton backend.

A decode step's attention metadata needs the host once for tight work lists
(the requests' lengths): the CascadePlan reads them at construction and every
layer's run reuses them. Without a plan, attention and xquant_attention launch
without reading anything back (grids sized from host-known bounds). On CUDA the tests count the
synchronising calls torch reports (torch.cuda.set_sync_debug_mode); on the CPU
they count the calls that would copy device data to the host (.cpu(), .item(),
.tolist(), int()/float()/bool() of a tensor) with the kernel launches recorded
instead of run (the interpreter itself copies tensors around).
"""
from __future__ import annotations

import contextlib
import importlib.util
import math
import os
import warnings

import pytest
import torch

import forkdec.ops as ops
import forkdec.validation
from forkdec.ops.xquant import page_args
from forkdec.testing import random_forest
from forkdec.xquant.pages import QuantizedPages

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")

needs_interpreter = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                       reason="the CPU counts need the triton backend on CPU tensors (the interpreter; "
                                              "with a GPU, test_no_sync_per_layer_on_cuda counts instead)")

READS = ("cpu", "item", "tolist", "__int__", "__float__", "__bool__", "__index__")


@contextlib.contextmanager
def count_host_reads():
    """Counts calls of the Tensor methods that read data back to the host."""
    calls: list[str] = []
    saved = {name: getattr(torch.Tensor, name) for name in READS}

    def wrap(name, fn):
        def counted(self, *args, **kwargs):
            calls.append(name)
            return fn(self, *args, **kwargs)
        return counted

    for name, fn in saved.items():
        setattr(torch.Tensor, name, wrap(name, fn))
    try:
        yield calls
    finally:
        for name, fn in saved.items():
            setattr(torch.Tensor, name, fn)


@contextlib.contextmanager
def count_cuda_syncs():
    """Counts the synchronising CUDA calls (device-to-host copies among them) torch warns about."""
    torch.cuda.synchronize()
    previous = torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            calls: list = []
            yield calls
        finally:
            torch.cuda.set_sync_debug_mode(previous)
    calls.extend(str(w.message) for w in caught if "synchroniz" in str(w.message))


def _forest(device):
    f = random_forest([30, 11], [[9, 4, 6], [5, 7]], [[1, 1, 1], [1, 1]], page_size=4, hq=6, hkv=2, d=32,
                      generator=torch.Generator().manual_seed(0), with_flat=False)
    levels = [ops.CascadeLevel(*(t.to(device) for t in (lv.qo_indptr, lv.kv_indptr, lv.kv_indices,
                                                         lv.kv_last_page_len)), lv.causal,
                               None if lv.custom_mask is None else lv.custom_mask.to(device)) for lv in f.levels]
    return f.q.to(device), f.k_cache.to(device), f.v_cache.to(device), levels


def _xquant_args(device, d=32):
    g = torch.Generator().manual_seed(1)
    page, width, hkv = 16, 64, 2
    x = QuantizedPages.empty(6, page, width, 4, 32, "token")
    x.write(0, torch.randn(page, width, generator=g))
    qo = torch.tensor([0, 3, 4], dtype=torch.int32)
    indptr = torch.tensor([0, 2, 5], dtype=torch.int32)
    idx = torch.arange(5, dtype=torch.int32)
    last = torch.tensor([7, 16], dtype=torch.int32)
    q = torch.randn(4, 4, d, generator=g)
    w = torch.randn(width, hkv * d, generator=g) / math.sqrt(width)
    cos = torch.randn(100, d, generator=g)
    args = (q, qo, *page_args(x), *page_args(x), page, indptr, idx, last, torch.zeros(2, dtype=torch.int32), w, w,
            None, None, cos, cos, False, None, 0.2)
    return tuple(a.to(device) if isinstance(a, torch.Tensor) else a for a in args)


@needs_interpreter
def test_cascade_plan_reads_the_host_once_per_step_not_per_layer():
    from forkdec.testing_triton_compile import record_launches
    q, k, v, levels = _forest("cpu")
    with count_host_reads() as at_plan:
        plan = ops.CascadePlan(levels, num_pages=k.shape[0], page_size=k.shape[1], total_q=q.shape[0],
                               backend="triton")
    assert "cpu" in at_plan  # the step's one read (a no-op copy here): the counter sees it
    with record_launches([]) as launches:
        plan.run(q, k, v)  # layer 0 plans the work lists for these head shapes (from the host copy)
        with count_host_reads() as per_layer:
            for _ in range(3):
                plan.run(q, k, v)
    assert launches and per_layer == [], per_layer


@needs_interpreter
def test_unplanned_attention_launches_read_nothing_back():
    """Without a plan the launchers plan on the device (a padded work list)."""
    from forkdec.testing_triton_compile import record_launches
    from forkdec.triton_kernels.attention import attention, cascade_attention
    q, k, v, levels = _forest("cpu")
    lists = [[getattr(lv, f) for lv in levels] for f in ("qo_indptr", "kv_indptr", "kv_indices", "kv_last_page_len",
                                                          "causal", "custom_mask")]
    lv = levels[0]
    with record_launches([]) as launches, count_host_reads() as reads:
        cascade_attention(q, k, v, *lists, 0.2)
        attention(q, lv.qo_indptr, k, v, lv.kv_indptr, lv.kv_indices, lv.kv_last_page_len, False, None, 0.2)
    assert len(launches) >= 3 and reads == [], reads


@needs_interpreter
def test_a_counted_read_is_caught():
    """The counter sees a read: planning with the host lengths makes one."""
    from forkdec.triton_kernels.attention import LaunchPlan
    _, k, _, levels = _forest("cpu")
    with count_host_reads() as reads:
        LaunchPlan([(lv.qo_indptr, lv.kv_indptr, lv.kv_indices, lv.kv_last_page_len, lv.custom_mask)
                    for lv in levels], k.shape[1])
    assert reads == ["cpu"]


@needs_interpreter
def test_xquant_launch_reads_nothing_back():
    from forkdec.testing_triton_compile import record_launches
    from forkdec.triton_kernels.xquant import xquant_attention
    args = _xquant_args("cpu")
    with record_launches([]) as launches, count_host_reads() as reads:
        xquant_attention(*args)
    assert launches and reads == [], reads


@pytest.mark.skipif(not torch.cuda.is_available(), reason="counting device-to-host copies needs a CUDA device")
def test_no_sync_per_layer_on_cuda():
    q, k, v, levels = _forest("cuda")
    plan = ops.CascadePlan(levels, num_pages=k.shape[0], page_size=k.shape[1], total_q=q.shape[0],
                           backend="triton")
    plan.run(q, k, v)  # compiles the kernels and plans the work lists
    with count_cuda_syncs() as syncs:
        for _ in range(4):
            plan.run(q, k, v)
    assert syncs == [], syncs
    lv = levels[1]
    with forkdec.validation.validation(False), count_cuda_syncs() as syncs:  # validation reads the metadata
        ops.attention(q, lv.qo_indptr, k, v, lv.kv_indptr, lv.kv_indices, lv.kv_last_page_len, backend="triton")
    assert syncs == [], syncs
    args = _xquant_args("cuda")
    torch.ops.forkdec.xquant_attention_triton(*args)
    with count_cuda_syncs() as syncs:
        torch.ops.forkdec.xquant_attention_triton(*args)
    assert syncs == [], syncs
