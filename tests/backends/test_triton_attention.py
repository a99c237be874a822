"""The fused Triton additive attention against the reference ``AdditiveAttention``.

On a machine without CUDA the kernels run under ``TRITON_INTERPRET=1`` (slow: small shapes).
Every test runs with the kernels' allocations filled with NaN, so an element a kernel should
write and does not fails the comparison.
"""

import pytest
import torch


import seq2seq_fast as sf  # noqa: E402
from seq2seq_fast import reference as R  # noqa: E402

triton = pytest.importorskip("triton")
from seq2seq_fast.backends import triton_ops as BT  # noqa: E402
from seq2seq_fast.kernels import additive_attention as K  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# dtype, atol, rtol: kernel vs the reference in the same dtype.
TOLERANCES = {
    torch.float64: (1e-10, 1e-8),
    torch.float32: (2e-5, 1e-4),
}


@pytest.fixture(autouse=True)
def nan_poisoned(monkeypatch):
    def empty(shape, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    monkeypatch.setattr(K, "_empty", empty)


def assert_close(actual, expected, name):
    atol, rtol = TOLERANCES[expected.dtype]
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol, msg=lambda m: f"{name}: {m}")


def make_lens(kind, B, Q, T, gen):
    """None, (B,) or (B, Q) lengths that include 0 and >= T whenever there is room."""
    if kind == "none":
        return None
    shape = (B,) if kind == "1d" else (B, Q)
    lens = torch.randint(0, T + 1, shape, generator=gen).reshape(-1)
    special = torch.tensor([0, T, T + 3, 1])[: lens.numel()]
    lens[: special.numel()] = special
    return lens.reshape(shape)


def paired_attention(Dk, Dq, H, dtype, dropout=0.0):
    torch.manual_seed(0)
    ref = R.AdditiveAttention(Dk, Dq, H, dropout).to(dtype=dtype, device=DEVICE)
    fast = sf.AdditiveAttention(Dk, Dq, H, dropout, backend="triton").to(dtype=dtype, device=DEVICE)
    fast.load_state_dict(ref.state_dict())
    return ref, fast


def run_attention(module, queries, keys, values, lens, grad_out, grad_weights):
    """Forward + backward on fresh leaves: context, weights and the gradients by name."""
    q, k, v = (x.clone().requires_grad_() for x in (queries, keys, values))
    module.zero_grad(set_to_none=True)
    context = module(q, k, v, lens)
    weights = module.attention_weights
    ((context * grad_out).sum() + (weights * grad_weights).sum()).backward()
    grads = {"queries": q.grad, "keys": k.grad, "values": v.grad}
    grads.update({name: p.grad for name, p in module.named_parameters()})
    return context.detach(), weights.detach(), grads


