"""The fused output layer + masked cross-entropy op (csrc/cpu/linear_loss.cpp, csrc/cuda/linear_loss.cpp)
against d2l's dense layer followed by its MaskedSoftmaxCELoss: the loss and the gradients of
hidden, weight and bias, for both hidden layouts, chunk sizes around the row count, ragged
lengths, any grad_loss (the recomputing backward) and a uniform one (the gradients made in the
forward); gradcheck, opcheck, named errors; the decoder without its output layer."""
import pytest
import torch

from seq2seq_fast import reference as R
from seq2seq_fast.backends.extension import extension_error

pytestmark = pytest.mark.skipif(extension_error() is not None, reason=f"{extension_error()}")

TOLERANCES = {torch.float64: (1e-12, 1e-10), torch.float32: (2e-5, 1e-4)}


def cpp():
    from seq2seq_fast.backends import cpp_ops

    return cpp_ops


def case(B, S, H, V, dtype, layout, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    if layout == "step-major":  # the decoder's top states: a (B, S, H) view of (S, B, H)
        hidden = torch.randn(S, B, H, generator=g, dtype=dtype).transpose(0, 1)
    else:
        hidden = torch.randn(B, S, H, generator=g, dtype=dtype)
    weight = torch.randn(V, H, generator=g, dtype=dtype) / H ** 0.5 * 3
    bias = torch.randn(V, generator=g, dtype=dtype)
    label = torch.randint(0, V, (B, S), generator=g)
    valid_len = torch.randint(0, S + 3, (B,), generator=g)
    valid_len[0] = 0
    if B > 1:
        valid_len[1] = S + 5
    if B > 2:
        valid_len[2] = S
    tensors = [t.to(device) for t in (hidden, weight, bias, label, valid_len)]
    return [t.requires_grad_() for t in tensors[:3]] + tensors[3:]


def reference(hidden, weight, bias, label, valid_len):
    return R.MaskedSoftmaxCELoss()(hidden @ weight.T + bias, label, valid_len)


def check(actual, expected, inputs, grad_loss, dtype):
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol, msg=lambda m: f"loss: {m}")
    want = torch.autograd.grad(expected, inputs, grad_loss, retain_graph=True)
    got = torch.autograd.grad(actual, inputs, grad_loss)
    for name, g, w in zip(("hidden", "weight", "bias"), got, want):
        torch.testing.assert_close(g, w, atol=atol, rtol=rtol, msg=lambda m: f"grad {name}: {m}")
    assert got[0].stride() == inputs[0].stride(), "grad hidden keeps hidden's layout"


# (B, S, H, V, chunk_rows): V not a multiple of anything, chunk > rows, chunk = 1, rows not a
# multiple of the chunk; chunks of 150 and 58 rows, the first split into pieces over the threads.
SHAPES = [(1, 1, 1, 1, 1), (3, 7, 5, 13, 4), (8, 5, 33, 201, 1), (5, 3, 16, 1000, 64), (4, 9, 8, 30, 11),
          (16, 13, 8, 37, 150)]


