"""Semantics of the speculative verification ops: greedy against a brute-force
path search, lossless sampling by statistical tests, randomness plumbing, bad
input. Backends agree exactly with the reference (tests/specs/speculative.py),
so the statistical tests run on the fastest backend available here."""
from __future__ import annotations


import pytest
import torch

import forkdec
import forkdec.tree
from forkdec.ops import chain_speculative_sampling, verify_tree_greedy, verify_tree_sampling
from specs.speculative import chain_inputs, greedy_inputs, sampling_inputs

FAST = "cpu" if "cpu" in forkdec.available_backends("verify_tree_sampling") else "reference"
EXACT_BACKENDS = [b for b in ("reference", "cpu") if b in forkdec.available_backends("verify_tree_sampling")]


# ---- greedy ------------------------------------------------------------------------

def brute_force_greedy(tokens, parents, indptr, logits):
    """Every root-to-node path; keep those whose tokens all equal the argmax at
    their parent; the longest wins, then the lexicographically smallest nodes."""
    out = []
    for b in range(indptr.numel() - 1):
        s, e = int(indptr[b]), int(indptr[b + 1])
        best = logits[s + b:e + b + 1].float().argmax(-1).tolist()
        paths = [[]]
        for i in range(e - s):
            path, j = [], i
            while j >= 0:
                path.append(j)
                j = int(parents[s + j])
            path.reverse()
            prev = [-1] + path[:-1]
            if all(int(tokens[s + node]) == best[p + 1] for node, p in zip(path, prev)):
                paths.append(path)
        chosen = min(paths, key=lambda p: (-len(p), p))
        last = chosen[-1] if chosen else -1
        out.append((chosen, [int(tokens[s + x]) for x in chosen], best[last + 1]))
    return out


@pytest.mark.parametrize("backend", EXACT_BACKENDS + ["triton"])
@pytest.mark.parametrize("seed", range(4))
def test_greedy_equals_brute_force(backend, seed):
    if backend not in forkdec.available_backends("verify_tree_greedy"):
        pytest.skip(f"backend {backend} is unavailable here")
    g = torch.Generator().manual_seed(seed)
    (tokens, parents, indptr, logits), _ = greedy_inputs([9, 1, 0, 14, 6], 6, torch.float32, g, match=0.8,
                                                         duplicate=0.5)
    res = verify_tree_greedy(tokens, parents, indptr, logits, backend=backend)
    lengths = []
    for b, (path, toks, bonus) in enumerate(brute_force_greedy(tokens, parents, indptr, logits)):
        k = len(path)
        lengths.append(k)
        assert int(res.num_accepted[b]) == k
        assert res.accepted_nodes[b, :k].tolist() == path and (res.accepted_nodes[b, k:] == -1).all()
        assert res.accepted_tokens[b, :k].tolist() == toks
        assert int(res.accepted_tokens[b, k]) == bonus == int(res.bonus_token[b])
        assert (res.accepted_tokens[b, k + 1:] == -1).all()
    assert max(lengths) >= 2, "the case should accept real paths"


def test_greedy_prefers_the_longer_of_duplicate_siblings():
    # root -> node 0 (token 1, a leaf) and node 1 (token 1) -> node 2 (token 2)
    parents = torch.tensor([-1, -1, 1], dtype=torch.int32)
    tokens = torch.tensor([1, 1, 2], dtype=torch.int32)
    indptr = torch.tensor([0, 3], dtype=torch.int32)
    logits = torch.full((4, 4), -1.0)
    logits[0, 1] = logits[2, 2] = logits[3, 3] = logits[1, 0] = 5  # rows: root, node 0, node 1, node 2
    for backend in EXACT_BACKENDS:
        res = verify_tree_greedy(tokens, parents, indptr, logits, backend=backend)
        assert res.accepted_nodes.tolist() == [[1, 2]] and res.accepted_tokens.tolist() == [[1, 2, 3]]


def test_greedy_argmax_ties_take_the_lowest_token():
    logits = torch.tensor([[0.0, 2.0, 2.0], [1.0, 1.0, 1.0]])
    parents, tokens = torch.tensor([-1], dtype=torch.int32), torch.tensor([1], dtype=torch.int32)
    for backend in EXACT_BACKENDS:
        res = verify_tree_greedy(tokens, parents, torch.tensor([0, 1], dtype=torch.int32), logits, backend=backend)
        assert res.accepted_tokens.tolist() == [[1, 0]] and res.num_accepted.tolist() == [1]