# B, Q, T, H, Dv, lens kind
SHAPES = [
    (1, 1, 1, 5, 3, "none"),
    (3, 4, 7, 33, 6, "1d"),
    (3, 1, 33, 32, 7, "1d"),
    (3, 4, 7, 5, 9, "2d"),
    (2, 3, 40, 33, 4, "2d"),
    (3, 1, 1, 33, 2, "1d"),
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize(
    "B,Q,T,H,Dv,lens_kind", SHAPES, ids=[f"B{b}-Q{q}-T{t}-H{h}-Dv{d}-{k}" for b, q, t, h, d, k in SHAPES]
)
def test_module_matches_reference(B, Q, T, H, Dv, lens_kind, dtype):
    gen = torch.Generator().manual_seed(B * 1000 + T)
    Dq, Dk = H + 2, H + 1
    ref, fast = paired_attention(Dk, Dq, H, dtype)
    queries = torch.randn(B, Q, Dq, generator=gen, dtype=dtype).to(DEVICE)
    keys = torch.randn(B, T, Dk, generator=gen, dtype=dtype).to(DEVICE)
    values = torch.randn(B, T, Dv, generator=gen, dtype=dtype).to(DEVICE)
    lens = make_lens(lens_kind, B, Q, T, gen)
    lens = None if lens is None else lens.to(DEVICE)
    grad_out = torch.randn(B, Q, Dv, generator=gen, dtype=dtype).to(DEVICE)
    grad_weights = torch.randn(B, Q, T, generator=gen, dtype=dtype).to(DEVICE)

    expected = run_attention(ref, queries, keys, values, lens, grad_out, grad_weights)
    actual = run_attention(fast, queries, keys, values, lens, grad_out, grad_weights)
    assert_close(actual[0], expected[0], "context")
    assert_close(actual[1], expected[1], "attention weights")
    for name, grad in expected[2].items():
        assert_close(actual[2][name], grad, f"grad {name}")


def torch_attention(q, k, v, w, lens, keep=None, p=0.0):
    """The same math on projected inputs in torch (the reference's ops, lengths as d2l)."""
    scores = torch.tanh(q.unsqueeze(2) + k.unsqueeze(1)) @ w
    weights = R.masked_softmax(scores, lens)
    dropped = weights if keep is None else weights * keep / (1 - p)
    return dropped @ v, weights


@pytest.mark.parametrize("lens_kind", ["none", "1d", "2d"])
def test_launchers_with_small_blocks(lens_kind):
    """Tiny blocks: several key tiles, hidden chunks, value blocks; strided (transposed) inputs."""
    gen = torch.Generator().manual_seed(7)
    B, Q, T, H, Dv = 2, 3, 11, 13, 10
    dtype = torch.float64
    q = torch.randn(B, H, Q, generator=gen, dtype=dtype).to(DEVICE).transpose(1, 2)
    k = torch.randn(B, H, T, generator=gen, dtype=dtype).to(DEVICE).transpose(1, 2)
    v = torch.randn(T, B, Dv, generator=gen, dtype=dtype).to(DEVICE).transpose(0, 1)
    w = torch.randn(2 * H, generator=gen, dtype=dtype).to(DEVICE)[::2]
    lens = make_lens(lens_kind, B, Q, T, gen)
    lens = None if lens is None else lens.to(DEVICE)
    blocks = dict(block_t=4, block_h=4, block_d=4)
    context, weights, stats = K.additive_attention_fwd(q, k, v, w, lens, **blocks)

    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v, w)]
    ref_context, ref_weights = torch_attention(*leaves, lens)
    assert_close(context, ref_context.detach(), "context")
    assert_close(weights, ref_weights.detach(), "weights")
    grad_context = torch.randn(B, Q, Dv, generator=gen, dtype=dtype).to(DEVICE)
    grad_weights = torch.randn(B, Q, T, generator=gen, dtype=dtype).to(DEVICE)
    expected = torch.autograd.grad((ref_context * grad_context).sum() + (ref_weights * grad_weights).sum(), leaves)
    actual = K.additive_attention_bwd(grad_context, grad_weights, q, k, v, w, lens, None, 0.0,
                                      context, weights, stats, **blocks)
    for name, got, want in zip(("q", "k", "v", "w_v"), actual, expected):
        assert_close(got, want, f"grad {name}")


@pytest.mark.parametrize("dropout_p", [0.0, 0.4], ids=["no-dropout", "dropout"])
def test_gradcheck_float64(dropout_p):
    """Numerical gradients; with dropout through the op with a fixed seed (then deterministic)."""
    gen = torch.Generator().manual_seed(9)
    inputs = [torch.randn(*shape, generator=gen, dtype=torch.float64).to(DEVICE).requires_grad_()
              for shape in ((2, 2, 3), (2, 3, 3), (2, 3, 2), (3,))]
    lens = torch.tensor([[0, 2], [3, 1]], device=DEVICE)
    seed = torch.tensor([1234], device=DEVICE) if dropout_p else None

    def f(q, k, v, w):
        return BT._attention_op(q, k, v, w, lens, seed, dropout_p)[:2]

    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-7)


def test_fully_masked_rows_are_uniform():
    """valid_len 0 gives uniform weights and the mean of the values, in every dtype."""
    T = 6
    for dtype in (torch.float32, torch.float64):
        q = torch.randn(2, 1, 4, dtype=dtype, device=DEVICE)
        k = torch.randn(2, T, 4, dtype=dtype, device=DEVICE)
        v = torch.randn(2, T, 3, dtype=dtype, device=DEVICE)
        w = torch.randn(4, dtype=dtype, device=DEVICE)
        context, weights = BT.additive_attention(q, k, v, w, torch.tensor([0, 0], device=DEVICE), 0.0, False)
        assert_close(weights, torch.full_like(weights, 1 / T), "weights")
        assert_close(context, v.mean(1, keepdim=True), "context")


def identity_values(B, T, Dv_extra, dtype, gen):
    """values (B, T, T + Dv_extra) whose first T columns are the identity: the context's first T
    columns are then the dropped-out weights themselves."""
    eye = torch.eye(T, dtype=dtype).expand(B, T, T)
    return torch.cat([eye, torch.randn(B, T, Dv_extra, generator=gen, dtype=dtype)], dim=2).to(DEVICE)


