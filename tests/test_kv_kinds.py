"""Cache kind names and the exact memory accounting formulas (no model needed)."""
from __future__ import annotations

import pytest
import torch

from forkdec.models.config import ModelConfig
from forkdec.xquant.accounting import bytes_held, bytes_per_token, fp16_fraction, stream_widths, window_tokens
from forkdec.xquant.kinds import kind_names, parse_kind

SMOL = ModelConfig("llama", vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9,
                   num_kv_heads=3, head_dim=64)


def test_every_listed_kind_parses_with_defaults():
    names = kind_names()
    assert len(names) == 17 and len(set(names)) == 17
    for name in names:
        k = parse_kind(name)
        assert k.name == name
        if k.quantized:
            assert (k.group_size, k.residual) == (64, 128)


@pytest.mark.parametrize("name,family,bits,group,residual", [
    ("xquant-4", "xquant", 4, 64, 128), ("xquant-latent-3-g32", "xquant-latent", 3, 32, 128),
    ("xquant-cl-2-r0", "xquant-cl", 2, 64, 0), ("kivi-4-g128-r256", "kivi", 4, 128, 256),
    ("xquant-latent-8-r64-g32", "xquant-latent", 8, 32, 64)])
def test_parse_fields(name, family, bits, group, residual):
    k = parse_kind(name)
    assert (k.family, k.bits, k.group_size, k.residual) == (family, bits, group, residual)
    assert k.page_size() % group == 0 and k.residual % k.page_size() == 0


def test_fp_kinds_carry_their_dtype():
    assert parse_kind("bf16").dtype == torch.bfloat16 and not parse_kind("fp32").quantized


@pytest.mark.parametrize("bad", ["fp8", "xquant", "xquant-5", "kivi-8", "xquant-cl-8", "xquant-4-g16",
                                 "xquant-4-r100", "xquant-4-g32-g64", "kivi-4-x3", "XQUANT-4", "",
                                 "xquant-latent-3-k0", "xquant-latent-3-k96", "xquant-latent-3-g32-k48",
                                 "xquant-4-k64", "kivi-2-k64", "xquant-latent-2-k64-k32",
                                 "xquant-latent-2-v64", "xquant-latent-2-k64-v0", "xquant-latent-2-k64-v96"])
def test_unknown_or_unsupported_kinds_name_kv(bad):
    with pytest.raises(ValueError, match=r"^kv: "):
        parse_kind(bad)


def test_group_that_does_not_divide_a_token_stream_names_kv():
    # latent V and KIVI V are grouped per token over Hkv*D = 192 channels: 128 does not divide it
    for name in ("xquant-latent-4-g128", "kivi-4-g128"):
        with pytest.raises(ValueError, match=r"^kv: .*192 wide"):
            stream_widths(parse_kind(name), SMOL)
    assert stream_widths(parse_kind("xquant-4-g128"), SMOL) == [("x", 576, "channel")]  # channel groups: fine


def test_window_tokens_follow_the_flush_rule():
    k = parse_kind("xquant-4")  # R 128, pages of 64: flushed a page at a time once R + 64 are in the window
    assert [window_tokens(k, n, 64) for n in (0, 100, 191, 192, 193, 255, 256, 2048)] == \
        [0, 100, 191, 128, 129, 191, 128, 128]
    assert window_tokens(parse_kind("kivi-2-r0"), 130, 64) == 2


