"""Latent factors reproduce X·W exactly (before quantization) at rank = KV width."""
import torch

from forkdec.xquant.latent import latent_factors


def test_latent_factors_reconstruct_the_projection():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(576, 192, generator=g) / 24          # SmolLM2's Wk: hidden 576 -> 3 heads x 64
    down, up = latent_factors(w)
    assert down.shape == (576, 192) and up.shape == (192, 192)
    x = torch.randn(10, 576, generator=g)
    torch.testing.assert_close((x @ down) @ up, x @ w, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(down.T @ down, torch.eye(192), rtol=0, atol=1e-4)  # orthonormal columns