def test_dropout_statistics_and_scale():
    gen = torch.Generator().manual_seed(3)
    B, Q, T, H, p = 8, 8, 32, 4, 0.3
    dtype = torch.float64
    q = torch.randn(B, Q, H, generator=gen, dtype=dtype).to(DEVICE)
    k = torch.randn(B, T, H, generator=gen, dtype=dtype).to(DEVICE)
    w = torch.randn(H, generator=gen, dtype=dtype).to(DEVICE)
    v = identity_values(B, T, 0, dtype, gen)
    torch.manual_seed(11)
    context, weights = BT.additive_attention(q, k, v, w, None, p, True)
    kept = context != 0
    dropped_fraction = 1 - kept.double().mean().item()
    # 2048 Bernoulli(0.3) draws: standard deviation 0.01.
    assert abs(dropped_fraction - p) < 0.05, dropped_fraction
    assert_close(context, torch.where(kept, weights / (1 - p), torch.zeros_like(weights)), "kept weights")

    torch.manual_seed(11)
    again, _ = BT.additive_attention(q, k, v, w, None, p, True)
    assert torch.equal(again, context), "the same torch seed must give the same mask"
    other, _ = BT.additive_attention(q, k, v, w, None, p, True)
    assert not torch.equal(other != 0, kept), "a new call must draw a new mask"
    evaluated, _ = BT.additive_attention(q, k, v, w, None, p, False)
    assert_close(evaluated, weights, "no dropout outside training")
    zero, _ = BT.additive_attention(q, k, v, w, None, 1.0, True)
    assert torch.count_nonzero(zero) == 0, "p = 1 drops everything"


@pytest.mark.parametrize("lens_kind", ["none", "2d"])
def test_dropout_backward_reuses_the_forward_mask(lens_kind):
    gen = torch.Generator().manual_seed(5)
    B, Q, T, H, p = 3, 2, 9, 6, 0.4
    dtype = torch.float64
    q = torch.randn(B, Q, H, generator=gen, dtype=dtype).to(DEVICE).requires_grad_()
    k = torch.randn(B, T, H, generator=gen, dtype=dtype).to(DEVICE).requires_grad_()
    v = identity_values(B, T, 5, dtype, gen).requires_grad_()
    w = torch.randn(H, generator=gen, dtype=dtype).to(DEVICE).requires_grad_()
    lens = make_lens(lens_kind, B, Q, T, gen)
    lens = None if lens is None else lens.to(DEVICE)
    grad_context = torch.randn(B, Q, T + 5, generator=gen, dtype=dtype).to(DEVICE)
    grad_weights = torch.randn(B, Q, T, generator=gen, dtype=dtype).to(DEVICE)

    context, weights = BT.additive_attention(q, k, v, w, lens, p, True)
    keep = (context[..., :T] != 0).to(dtype).detach()
    assert 0 < keep.mean() < 1
    actual = torch.autograd.grad((context * grad_context).sum() + (weights * grad_weights).sum(), (q, k, v, w))

    ref_context, ref_weights = torch_attention(q, k, v, w, lens, keep=keep, p=p)
    assert_close(context.detach(), ref_context.detach(), "context with the recovered mask")
    expected = torch.autograd.grad((ref_context * grad_context).sum() + (ref_weights * grad_weights).sum(),
                                   (q, k, v, w))
    for name, got, want in zip(("q", "k", "v", "w_v"), actual, expected):
        assert_close(got, want, f"grad {name}")


def op_samples():
    gen = torch.Generator().manual_seed(1)

    def leaf(*shape):
        return torch.randn(*shape, generator=gen).to(DEVICE).requires_grad_()

    q, k, v, w = leaf(2, 3, 5), leaf(2, 7, 5), leaf(2, 7, 4), leaf(5)
    lens1 = torch.tensor([0, 3], device=DEVICE)
    lens2 = torch.tensor([[0, 3, 9], [1, 2, 7]], device=DEVICE)
    seed = torch.tensor([42], device=DEVICE)
    # Non-contiguous inputs, as the decoder passes them (slices of a fused GEMM, (T, B, H) keys).
    q_t = leaf(3, 2, 5).transpose(0, 1)
    k_t = leaf(7, 2, 5).transpose(0, 1)
    v_t = leaf(2, 4, 7).transpose(1, 2)
    return [
        (q, k, v, w, None, None, 0.0),
        (q, k, v, w, lens1, None, 0.0),
        (q, k, v, w, lens2, seed, 0.3),
        (q_t, k_t, v_t, w, lens1, seed, 0.5),
    ]


