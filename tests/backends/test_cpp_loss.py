"""The fused CPU masked cross-entropy op (csrc/cpu/loss.cpp) against d2l's MaskedSoftmaxCELoss:
values and gradients for both logits layouts, every length edge, gradcheck, opcheck, compile."""
import pytest
import torch

from seq2seq_fast import reference as R
from seq2seq_fast.backends.extension import extension_error

pytestmark = pytest.mark.skipif(extension_error() is not None, reason=f"{extension_error()}")

TOLERANCES = {torch.float64: (1e-12, 1e-10), torch.float32: (2e-6, 2e-5)}


def loss_op(pred, label, valid_len):
    from seq2seq_fast.backends import cpp_ops as backend_cpp

    return backend_cpp.masked_ce_loss(pred, label, valid_len)


def case(B, S, V, dtype, layout, seed=0):
    g = torch.Generator().manual_seed(seed)
    if layout == "step-major":  # the decoder's (B, S, V) view of (S, B, V) logits
        pred = (4 * torch.randn(S, B, V, generator=g, dtype=dtype)).transpose(0, 1)
    else:
        pred = 4 * torch.randn(B, S, V, generator=g, dtype=dtype)
    label = torch.randint(0, V, (B, S), generator=g)
    valid_len = torch.randint(0, S + 3, (B,), generator=g)
    valid_len[0] = 0
    if B > 1:
        valid_len[1] = S + 5
    return pred.requires_grad_(), label, valid_len


@pytest.mark.parametrize("layout", ["contiguous", "step-major"])
@pytest.mark.parametrize("shape", [(1, 1, 1), (5, 7, 13), (64, 10, 201), (3, 4, 1000)], ids=str)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_loss_and_gradient_match_d2l(shape, layout, dtype):
    pred, label, valid_len = case(*shape, dtype, layout)
    expected = R.MaskedSoftmaxCELoss()(pred, label, valid_len)
    actual = loss_op(pred, label, valid_len)
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol)
    g = torch.randn(shape[0], dtype=dtype)
    (grad_expected,) = torch.autograd.grad(expected, pred, g)
    (grad_actual,) = torch.autograd.grad(actual, pred, g)
    torch.testing.assert_close(grad_actual, grad_expected, atol=atol, rtol=rtol)
    assert grad_actual.stride() == pred.stride(), "the gradient keeps the logits' layout"


@pytest.mark.parametrize("layout", ["contiguous", "step-major"])
@pytest.mark.parametrize("shape", [(1, 1, 1), (5, 7, 13), (64, 10, 201), (3, 4, 1000)], ids=str)
def test_bfloat16_logits_are_read_as_they_are(shape, layout):
    """bfloat16 logits (autocast's): the loss and lse in float32 equal to the float64 loss of the
    same values, the gradient in bfloat16 equal to the float64 gradient rounded once."""
    pred, label, valid_len = case(*shape, torch.bfloat16, layout)
    exact = pred.detach().double().requires_grad_()
    expected = R.MaskedSoftmaxCELoss()(exact, label, valid_len)
    loss, lse = torch.ops.seq2seq_fast.masked_ce_loss(pred.detach(), label, valid_len)
    assert loss.dtype == lse.dtype == torch.float32
    torch.testing.assert_close(loss, expected.float(), atol=2e-6, rtol=2e-5)
    torch.testing.assert_close(lse.double(), torch.logsumexp(exact, dim=2), atol=2e-6, rtol=2e-5)
    g = torch.randn(shape[0])
    (grad_expected,) = torch.autograd.grad(expected, exact, g.double())
    (grad_actual,) = torch.autograd.grad(loss_op(pred, label, valid_len), pred, g)
    assert grad_actual.dtype == torch.bfloat16 and grad_actual.stride() == pred.stride()
    # One rounding to bfloat16 (8 bits): within an ulp of the exact gradient rounded.
    torch.testing.assert_close(grad_actual.double(), grad_expected, atol=1e-6, rtol=2 ** -7)