@pytest.mark.parametrize("layout", ["contiguous", "step-major"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}-S{}-H{}-V{}-chunk{}".format(*s))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_loss_and_gradients_match_dense_then_d2l_loss(shape, layout, dtype):
    B, S, H, V, chunk = shape
    hidden, weight, bias, label, valid_len = inputs = case(B, S, H, V, dtype, layout)
    expected = reference(*inputs)
    # Any grad_loss: the backward recomputes the logits chunk by chunk.
    check(cpp().linear_masked_ce(*inputs, chunk_rows=chunk), expected, (hidden, weight, bias),
          torch.randn(B, dtype=dtype), dtype)
    # A uniform grad_loss (l.sum().backward()): the gradients made in the forward, scaled.
    for scale in (1.0, 2.5):
        check(cpp().linear_masked_ce(*inputs, chunk_rows=chunk), expected, (hidden, weight, bias),
              torch.tensor(scale, dtype=dtype).expand(B), dtype)


@pytest.mark.parametrize("threads", [1, 3])
def test_pieces_over_threads_match(threads):
    """A small layer's chunk is split into pieces of rows, and its weight's gradient into ranges
    of the vocabulary, claimed by the package's threads: the same result for any thread count."""
    previous = torch.ops.seq2seq_fast.set_cpu_threads(threads)
    try:
        hidden, weight, bias, label, valid_len = inputs = case(32, 9, 8, 70, torch.float64, "step-major", seed=2)
        check(cpp().linear_masked_ce(*inputs), reference(*inputs), (hidden, weight, bias),
              torch.ones(32, dtype=torch.float64).expand(32), torch.float64)
    finally:
        torch.ops.seq2seq_fast.set_cpu_threads(previous)


def test_default_chunk_and_uniform_sum_backward():
    hidden, weight, bias, label, valid_len = inputs = case(6, 4, 8, 50, torch.float64, "step-major", seed=2)
    actual = cpp().linear_masked_ce(*inputs)
    expected = reference(*inputs)
    torch.testing.assert_close(actual, expected)
    got = torch.autograd.grad(actual.sum(), (hidden, weight, bias))
    want = torch.autograd.grad(expected.sum(), (hidden, weight, bias))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


def test_forward_without_grad_makes_no_gradients():
    hidden, weight, bias, label, valid_len = case(3, 4, 5, 7, torch.float64, "contiguous")
    with torch.no_grad():
        loss, lse, *grads = torch.ops.seq2seq_fast.linear_masked_ce(hidden, weight, bias, label, valid_len, 2, False)
        torch.testing.assert_close(loss, reference(hidden, weight, bias, label, valid_len))
        torch.testing.assert_close(lse, torch.logsumexp(hidden @ weight.T + bias, dim=-1))
    assert all(g.shape == (0,) for g in grads)


def test_no_steps_gives_nan_as_d2l():
    hidden, weight, bias, _, _ = case(3, 0, 4, 5, torch.float64, "contiguous")
    label = torch.zeros(3, 0, dtype=torch.long)
    loss = cpp().linear_masked_ce(hidden, weight, bias, label, torch.tensor([0, 1, 2]))
    assert torch.isnan(loss).all()
    for grad_loss in (torch.ones(3, dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64).expand(3)):
        loss = cpp().linear_masked_ce(hidden, weight, bias, label, torch.tensor([0, 1, 2]))
        grads = torch.autograd.grad(loss, (hidden, weight, bias), grad_loss)
        assert grads[0].shape == (3, 0, 4)
        assert torch.count_nonzero(grads[1]) == 0 and torch.count_nonzero(grads[2]) == 0, "no rows: zero gradients"


def test_gradcheck_float64():
    for layout in ("contiguous", "step-major"):
        hidden, weight, bias, label, valid_len = case(3, 4, 3, 5, torch.float64, layout, seed=3)
        torch.autograd.gradcheck(lambda h, w, b: cpp().linear_masked_ce(h, w, b, label, valid_len, chunk_rows=5),
                                 (hidden, weight, bias))


def test_opcheck_both_ops():
    hidden, weight, bias, label, valid_len = case(3, 4, 5, 7, torch.float32, "step-major")
    for with_grads in (True, False):
        torch.library.opcheck(torch.ops.seq2seq_fast.linear_masked_ce.default,
                              (hidden, weight, bias, label, valid_len, 5, with_grads))
    _, lse, *_ = torch.ops.seq2seq_fast.linear_masked_ce(hidden.detach(), weight, bias, label, valid_len, 5, False)
    torch.library.opcheck(torch.ops.seq2seq_fast.linear_masked_ce_backward.default,
                          (torch.randn(3), hidden.detach(), weight.detach(), bias.detach(), label, valid_len, lse, 5))


def test_bad_inputs_raise_named_errors():
    hidden, weight, bias, label, valid_len = (t.detach() for t in case(3, 4, 5, 7, torch.float32, "contiguous"))
    op = torch.ops.seq2seq_fast.linear_masked_ce

    def call(**changes):
        args = dict(hidden=hidden, weight=weight, bias=bias, label=label, valid_len=valid_len, chunk_rows=2,
                    with_grads=True)
        args.update(changes)
        return op(*args.values())

    with pytest.raises(IndexError, match="label holds token id 7"):
        call(label=torch.full_like(label, 7))
    with pytest.raises(IndexError, match="label holds token id -1"):
        call(label=torch.full_like(label, -1))
    with pytest.raises(ValueError, match="valid_len must hold lengths >= 0"):
        call(valid_len=torch.full_like(valid_len, -1))
    with pytest.raises(ValueError, match="chunk_rows must be >= 1, got 0"):
        call(chunk_rows=0)
    with pytest.raises(TypeError, match="hidden must be float32 or float64"):
        call(hidden=hidden.half())
    with pytest.raises(TypeError, match="weight must have dtype"):
        call(weight=weight.double())
    with pytest.raises(TypeError, match="label must hold int64"):
        call(label=label.int())
    with pytest.raises(ValueError, match=r"hidden must have shape \(B, S, H >= 1\)"):
        call(hidden=hidden[0])
    with pytest.raises(ValueError, match=r"weight must have shape \(V >= 1, H = 5\)"):
        call(weight=weight[:, :3])
    with pytest.raises(ValueError, match=r"weight must have shape \(V >= 1, H = 5\)"):
        call(weight=weight[:0], bias=bias[:0])
    with pytest.raises(ValueError, match=r"bias must have shape \[7\]"):
        call(bias=bias[:3])
    with pytest.raises(ValueError, match=r"label must have shape \[3, 4\]"):
        call(label=label[:, :3])
    with pytest.raises(ValueError, match=r"valid_len must have shape \(3,\)"):
        call(valid_len=valid_len[:2])
    _, lse, *_ = call()
    backward = torch.ops.seq2seq_fast.linear_masked_ce_backward
    with pytest.raises(ValueError, match=r"grad_loss must have shape \[3\]"):
        backward(torch.ones(2), hidden, weight, bias, label, valid_len, lse, 2)
    with pytest.raises(ValueError, match=r"lse must have shape \[3, 4\]"):
        backward(torch.ones(3), hidden, weight, bias, label, valid_len, lse[:, :2], 2)
    with pytest.raises(ValueError, match="chunk_rows must be >= 1"):
        backward(torch.ones(3), hidden, weight, bias, label, valid_len, lse, -3)


def test_functional_normalises_d2l_inputs_and_checks_chunk_rows():
    import seq2seq_fast.ops.functional as F

    hidden, weight, bias, label, valid_len = case(3, 4, 5, 7, torch.float64, "contiguous")
    expected = reference(hidden, weight, bias, label, valid_len)
    torch.testing.assert_close(F.linear_masked_ce_loss(hidden, weight, bias, label.int(), valid_len.double()), expected)
    with pytest.raises(ValueError, match="chunk_rows"):
        F.linear_masked_ce_loss(hidden, weight, bias, label, valid_len, chunk_rows=0)
    with pytest.raises(TypeError, match="hidden must be a torch.Tensor"):
        F.linear_masked_ce_loss(None, weight, bias, label, valid_len)


def test_decoder_without_output_layer_gives_its_top_states():
    """A dense of 0 rows: the decoder op makes no logits; dense(top states) are its logits."""
    from helpers import decoder_inputs, paired_decoders
    from seq2seq_fast.ops.functional import prepare_decoder_call

    _, dec = paired_decoders(11, 4, 6, 2, backend="cpp")
    X, enc, hidden, lens = decoder_inputs(3, 5, 4, 6, 2, 11, torch.float64)
    state = dec.init_state((enc, hidden), lens)
    logits, _ = dec(X, state)
    _, values, h, lens_, kp, _ = prepare_decoder_call(dec, X, state)
    top, final, attention = cpp().decoder_top_states(dec, X, values, h, lens_, kp)
    torch.testing.assert_close(dec.dense(top), logits)
    assert top.shape == (3, 4, 6) and final.shape == (2, 3, 6) and attention.shape == (3, 4, 5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("layout", ["contiguous", "step-major"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_cuda_matches_cpu(dtype, layout):
    for B, S, H, V, chunk in SHAPES:
        cpu_inputs = case(B, S, H, V, dtype, layout)
        dev_inputs = case(B, S, H, V, dtype, layout, device="cuda")
        grad = torch.randn(B, dtype=dtype)
        expected = cpp().linear_masked_ce(*cpu_inputs, chunk_rows=chunk)
        actual = cpp().linear_masked_ce(*dev_inputs, chunk_rows=chunk)
        torch.testing.assert_close(actual.cpu(), expected, atol=2e-4, rtol=1e-3)
        for g in (grad, torch.tensor(1.5, dtype=dtype).expand(B)):
            want = torch.autograd.grad(expected, cpu_inputs[:3], g, retain_graph=True)
            got = torch.autograd.grad(actual, dev_inputs[:3], g.cuda(), retain_graph=True)
            for name, a, e in zip(("hidden", "weight", "bias"), got, want):
                torch.testing.assert_close(a.cpu(), e, atol=2e-4, rtol=1e-3, msg=lambda m: f"grad {name}: {m}")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_half_and_opcheck():
    hidden, weight, bias, label, valid_len = case(4, 6, 16, 300, torch.float32, "step-major", device="cuda")
    expected = reference(hidden, weight, bias, label, valid_len)
    half = [t.detach().half().requires_grad_() for t in (hidden, weight, bias)]
    actual = cpp().linear_masked_ce(*half, label, valid_len, chunk_rows=7)
    torch.testing.assert_close(actual.float(), expected, atol=2e-2, rtol=2e-2)
    torch.library.opcheck(torch.ops.seq2seq_fast.linear_masked_ce.default,
                          (hidden, weight, bias, label, valid_len, 5, True))