@pytest.mark.parametrize("index", [0, 1, 2, 3], ids=["plain", "lens-1d", "lens-2d-dropout", "strided"])
def test_opcheck_forward(index):
    torch.library.opcheck(BT._attention_op, op_samples()[index])


@pytest.mark.parametrize("index", [2, 3], ids=["lens-2d-dropout", "strided"])
def test_opcheck_backward(index):
    q, k, v, w, lens, seed, p = op_samples()[index]
    args = [x.detach() for x in (q, k, v, w)]
    context, weights, stats = BT._attention_op(*args, lens, seed, p)
    grads = torch.randn_like(context), torch.randn_like(weights)
    torch.library.opcheck(BT._attention_backward_op, (*grads, *args, lens, seed, p, context, weights, stats))
    torch.library.opcheck(BT._attention_backward_op, (grads[0], None, *args, lens, seed, p, context, weights, stats))


def test_torch_compile_fullgraph():
    """The op traces under torch.compile(fullgraph=True), forward and backward, with dropout."""
    q, k, v, w, lens, _, _ = op_samples()[1]

    def f(q, k, v, w, lens):
        context, weights = BT.additive_attention(q, k, v, w, lens, 0.0, False)
        return context.sum() + (weights * weights).sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    got = compiled(q, k, v, w, lens)
    grads = torch.autograd.grad(got, (q, k, v, w))
    want = f(q, k, v, w, lens)
    want_grads = torch.autograd.grad(want, (q, k, v, w))
    assert_close(got.detach(), want.detach(), "compiled output")
    for name, a, b in zip("qkvw", grads, want_grads):
        assert_close(a, b, f"compiled grad {name}")

    def g(q, k, v, w, lens):
        return BT.additive_attention(q, k, v, w, lens, 0.5, True)[0].sum()

    torch.compile(g, fullgraph=True, backend="aot_eager")(q, k, v, w, lens).backward()


def test_inductor_forward_backward_strided_inputs():
    """Inductor keeps the op's layouts: strided inputs, contiguous outputs and gradients."""
    q, k, v, w, lens, _, _ = op_samples()[3]

    def f(q, k, v, w, lens):
        context, weights = BT.additive_attention(q * 2, k, v, w, lens, 0.0, False)
        return (context + 1).square().sum() + weights[..., :2].sum()

    # No on-disk caches: their keys do not cover the op's fake, so a stale entry could hide a change.
    with torch._inductor.config.patch(fx_graph_cache=False), torch._functorch.config.patch(enable_autograd_cache=False):
        got = torch.compile(f, fullgraph=True)(q, k, v, w, lens)
        got_grads = torch.autograd.grad(got, (q, k, v, w))
    want = f(q, k, v, w, lens)
    want_grads = torch.autograd.grad(want, (q, k, v, w))
    assert_close(got.detach(), want.detach(), "compiled output")
    for name, a, b in zip("qkvw", got_grads, want_grads):
        assert_close(a, b, f"compiled grad {name}")


def test_empty_sizes():
    q, k, v, w = torch.randn(2, 3, 4), torch.randn(2, 0, 4), torch.randn(2, 0, 5), torch.randn(4)
    context, weights = BT.additive_attention(q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), w.to(DEVICE), None, 0.0, False)
    assert context.shape == (2, 3, 5) and torch.count_nonzero(context) == 0
    assert weights.shape == (2, 3, 0)


def test_bad_inputs_name_the_argument():
    q, k, v, w = torch.randn(2, 3, 4), torch.randn(2, 5, 4), torch.randn(2, 5, 6), torch.randn(4)
    with pytest.raises(TypeError, match="key_proj"):
        BT.additive_attention(q, k.double(), v, w, None, 0.0, False)
    with pytest.raises(ValueError, match="values"):
        BT.additive_attention(q, k, v[:, :4], w, None, 0.0, False)
    with pytest.raises(ValueError, match="w_v"):
        BT.additive_attention(q, k, v, w[:3], None, 0.0, False)
    with pytest.raises(TypeError, match="valid_lens"):
        BT.additive_attention(q, k, v, w, torch.tensor([1.0, 2.0]), 0.0, False)
    with pytest.raises(ValueError, match="valid_lens"):
        BT.additive_attention(q, k, v, w, torch.tensor([1, 2, 3]), 0.0, False)
    with pytest.raises(ValueError, match="dropout_p"):
        BT.additive_attention(q, k, v, w, None, 1.5, False)
    with pytest.raises(TypeError, match="q_proj"):
        BT.additive_attention(q.int(), k, v, w, None, 0.0, False)
    assert BT.unsupported_reason("cuda", torch.int32, False) is not None
    assert BT.unsupported_reason("cuda", torch.bfloat16, True) is None


