"""Small, valid sample arguments for every torch.ops.forkdec op (CPU and Triton),
shared by tests/test_opcheck.py and tests/test_compile_ops.py.

`samples()` yields (case id, op name, args). Shapes are small so that the Triton
ops stay quick under the interpreter; some inputs are non-contiguous views so
that a fake implementation whose strides differ from the real op's is caught.
"""
from __future__ import annotations

import torch

from forkdec.xquant.pages import QuantizedPages  # noqa: F401  (documents the page layout used below)


def _g(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _i32(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int32)


def _attention(dtype, g, non_contiguous: bool, mask: bool):
    hq, hkv, d, ps = 4, 2, 32, 4
    q = torch.randn(hq, 3, d, generator=g).to(dtype).transpose(0, 1) if non_contiguous else \
        torch.randn(3, hq, d, generator=g).to(dtype)
    k = torch.randn(4, ps, hkv, d, generator=g).to(dtype)
    v = torch.randn(4, ps, hkv, d, generator=g).to(dtype)
    qo, kv, idx, last = _i32([0, 1, 3]), _i32([0, 2, 3]), _i32([0, 1, 3]), _i32([3, 2])
    custom = None
    if mask:  # qo_len * kv_len per request: 1 * 7 + 2 * 2
        custom = torch.rand(11, generator=g) < 0.7
    return q, qo, k, v, kv, idx, last, not mask, custom, 0.17


def _cascade(dtype, g):
    q, qo, k, v, kv, idx, last, _, _, scale = _attention(dtype, g, True, False)
    shared = (_i32([0, 3]), _i32([0, 1]), _i32([2]), _i32([4]))
    return (q, k, v, [shared[0], qo], [shared[1], kv], [shared[2], idx], [shared[3], last], [False, True],
            [None, None], scale)


def _tree(g, vocab=12):
    tokens, parents, indptr = _i32([3, 5, 7, 1, 2]), _i32([-1, 0, 0, -1, 0]), _i32([0, 3, 5])
    logits = torch.randn(7, vocab, generator=g)
    logits[0, 3] = 10.0  # the root's argmax accepts node 0 of the first tree
    return tokens, parents, indptr, logits


def _xquant(g):
    hq, hkv, d, ps, w = 4, 2, 32, 4, 16
    q = torch.randn(3, hq, d, generator=g)
    xk = torch.randn(4, ps, w, generator=g)
    xv = torch.randn(4, ps, w, generator=g)
    wk = torch.randn(w, hkv * d, generator=g) / 4
    wv = torch.randn(w, hkv * d, generator=g) / 4
    pos = torch.arange(16, dtype=torch.float32)[:, None] * torch.linspace(0.01, 1.0, d // 2)[None]
    cos = torch.cat([pos.cos(), pos.cos()], -1)
    sin = torch.cat([pos.sin(), pos.sin()], -1)
    return (q, _i32([0, 1, 3]), xk, None, None, 0, 0, 0, w, xv, None, None, 0, 0, 0, w, ps, _i32([0, 2, 3]),
            _i32([0, 1, 3]), _i32([3, 2]), _i32([0, 4]), wk, wv, None, None, cos, sin, True, None, 0.17)


def _qlinear(g):
    """x [3, 64] (a non-contiguous view) times a random Q4_1-shaped packed weight [5, 64], with a bias."""
    from forkdec.qweight import TILE, QuantizedWeight
    n, k = 5, 64  # one tile of 16 features, 11 of them padding; 2 blocks of 256 code bytes
    codes = torch.randint(0, 256, (1, k // 32 * TILE * 16), generator=g, dtype=torch.uint8)
    w = QuantizedWeight(codes, (torch.rand(1, k // 32 * TILE, generator=g) * 0.01).half(),
                        (torch.randn(1, k // 32 * TILE, generator=g) * 0.01).half(), 4, k, "Q4_1", n)
    x = torch.randn(k, 3, generator=g).t()
    return (x, w.codes, w.scale, w.offset, w.bits, w.k, w.n, torch.randn(n, generator=g), None)


def _llama_layers(g):
    """Two layers (hidden 32, 2 q heads and 1 kv head of 32, intermediate 32) on a paged cache of 2
    pages of 4: layer 0 on random Q4_1-shaped blocks without a qkv bias, layer 1 dense with one;
    two requests of one new token each (slots 1 and 5), one cascade level."""
    from forkdec.qweight import TILE
    hidden, hq, hkv, d, inter = 32, 2, 1, 32, 32

    def blocks(n, k):
        tiles = -(-n // TILE)
        return [torch.randint(0, 256, (tiles, k // 32 * TILE * 16), generator=g, dtype=torch.uint8),
                (torch.rand(tiles, k // 32 * TILE, generator=g) * 0.05).half(),
                (torch.randn(tiles, k // 32 * TILE, generator=g) * 0.05).half()]

    def dense(n, k):
        return [torch.randn(n, k, generator=g) / 8, torch.empty(0), torch.empty(0)]

    qkv_n = (hq + 2 * hkv) * d
    weights = []
    for make, bias in ((blocks, torch.empty(0)), (dense, torch.randn(qkv_n, generator=g))):
        weights += [torch.rand(hidden, generator=g) + 0.5, torch.rand(hidden, generator=g) + 0.5, bias]
        weights += make(qkv_n, hidden) + make(hidden, hq * d) + make(2 * inter, hidden) + make(hidden, inter)
    caches = [torch.randn(2, 4, hkv, d, generator=g) for _ in range(4)]
    angles = torch.rand(2, d // 2, generator=g)
    return (torch.randn(2, hidden, generator=g), angles.cos(), angles.sin(), weights, [4, 4, 4, 4, 0, 0, 0, 0],
            hq, hkv, 1e-5, caches[:2], caches[2:], torch.tensor([1, 5]), [_i32([0, 1, 2])], [_i32([0, 1, 2])],
            [_i32([0, 1])], [_i32([2, 2])], [False], [None], 0.25)


def samples(triton: bool) -> list[tuple[str, str, tuple]]:
    """(id, op name, args) for every op of one family (CPU ops, or the *_triton ops)."""
    g = _g(0)
    sfx = "_triton" if triton else ""
    out: list[tuple[str, str, tuple]] = []
    x = torch.randn(3, 17, generator=g)
    out.append(("softmax", "softmax" + sfx, (x, -1, 0.7, None)))
    out.append(("softmax-rows", "softmax" + sfx, (x.t(), 0, 1.0, torch.rand(3, generator=g) + 0.5)))
    if not triton:
        out.append(("softmax_three_pass", "softmax_three_pass", (x, -1, 0.7, None)))
    for dtype in (torch.float32, torch.bfloat16):
        name = str(dtype).split(".")[-1]
        out.append((f"attention-{name}", "attention" + sfx, _attention(dtype, g, True, False)))
    out.append(("attention-mask", "attention" + sfx, _attention(torch.float32, g, False, True)))
    out.append(("cascade_attention", "cascade_attention" + sfx, _cascade(torch.float32, g)))
    o = torch.randn(3, 4, 2, 32, generator=g).permute(0, 2, 1, 3)  # [T, n, H, D], non-contiguous
    lse = torch.randn(3, 2, 4, generator=g)
    out.append(("merge_states", "merge_states" + sfx, (o, lse)))
    o_a = torch.randn(4, 3, 32, generator=g).transpose(0, 1)  # [T, H, D], non-contiguous
    out.append(("merge_state", "merge_state" + sfx, (o_a, torch.randn(3, 4, generator=g),
                                                     torch.randn(3, 4, 32, generator=g),
                                                     torch.randn(3, 4, generator=g))))
    cache = torch.zeros(3, 4, 2, 32)
    out.append(("append_kv", "append_kv" + sfx, (cache, cache.clone(), torch.randn(2, 2, 32, generator=g),
                                                 torch.randn(2, 2, 32, generator=g), torch.tensor([5, 0]))))
    logits = torch.randn(3, 20, generator=g)
    out.append(("sample", "sample" + sfx, (logits, torch.rand(3, generator=g), None, 0.8, None, 5, None, 0.9, None,
                                           0.0, None)))
    out.append(("sample-rows", "sample" + sfx, (logits, torch.rand(4, generator=g), torch.tensor([0, 0, 2, 1]), 1.0,
                                                torch.tensor([1.0, 0.5, 0.0, 2.0]), 0, torch.tensor([0, 3, 0, 7]),
                                                1.0, None, 0.0, torch.tensor([0.0, 0.1, 0.0, 0.0]))))
    out.append(("sample_with_logprobs", "sample_with_logprobs" + sfx,
                (logits, torch.rand(4, generator=g), torch.tensor([0, 0, 2, 1]), 0.8, None, 0,
                 torch.tensor([0, 3, 0, 7]), 0.9, None, 0.0, None, 5)))
    out.append(("qlinear", "qlinear" + sfx, _qlinear(g)))
    if not triton:
        out.append(("llama_layers", "llama_layers", _llama_layers(g)))
    tokens, parents, indptr, tree_logits = _tree(g)
    out.append(("verify_tree_greedy", "verify_tree_greedy" + sfx, (tokens, parents, indptr, tree_logits, 2)))
    probs = torch.softmax(tree_logits, -1)
    draft = torch.softmax(torch.randn(7, 12, generator=g), -1)
    out.append(("verify_tree_sampling", "verify_tree_sampling" + sfx,
                (tokens, parents, indptr, draft, probs, torch.rand(7, generator=g, dtype=torch.float64), 2, True)))
    out.append(("xquant_attention", "xquant_attention" + sfx, _xquant(g)))
    h = torch.randn(3, 64, generator=g)
    w = torch.randn(64, generator=g)
    if triton:
        out.append(("add_rms_norm", "add_rms_norm_triton", (h, torch.randn(3, 64, generator=g), w, 1e-5)))
        out.append(("rms_norm", "add_rms_norm_triton", (h, None, w, 1e-5)))
    else:
        out.append(("rms_norm", "rms_norm", (h, w, 1e-5)))
        out.append(("add_rms_norm", "add_rms_norm", (h, torch.randn(3, 64, generator=g), w, 1e-5)))
    qkv = torch.randn(3, (4 + 2 * 2) * 16, generator=g)
    angles = torch.rand(3, 8, generator=g)
    out.append(("rope_qkv", "rope_qkv" + sfx, (qkv, angles.cos(), angles.sin(), 4, 2)))
    out.append(("silu_and_mul", "silu_and_mul" + sfx, (torch.randn(3, 2, 48, generator=g),)))
    return out


def op(name: str):
    return getattr(torch.ops.forkdec, name).default