# ---- lossless sampling -----------------------------------------------------------------

V = 6
TRIALS = 20000  # one request per trial in a single call
P_MIN = 1e-4    # chi-square p-value under which the emitted distribution is declared wrong


def _table(g, sharpness=1.5, zero=None):
    """A [V + 1, V] table of distributions: row 0 after the root, row 1 + x after token x."""
    t = torch.softmax(torch.randn(V + 1, V, generator=g) * sharpness, -1)
    if zero is not None:
        t[:, zero] = 0
        t /= t.sum(-1, keepdim=True)
    return t


def chi_square_pvalue(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson's chi-square test of counts against probs; cells with zero
    probability must be empty (else p-value 0). Survival function of the
    chi-square distribution: the regularized upper incomplete gamma function."""
    counts, probs = counts.double().reshape(-1), probs.double().reshape(-1)
    if bool((counts[probs == 0] > 0).any()):
        return 0.0
    keep = probs > 0
    expected = probs[keep] * counts.sum()
    stat = ((counts[keep] - expected) ** 2 / expected).sum()
    df = int(keep.sum()) - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64), stat / 2))


def _run_tree(shape_parents, target_table, draft_table, seed, claimed_draft=None, backend=None):
    """TRIALS requests with the same tree shape: children drawn i.i.d. from the
    draft distribution after their parent's token (the root's context is row 0),
    the target likewise from its table. Returns (first token, second token) per
    trial (-1 if only one token was emitted in that trial... never: at least 2
    tokens come out whenever a node was accepted, else we add the next target draw)."""
    g = torch.Generator().manual_seed(seed)
    n = len(shape_parents)
    parents = torch.tensor(shape_parents * TRIALS, dtype=torch.int32)
    indptr = torch.arange(TRIALS + 1, dtype=torch.int32) * n
    context = torch.zeros(TRIALS, n + 1, dtype=torch.long)  # table row of each block row: 0 root, 1 + token
    tokens = torch.zeros(TRIALS, n, dtype=torch.int32)
    for i, par in enumerate(shape_parents):  # parents first: the context of node i's draw is known
        q = draft_table[context[:, par + 1]]
        tokens[:, i] = torch.multinomial(q, 1, generator=g).reshape(-1).to(torch.int32)
        context[:, i + 1] = tokens[:, i].long() + 1
    target = target_table[context].reshape(-1, V)
    draft = (claimed_draft if claimed_draft is not None else draft_table)[context].reshape(-1, V)
    res = verify_tree_sampling(tokens.reshape(-1), parents, indptr, draft, target, seed=seed + 1,
                               backend=backend or FAST)
    first = res.accepted_tokens[:, 0].long()
    # the second emitted token: accepted_tokens[:, 1] if a node was accepted, else a fresh target draw
    fresh = torch.multinomial(target_table[first + 1], 1, generator=g).reshape(-1)
    second = torch.where(res.num_accepted > 0, res.accepted_tokens[:, 1].long(), fresh)
    return first, second, res


def _check_lossless(first, second, target_table):
    p_first = chi_square_pvalue(torch.bincount(first, minlength=V), target_table[0])
    joint = target_table[0][:, None] * target_table[1:]  # P(x1) P(x2 | x1)
    p_joint = chi_square_pvalue(torch.bincount(first * V + second, minlength=V * V), joint)
    return p_first, p_joint


TREES = {
    "chain3": [-1, 0, 1],
    "branching_3x2": [-1, -1, -1, 0, 0, 1, 1, 2, 2],
    "wide_root_5": [-1, -1, -1, -1, -1, 0],
    "deep_and_wide": [-1, 0, 0, 1, -1, 4, 5, 5],
}


@pytest.mark.parametrize("tree", list(TREES))
@pytest.mark.parametrize("variant", ["correlated", "draft_misses_target_mass", "peaked_draft_repeats"])
def test_tree_sampling_is_lossless(tree, variant):
    g = torch.Generator().manual_seed(7)
    target = _table(g)
    if variant == "correlated":
        draft = torch.softmax(target.log() + torch.randn(V + 1, V, generator=g) * 0.7, -1)
    elif variant == "draft_misses_target_mass":  # q(0) = q(1) = 0 while p has mass there
        draft = _table(g, zero=0)
        draft[:, 1] = 0
        draft /= draft.sum(-1, keepdim=True)
    else:  # most draws of siblings repeat token 2
        draft = torch.full((V + 1, V), 0.04)
        draft[:, 2] = 0.8
    first, second, res = _run_tree(TREES[tree], target, draft, seed=11)
    p_first, p_joint = _check_lossless(first, second, target)
    assert p_first > P_MIN and p_joint > P_MIN, (p_first, p_joint)
    assert 0 < float((res.num_accepted > 0).float().mean()) < 1  # both paths of the algorithm taken


def test_the_statistic_catches_a_lossy_verifier():
    """Power check: tell the verifier the draft was the target (q = p) while the
    tokens really come from another q: everything is accepted and the output is
    distributed as q, which the same test must reject."""
    g = torch.Generator().manual_seed(7)
    target, draft = _table(g), _table(g)
    first, second, _ = _run_tree(TREES["branching_3x2"], target, draft, seed=11, claimed_draft=target)
    p_first, p_joint = _check_lossless(first, second, target)
    assert p_first < P_MIN and p_joint < P_MIN


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_tree_sampling_lossless_in_half_precision(dtype):
    g = torch.Generator().manual_seed(3)
    target = _table(g).to(dtype).float()  # the distribution the op actually sees
    target /= target.sum(-1, keepdim=True)
    draft = torch.softmax(target.log() + torch.randn(V + 1, V, generator=g), -1)
    first, second, _ = _run_tree(TREES["branching_3x2"], target.to(dtype), draft.to(dtype), seed=5)
    # the op renormalizes nothing at the root: compare with the rounded rows, renormalized
    p_first, p_joint = _check_lossless(first, second, target)
    assert p_first > P_MIN and p_joint > P_MIN, (p_first, p_joint)


def test_chain_sampling_is_lossless():
    g = torch.Generator().manual_seed(21)
    target = _table(g)
    draft = torch.softmax(target.log() + torch.randn(V + 1, V, generator=g), -1)
    draft[:, 4] = 0  # the draft never proposes 4
    draft /= draft.sum(-1, keepdim=True)
    length = 3
    tokens = torch.zeros(TRIALS, length, dtype=torch.int32)
    ctx = torch.zeros(TRIALS, length + 1, dtype=torch.long)
    for i in range(length):
        tokens[:, i] = torch.multinomial(draft[ctx[:, i]], 1, generator=g).reshape(-1).to(torch.int32)
        ctx[:, i + 1] = tokens[:, i].long() + 1
    out, num = chain_speculative_sampling(tokens, draft[ctx[:, :length]], target[ctx], seed=2, backend=FAST)
    first = out[:, 0].long()
    fresh = torch.multinomial(target[first + 1], 1, generator=g).reshape(-1)
    second = torch.where(num > 0, out[:, 1].long(), fresh)
    p_first, p_joint = _check_lossless(first, second, target)
    assert p_first > P_MIN and p_joint > P_MIN, (p_first, p_joint)
    assert set(num.tolist()) == set(range(length + 1))  # every acceptance length occurs
    # tokens after the last emitted one are -1
    cols = torch.arange(length + 1)[None]
    assert bool(((out >= 0) == (cols <= num[:, None])).all())


def test_chain_equals_tree_of_a_chain():
    g = torch.Generator().manual_seed(4)
    (tokens, q, p), _ = chain_inputs(3, 4, 9, torch.float32, g)
    out, num = chain_speculative_sampling(tokens, q, p, seed=5, backend="reference")
    batch, length, vocab = q.shape
    q_rows = torch.cat([q, torch.zeros(batch, 1, vocab)], 1)  # tree layout: a row per node (the leaf's unused)
    q_rows[:, -1, 0] = 1
    tree = verify_tree_sampling(tokens.reshape(-1), torch.arange(-1, length - 1, dtype=torch.int32).repeat(batch),
                                torch.arange(batch + 1, dtype=torch.int32) * length, q_rows.reshape(-1, vocab),
                                p.reshape(-1, vocab), seed=5, backend="reference")
    assert torch.equal(out, tree.accepted_tokens) and torch.equal(num, tree.num_accepted)


# ---- randomness plumbing --------------------------------------------------------------------

def test_seed_generator_and_uniforms_give_the_same_draws():
    g = torch.Generator().manual_seed(0)
    args, _ = sampling_inputs([6, 3], 9, torch.float32, g)
    a = verify_tree_sampling(*args, seed=17, backend=FAST)
    b = verify_tree_sampling(*args, generator=torch.Generator().manual_seed(17), backend=FAST)
    u = torch.rand(args[1].numel() + 2, dtype=torch.float64, generator=torch.Generator().manual_seed(17))
    c = verify_tree_sampling(*args, uniforms=u, backend=FAST)
    for x, y, z in zip(a, b, c):
        assert torch.equal(x, y) and torch.equal(x, z)
    draws = {tuple(verify_tree_sampling(*args, seed=s, backend=FAST).accepted_tokens.reshape(-1).tolist())
             for s in range(20)}
    assert len(draws) > 1, "different seeds should give different draws"


def test_uniform_extremes_accept_and_reject_everything():
    # u = 0 accepts any child with p(x) > 0; u just below 1 rejects children with p(x) < q(x)
    parents = torch.tensor([-1, 0], dtype=torch.int32)
    tokens = torch.tensor([1, 2], dtype=torch.int32)
    indptr = torch.tensor([0, 2], dtype=torch.int32)
    p = torch.tensor([[0.2, 0.3, 0.5], [0.1, 0.1, 0.8], [1.0, 0.0, 0.0]])
    q = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]])
    for backend in EXACT_BACKENDS:
        zero = torch.zeros(3, dtype=torch.float64)
        res = verify_tree_sampling(tokens, parents, indptr, q, p, uniforms=zero, backend=backend)
        assert res.accepted_tokens.tolist() == [[1, 2, 0]]  # bonus from node 1's row: only token 0
        high = torch.full((3,), 0.999, dtype=torch.float64)
        res = verify_tree_sampling(tokens, parents, indptr, q, p, uniforms=high, backend=backend)
        # 0.999 * 1.0 >= 0.3: node 0 rejected; residual max(p - q, 0) = [0.2, 0, 0.5] -> u = 0.999 draws token 2
        assert res.accepted_tokens.tolist() == [[2, -1, -1]] and res.num_accepted.tolist() == [0]


# ---- bad input ------------------------------------------------------------------------------

def _good():
    g = torch.Generator().manual_seed(1)
    return sampling_inputs([4, 3], 7, torch.float32, g)[0]


@pytest.mark.parametrize("change,arg", [
    (lambda a: a.__setitem__(1, torch.tensor([-1, 1, 0, 0, -1, 0, 1], dtype=torch.int32)), "parents"),  # parent == self
    (lambda a: a.__setitem__(1, torch.tensor([-1, 0, -2, 0, -1, 0, 1], dtype=torch.int32)), "parents"),
    (lambda a: a.__setitem__(1, torch.tensor([-1, 0, 0, 0, -1, 0, 5], dtype=torch.int32)), "parents"),  # other tree
    (lambda a: a.__setitem__(2, torch.tensor([0, 4, 8], dtype=torch.int32)), "tree_indptr"),
    (lambda a: a.__setitem__(2, torch.tensor([0, 5, 4, 7], dtype=torch.int32)), "tree_indptr"),
    (lambda a: a.__setitem__(2, torch.tensor([1, 4, 7], dtype=torch.int32)), "tree_indptr"),
    (lambda a: a.__setitem__(0, a[0][:-1]), "draft_tokens"),
    (lambda a: a.__setitem__(0, a[0] + 7), "draft_tokens"),
    (lambda a: a.__setitem__(3, a[3][:-1]), "draft_probs"),
    (lambda a: a.__setitem__(3, a[3][:, :-1]), "draft_probs"),  # V mismatch
    (lambda a: a.__setitem__(4, a[4][:-1]), "target_probs"),
    (lambda a: a[4].__setitem__((0, 0), -0.1), "target_probs"),
    (lambda a: a[4].__setitem__((0, 0), float("nan")), "target_probs"),
    (lambda a: a[3].__setitem__((2, 1), 3.0), "draft_probs"),
    (lambda a: a.__setitem__(4, a[4].to(torch.int64)), "target_probs"),
])
def test_bad_input_names_the_argument(change, arg):
    args = list(_good())
    change(args)
    with pytest.raises(ValueError, match=f"^{arg}:"):
        verify_tree_sampling(*args, seed=0)


def test_bad_randomness_and_depth_arguments():
    args = _good()
    with pytest.raises(ValueError, match="^seed:"):
        verify_tree_sampling(*args, seed=1, generator=torch.Generator())
    with pytest.raises(ValueError, match="^uniforms:"):
        verify_tree_sampling(*args, uniforms=torch.full((9,), 1.0, dtype=torch.float64))
    with pytest.raises(ValueError, match="^uniforms:"):
        verify_tree_sampling(*args, uniforms=torch.zeros(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="^max_depth:"):
        verify_tree_sampling(*args, seed=0, max_depth=0)
    tokens, parents, indptr, _, target = args
    with pytest.raises(ValueError, match="^target_logits:"):
        verify_tree_greedy(tokens, parents, indptr, torch.full_like(target, float("nan")))


def test_bad_chain_input_names_the_argument():
    tokens = torch.zeros(2, 3, dtype=torch.int32)
    q = torch.full((2, 3, 5), 0.2)
    p = torch.full((2, 4, 5), 0.2)
    chain_speculative_sampling(tokens, q, p, seed=0)
    for args, arg in [((tokens, q, p[:, :3]), "target_probs"), ((tokens, q[:, :2], p), "draft_probs"),
                      ((tokens + 5, q, p), "draft_tokens"), ((tokens.float(), q, p), "draft_tokens"),
                      ((tokens, q * 2, p), "draft_probs")]:
        with pytest.raises(ValueError, match=f"^{arg}:"):
            chain_speculative_sampling(*args, seed=0)


def test_cpu_op_rejects_out_of_bounds_input_without_validation():
    if "cpu" not in forkdec.available_backends("verify_tree_sampling"):
        pytest.skip("the C++ extension is not built")
    tokens, parents, indptr, q, p = _good()
    assert int(forkdec.tree.node_depths(parents, indptr).max()) > 1
    u = torch.zeros(p.shape[0], dtype=torch.float64)
    for bad in [(tokens + 100, parents, indptr), (tokens, parents + 3, indptr)]:
        with pytest.raises(RuntimeError):
            torch.ops.forkdec.verify_tree_sampling(*bad, q, p, u, 8, True)
    with pytest.raises(RuntimeError, match="max_depth"):
        torch.ops.forkdec.verify_tree_sampling(tokens, parents, indptr, q, p, u, 1, True)


def test_ops_trace_under_torch_compile():
    if "cpu" not in forkdec.available_backends("verify_tree_sampling"):
        pytest.skip("the C++ extension is not built")
    args = _good()
    u = torch.rand(args[4].shape[0], dtype=torch.float64, generator=torch.Generator().manual_seed(0))

    def f(tokens, parents, indptr, q, p, u):
        return torch.ops.forkdec.verify_tree_sampling(tokens, parents, indptr, q, p, u, 4, True)

    compiled = torch.compile(f, fullgraph=True, backend="eager")
    for x, y in zip(compiled(*args, u), f(*args, u)):
        assert torch.equal(x, y)


def test_triton_agrees_on_a_random_forest():
    if "triton" not in forkdec.available_backends("verify_tree_sampling"):
        pytest.skip("triton is unavailable here (not installed, or no GPU and TRITON_INTERPRET unset)")
    g = torch.Generator().manual_seed(8)
    args, kw = sampling_inputs([7, 0, 5, 9], 40, torch.float32, g)
    a = verify_tree_sampling(*args, **kw, backend="triton")
    b = verify_tree_sampling(*args, **kw, backend="reference")
    assert all(torch.equal(x, y) for x, y in zip(a, b))


# ---- benchmark plumbing (tiny sizes; the numbers live in bench/results) ------------------------

def test_speculative_verify_bench_writes_its_report(tmp_path):
    if forkdec._extension.load() is None:
        pytest.skip(f"C++ extension unavailable: {forkdec._extension.error()}")
    from forkdec.bench import speculative_verify

    assert speculative_verify.run(["--requests", "3", "--nodes", "5", "--vocab", "300", "--rounds", "1",
                                   "--reference-rounds", "1", "--no-proxy", "--out", str(tmp_path)]) == 0
    report = (tmp_path / "speculative_verify.md").read_text()
    assert "cpu ms" in report and "3 requests x 5-node" in report


def test_speculative_bench_ratios_pair_each_round_with_its_own_off_run():
    from types import SimpleNamespace

    from forkdec.bench import speculative

    rates = iter([100.0, 150.0, 50.0, 90.0, 200.0, 280.0])   # off, ngram per round: 1.5x, 1.8x, 1.4x

    class FakeEngine:
        def generate(self, prompt, n, params):
            rate = next(rates)
            self.last_stats = SimpleNamespace(generated_tokens=int(rate), decode_seconds=1.0, decode_steps=1,
                                              speculative_steps=0, tokens_per_path_step=1.0,
                                              draft_acceptance=0.0, draft_tokens=0)
            return [[SimpleNamespace(token_ids=[1])]]

    cells = speculative.run_cells(FakeEngine(), {"off": dict(speculate="off"), "ngram": dict(speculate="ngram")},
                                  "p", 1, 4, 0.0, rounds=3)
    assert cells["off"]["tok_s"] == 100.0 and cells["ngram"]["tok_s"] == 150.0   # median runs
    assert cells["ngram"]["vs_off"] == pytest.approx((1.4, 1.5, 1.8))          # not 150 / 100 of medians alone
    assert speculative.ratio_cell(cells["ngram"]) == "1.50x (1.40-1.80)" and "vs_off" not in cells["off"]


def test_gpu_speculative_bench_plumbing_runs_on_cpu():
    from forkdec.bench import gpu_speculative

    assert gpu_speculative.main(["--dry-run"]) == 0


_COMPILE_SCRIPT = r"""
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import forkdec.triton_kernels.speculative as k