def test_bytes_per_token_by_hand():
    # fp16 K/V: 30 layers x (K + V) x 192 x 2 bytes
    assert bytes_per_token("fp16", SMOL, 2048) == 23040
    assert bytes_per_token("fp32", SMOL, 2048) == 46080
    # latents 4-bit g64, no window: 2 streams x (192 x 4/8 codes + 192/64 x 4 scale/zero) x 30 layers
    assert bytes_per_token("xquant-latent-4-r0", SMOL, 2048) == 30 * 2 * (96 + 12)
    # raw X 2-bit g32 over 576: 144 code bytes + 72 scale/zero bytes per token and layer
    assert bytes_per_token("xquant-2-g32-r0", SMOL, 2048) == 30 * (144 + 72)
    # a window of 128 fp16 tokens over 2048 tokens: 1920 quantized + 128 x 2 x 384 x 30 window bytes
    expect = 30 * (1920 * 2 * (96 + 12) + 128 * 384 * 2) / 2048
    assert bytes_per_token("xquant-latent-4", SMOL, 2048) == pytest.approx(expect, rel=1e-12)
    assert fp16_fraction("xquant-latent-4", SMOL, 2048) == pytest.approx(expect / 23040, rel=1e-12)


def test_partial_pages_are_counted_whole():
    # fp16 kind with 16-token pages: 17 tokens hold 2 pages
    assert bytes_held("fp16", SMOL, 17, page_size=16) == 32 * 23040
    # a quantized kind short of its window keeps every token in 64-token window pages
    assert bytes_held("kivi-4", SMOL, 10) == 64 * 30 * 2 * 192 * 2


def test_accounting_rejects_bad_context():
    with pytest.raises(ValueError, match=r"^context_len: "):
        bytes_per_token("fp16", SMOL, 0)


def test_latent_rank_parses_and_defaults_to_full():
    k = parse_kind("xquant-latent-3-k96-g32-r0")
    assert (k.rank, k.bits, k.group_size, k.residual) == (96, 3, 32, 0)
    assert parse_kind("xquant-latent-3").rank == 0 and k.rank_v == 96
    kv = parse_kind("xquant-latent-2-k128-v64-cal")
    assert (kv.rank, kv.rank_v, kv.calibrated) == (128, 64, True)
    assert [w for _, w, _ in stream_widths(kv, SMOL)] == [128, 64]
    assert [w for _, w, _ in stream_widths(k, SMOL)] == [96, 96]
    assert [w for _, w, _ in stream_widths(parse_kind("xquant-latent-3-k192"), SMOL)] == [192, 192]


def test_latent_rank_above_the_kv_width_names_kv():
    with pytest.raises(ValueError, match=r"^kv: .*rank 256 exceeds the KV width 192"):
        stream_widths(parse_kind("xquant-latent-2-k256"), SMOL)
    with pytest.raises(ValueError, match=r"^kv: .*rank 256 exceeds"):
        stream_widths(parse_kind("xquant-latent-2-k64-v256"), SMOL)


def test_latent_rank_bytes_by_hand():
    # rank 96, 2-bit g32, no window: 2 streams x (96 x 2/8 codes + 96/32 x 4 scale/zero) x 30 layers
    assert bytes_per_token("xquant-latent-2-k96-g32-r0", SMOL, 2048) == 30 * 2 * (24 + 12)
    assert fp16_fraction("xquant-latent-2-k96-g32-r0", SMOL, 2048) == pytest.approx(72 / 768, rel=1e-12)
    # rank 64, 3-bit g64, window 128: 1920 quantized tokens + 128 fp16 tokens of 2 x 64 latents
    expect = 30 * (1920 * 2 * (24 + 4) + 128 * 2 * 64 * 2) / 2048
    assert bytes_per_token("xquant-latent-3-k64", SMOL, 2048) == pytest.approx(expect, rel=1e-12)
    # K rank 128, V rank 64, 2-bit g64, no window: (128 + 64) x (2/8 + 4/64) bytes per layer
    assert bytes_per_token("xquant-latent-2-k128-v64-r0-cal", SMOL, 2048) == 30 * (32 + 8 + 16 + 4)
    # K rank 53 (any width on the channel axis): 53 x 2/8 = 13.25 code bytes and 53 x 4/64 scale/zero
    # bytes per token are fractional; whole 64-token pages hold 848 + 212 bytes
    assert bytes_per_token("xquant-latent-2-k53-v192-r0", SMOL, 2048) == 30 * (53 + 192) * (2 / 8 + 4 / 64)