def test_other_strides_are_made_contiguous():
    _, label, valid_len = case(4, 6, 9, torch.float64, "contiguous")
    v_strided = torch.randn(4, 9, 6, dtype=torch.float64).transpose(1, 2)  # V not contiguous
    batch_sliced = torch.randn(8, 6, 9, dtype=torch.float64)[::2]
    for logits in (v_strided.requires_grad_(), batch_sliced.requires_grad_()):
        expected = R.MaskedSoftmaxCELoss()(logits, label, valid_len)
        actual = loss_op(logits, label, valid_len)
        torch.testing.assert_close(actual, expected)
        grad = torch.autograd.grad(actual.sum(), logits)[0]
        torch.testing.assert_close(grad, torch.autograd.grad(expected.sum(), logits)[0])
        assert grad.is_contiguous()


def test_no_steps_gives_nan_as_d2l():
    pred = torch.randn(3, 0, 5, dtype=torch.float64)
    label = torch.zeros(3, 0, dtype=torch.long)
    assert torch.isnan(loss_op(pred, label, torch.tensor([0, 1, 2]))).all()


def test_gradcheck_float64():
    for layout in ("contiguous", "step-major"):
        pred, label, valid_len = case(3, 4, 5, torch.float64, layout, seed=3)
        torch.autograd.gradcheck(lambda p: loss_op(p, label, valid_len), (pred,))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_opcheck_both_ops(dtype):
    pred, label, valid_len = case(3, 4, 5, dtype, "step-major")
    torch.library.opcheck(torch.ops.seq2seq_fast.masked_ce_loss.default, (pred, label, valid_len))
    _, lse = torch.ops.seq2seq_fast.masked_ce_loss(pred.detach(), label, valid_len)
    torch.library.opcheck(torch.ops.seq2seq_fast.masked_ce_loss_backward.default,
                          (torch.randn(3), pred.detach(), label, valid_len, lse))


def test_torch_compile_fullgraph_forward_and_backward():
    pred, label, valid_len = case(5, 7, 13, torch.float32, "step-major")
    compiled = torch.compile(loss_op, fullgraph=True, backend="aot_eager")
    actual = compiled(pred, label, valid_len)
    expected = loss_op(pred, label, valid_len)
    torch.testing.assert_close(actual, expected)
    torch.testing.assert_close(torch.autograd.grad(actual.sum(), pred)[0],
                               torch.autograd.grad(expected.sum(), pred)[0])


def test_bad_inputs_raise_named_errors():
    pred, label, valid_len = case(3, 4, 5, torch.float32, "contiguous")
    ops = torch.ops.seq2seq_fast
    with pytest.raises(IndexError, match="label holds token id 5"):
        ops.masked_ce_loss(pred, torch.full_like(label, 5), valid_len)
    with pytest.raises(IndexError, match="label holds token id -1"):
        ops.masked_ce_loss(pred, torch.full_like(label, -1), valid_len)
    with pytest.raises(TypeError, match="pred must be float32, float64 or bfloat16, got Half"):
        ops.masked_ce_loss(pred.half(), label, valid_len)
    _, lse = ops.masked_ce_loss(pred.detach().bfloat16(), label, valid_len)
    with pytest.raises(TypeError, match=r"grad_loss must have dtype Float \(the dtype of the loss\), got BFloat16"):
        ops.masked_ce_loss_backward(torch.ones(3, dtype=torch.bfloat16), pred.detach().bfloat16(), label, valid_len,
                                    lse)
    with pytest.raises(TypeError, match="label must hold int64"):
        ops.masked_ce_loss(pred, label.int(), valid_len)
    with pytest.raises(ValueError, match=r"label must have shape \[3, 4\]"):
        ops.masked_ce_loss(pred, label[:, :3], valid_len)
    with pytest.raises(ValueError, match=r"valid_len must have shape \(3,\)"):
        ops.masked_ce_loss(pred, label, valid_len[:2])
    with pytest.raises(ValueError, match="pred must have shape"):
        ops.masked_ce_loss(pred[0], label, valid_len)