i32 = "*i32"
common = {"tok_ptr": i32, "par_ptr": i32, "indptr_ptr": i32}
outs = {"out_tok_ptr": i32, "out_node_ptr": i32, "num_ptr": i32, "bonus_ptr": i32, "vocab": "i32", "max_depth": "i32"}
for dtype in ("fp32", "bf16", "fp16"):
    sampling = {**common, "draft_ptr": "*" + dtype, "stride_d": "i32", "target_ptr": "*" + dtype, "stride_t": "i32",
                "u_ptr": "*fp64", "work_ptr": "*fp32", **outs, "DRAFT_MATCH": "constexpr", "BLOCK": "constexpr"}
    greedy = {**common, "logits_ptr": "*" + dtype, "stride_l": "i32", "best_token_ptr": i32, "best_child_ptr": i32,
              "length_ptr": i32, "matched_ptr": i32, **outs, "BLOCK": "constexpr"}
    for arch in (80, 90):
        target = GPUTarget("cuda", arch, 32)
        for match in (True, False):
            src = ASTSource(k._sampling_kernel, sampling, constexprs={"DRAFT_MATCH": match, "BLOCK": k.BLOCK_V})
            assert "cubin" in triton.compile(src, target=target).asm
        src = ASTSource(k._greedy_kernel, greedy, constexprs={"BLOCK": k.BLOCK_V})
        assert "cubin" in triton.compile(src, target=target).asm
print("compiled")
"""


def test_triton_kernels_compile_for_sm80_and_sm90():
    """The interpreter checks semantics only; this runs Triton's real compiler
    (to cubin, no GPU needed) so that control flow the interpreter accepts but
    the compiler rejects is caught here."""
    import importlib.util
    import os
    import subprocess
    import sys

    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # real @triton.jit functions
    env["TRITON_DEFAULT_FP_FUSION"] = "0"  # no FMA contraction: the same arithmetic as the other backends
    run = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], capture_output=True, text=True, env=env,
                         timeout=600)
    assert run.returncode == 0 and "compiled" in run.stdout, run.stdout[-2000:] + run.stderr[-4000:]
