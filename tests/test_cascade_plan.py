"""CascadePlan: plan once, run per layer; equals cascade_attention, and checks what it must."""
import pytest
import torch

import forkdec
from forkdec.ops import CascadeLevel, CascadePlan
from forkdec.testing import random_forest


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("tree", [False, True])
def test_plan_run_equals_cascade_attention(backend, tree):
    g = torch.Generator().manual_seed(3)
    f = random_forest([40, 9], [[3, 6], [7]], [[2, 4], [5]], page_size=16, tree=tree, generator=g)
    plan = CascadePlan(f.levels, num_pages=f.k_cache.shape[0], page_size=16, total_q=f.q.shape[0], backend=backend)
    for layer in range(3):  # the same plan for every layer's q and caches
        q, k, v = f.q * (layer + 1), f.k_cache + layer, f.v_cache - layer
        out, lse = plan.run(q, k, v, return_lse=True)
        want, want_lse = forkdec.ops.cascade_attention(q, k, v, f.levels, return_lse=True, backend="reference")
        torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(lse, want_lse, rtol=1e-5, atol=1e-5)


def test_plan_validates_metadata_once_and_run_checks_shapes():
    g = torch.Generator().manual_seed(4)
    f = random_forest([20], [[3]], [[2]], page_size=4, generator=g)
    num_pages = f.k_cache.shape[0]
    bad = CascadeLevel(f.levels[0].qo_indptr, f.levels[0].kv_indptr, f.levels[0].kv_indices.clone() + num_pages,
                       f.levels[0].kv_last_page_len)
    with pytest.raises(ValueError, match=r"levels\[0\]\.kv_indices"):
        CascadePlan([bad] + f.levels[1:], num_pages=num_pages, page_size=4, total_q=f.q.shape[0])
    with pytest.raises(ValueError, match="levels"):
        CascadePlan([], num_pages=num_pages, page_size=4, total_q=f.q.shape[0])
    plan = CascadePlan(f.levels, num_pages=num_pages, page_size=4, total_q=f.q.shape[0])
    with pytest.raises(ValueError, match="q"):
        plan.run(f.q[:-1], f.k_cache, f.v_cache)
    with pytest.raises(ValueError, match="k_cache"):
        plan.run(f.q, f.k_cache[:-1], f.v_cache[:-1])
    with pytest.raises(ValueError, match="k_cache"):
        plan.run(f.q, f.k_cache.half(), f.v_cache.half())