# The "at most twice the framework's own error" rule for half precision. float16 runs under the
# interpreter too; bfloat16 only on CUDA, because the interpreter truncates float32 -> bfloat16
# where the GPU rounds to nearest, which doubles the error of every stored element.
NEEDS_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
BF16 = pytest.param(torch.bfloat16, marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="the interpreter truncates float32 -> bfloat16"))
LOW_PRECISION = [torch.float16, BF16]
HALF_SHAPES = [
    pytest.param(3, 4, 33, 32, 20, id="B3-Q4-T33-H32"),
    pytest.param(8, 1, 70, 96, 64, id="B8-Q1-T70-H96", marks=NEEDS_CUDA),
    pytest.param(2, 10, 128, 256, 256, id="B2-Q10-T128-H256", marks=NEEDS_CUDA),
]


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
@pytest.mark.parametrize("B,Q,T,H,Dv", HALF_SHAPES)
def test_half_precision_error_at_most_twice_torchs(B, Q, T, H, Dv, dtype):
    gen = torch.Generator().manual_seed(2)
    Dq = Dk = H
    ref64, _ = paired_attention(Dk, Dq, H, torch.float64)
    ref_low, fast = paired_attention(Dk, Dq, H, dtype)
    queries = torch.randn(B, Q, Dq, generator=gen, dtype=torch.float64).to(DEVICE)
    keys = torch.randn(B, T, Dk, generator=gen, dtype=torch.float64).to(DEVICE)
    values = torch.randn(B, T, Dv, generator=gen, dtype=torch.float64).to(DEVICE)
    # No length-0 rows here: d2l's -1e6 fill overflows in fp16 (see the test below).
    lens = torch.randint(1, T + 4, (B, Q), generator=gen).to(DEVICE)
    grad_out = torch.randn(B, Q, Dv, generator=gen, dtype=torch.float64).to(DEVICE)
    zeros_w = torch.zeros(B, Q, T, dtype=torch.float64, device=DEVICE)
    low = [x.to(dtype) for x in (queries, keys, values, grad_out, zeros_w)]
    exact = run_attention(ref64, queries, keys, values, lens, grad_out, zeros_w)
    framework = run_attention(ref_low, low[0], low[1], low[2], lens, low[3], low[4])
    ours = run_attention(fast, low[0], low[1], low[2], lens, low[3], low[4])

    def err(result, index, name=None):
        got = result[index] if name is None else result[index][name]
        want = exact[index] if name is None else exact[index][name]
        return (got.double() - want).abs().max().item()

    checks = [("context", 0, None), ("weights", 1, None)] + [(f"grad {n}", 2, n) for n in exact[2]]
    for label, index, name in checks:
        ours_err, torch_err = err(ours, index, name), err(framework, index, name)
        assert ours_err <= 2 * torch_err + 1e-6, f"{label}: {ours_err} vs torch's {torch_err}"


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
def test_half_precision_empty_rows_match_float32(dtype):
    gen = torch.Generator().manual_seed(4)
    B, Q, T, H, Dv = 3, 2, 9, 16, 8
    ref32, _ = paired_attention(H, H, H, torch.float32)
    _, fast = paired_attention(H, H, H, dtype)
    queries = torch.randn(B, Q, H, generator=gen).to(DEVICE)
    keys = torch.randn(B, T, H, generator=gen).to(DEVICE)
    values = torch.randn(B, T, Dv, generator=gen).to(DEVICE)
    lens = torch.tensor([0, 4, 0], device=DEVICE)
    grad_out = torch.randn(B, Q, Dv, generator=gen).to(DEVICE)
    zeros_w = torch.zeros(B, Q, T, device=DEVICE)
    expected = run_attention(ref32, queries, keys, values, lens, grad_out, zeros_w)
    low = [x.to(dtype) for x in (queries, keys, values, grad_out, zeros_w)]
    actual = run_attention(fast, *low[:3], lens, *low[3:])
    tol = dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(actual[1].float(), expected[1], **tol, msg=lambda m: f"weights: {m}")
    torch.testing.assert_close(actual[0].float(), expected[0], **tol, msg=lambda m: f"context: {m}")
    for name, grad in expected[2].items():
        torch.testing.assert_close(actual[2][name].float(), grad, **tol, msg=lambda m: f"grad {name}: {m}")
