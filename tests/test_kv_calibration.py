"""Activation-calibrated latent ranks (`-kR-cal`): moments, optimality, the cache path."""
from __future__ import annotations

import pytest
import torch

from forkdec.cache import make_kv_cache
from forkdec.xquant.calibration import ATTR, calibrate, calibrated_factors, x_moments
from forkdec.xquant.kinds import parse_kind
from forkdec.xquant.weights import layer_weights, scaled_factors
from test_kv_cache import CFG, drive, tiny_model

HQ, HKV, D = CFG.num_heads, CFG.num_kv_heads, CFG.head_dim


def _wk(model, layer: int) -> torch.Tensor:
    return model.layers[layer].qkv[HQ * D:(HQ + HKV) * D].t().float()


def _err(w, down, up, c):
    """E‖x·w - x·down·up‖² for E[xᵀx] = c."""
    e = w.double() - down.double() @ up.double()
    return float(torch.trace(e.t() @ c @ e))


def test_moments_match_the_layer_inputs():
    # layer 0's input is rms_norm(embedding): computable here without the model's forward
    model = tiny_model()
    ids = torch.randint(0, 64, (90,), generator=torch.Generator().manual_seed(3))
    c = x_moments(model, ids, chunk=40)
    e = model.embed[ids].double()
    x = e * torch.rsqrt(e.pow(2).mean(-1, keepdim=True) + CFG.rms_norm_eps) * model.layers[0].attn_norm.double()
    torch.testing.assert_close(c[0], x.t() @ x / 90, rtol=1e-5, atol=1e-6)
    assert len(c) == CFG.num_layers and not torch.allclose(c[1], c[0])


@pytest.mark.parametrize("rank", [8, 32])
def test_calibrated_factors_beat_plain_truncation_on_their_data(rank):
    model = tiny_model()
    c = x_moments(model, torch.randint(0, 64, (200,), generator=torch.Generator().manual_seed(4)), chunk=100)[1]
    w = _wk(model, 1)
    down, up = calibrated_factors(w, rank, c)
    assert tuple(down.shape) == (128, rank) and tuple(up.shape) == (rank, 64)
    torch.testing.assert_close(up @ up.t(), torch.eye(rank), atol=1e-5, rtol=0)  # orthonormal rows
    assert _err(w, down, up, c) < 0.9 * _err(w, *scaled_factors(w, rank), c)


def test_identity_moment_is_plain_truncation():
    w = _wk(tiny_model(), 0)
    a, b = calibrated_factors(w, 16, torch.eye(128, dtype=torch.float64)), scaled_factors(w, 16)
    torch.testing.assert_close(a[0] @ a[1], b[0] @ b[1], atol=1e-4, rtol=1e-4)


def test_calibrated_cache_attends_over_what_it_must_hold():
    # the independent reconstruction in test_kv_cache, with the calibrated factors patched in
    model = tiny_model()
    calibrate(model, torch.randint(0, 64, (128,), generator=torch.Generator().manual_seed(5)))
    w = layer_weights(parse_kind("xquant-latent-3-k32-g32-r64-cal"), model.layers[0], CFG)
    assert getattr(model.layers[0], ATTR).shape == (128, 128)
    assert not torch.allclose(w.wk, layer_weights(parse_kind("xquant-latent-3-k32-g32-r64"), model.layers[0], CFG).wk)
    assert drive("xquant-latent-3-k32-g32-r64-cal", model=model) > 0


def test_uncalibrated_model_names_model():
    with pytest.raises(ValueError, match=r"^model: .*calibrate"):
        make_kv_cache("xquant-latent-2-k32-g32-cal", tiny_model(), 4)


@pytest.mark.parametrize("bad", ["xquant-latent-2-cal", "xquant-latent-2-cal-k32", "kivi-2-k32-cal"])
def test_cal_needs_a_latent_rank(bad):
    with pytest.raises(ValueError, match=r"^kv: "):
        parse_kind(bad)


def test_bad_arguments_are_named():
    w = _wk(tiny_model(), 0)
    with pytest.raises(ValueError, match=r"^rank: "):
        calibrated_factors(w, 65, torch.eye(128, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"^moment: "):
        calibrated_factors(w, 8, torch.eye(64, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"^tokens: "):
        x_moments(tiny_model(), [])
