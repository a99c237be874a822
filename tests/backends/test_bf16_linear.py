"""``bf16_linear``: ``F.linear`` as CPU bfloat16 autocast runs it, the bias inside oneDNN's GEMM.
Its output and every gradient against torch's own ``F.linear`` under autocast (the 2x accuracy
rule against float64), their dtypes, the gradients it is not asked for, and the path without
oneDNN's fused op."""
import pytest
import torch
import torch.nn.functional as F

from seq2seq_fast.backends import bf16_linear as BL


def _leaves(x_shape, out_features, bias, x_grad, seed=0):
    """Random float64 x, weight, bias (or None), output gradient; whether x needs a gradient."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*x_shape, generator=g, dtype=torch.float64)
    w = torch.randn(out_features, x_shape[-1], generator=g, dtype=torch.float64) / x_shape[-1] ** 0.5
    b = torch.randn(out_features, generator=g, dtype=torch.float64) if bias else None
    grad_out = torch.randn(*x_shape[:-1], out_features, generator=g, dtype=torch.float64)
    return x, w, b, grad_out, x_grad


def _run(linear, leaves, dtype, autocast):
    x, w, b, grad_out, x_grad = leaves
    inputs = [x.to(dtype).requires_grad_(x_grad), w.to(dtype).requires_grad_(), None if b is None else b.to(dtype).requires_grad_()]
    with autocast:
        out = linear(*inputs)
    out.backward(grad_out.to(out.dtype))
    grads = {name: t.grad for name, t in zip(("x", "weight", "bias"), inputs) if t is not None and t.requires_grad}
    return out.detach(), grads


def _error(t, exact):
    return (t.double() - exact).abs().max().item()


SHAPES = [pytest.param((5, 33), 19, id="2d"), pytest.param((3, 7, 40), 70, id="3d"),
          pytest.param((1, 1, 1), 1, id="one")]


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "unfused"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("x_shape, out_features", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bf16_linear_matches_torch_under_autocast(monkeypatch, x_shape, out_features, bias, fused, dtype):
    if fused and not BL._fused_available():
        pytest.skip("torch without oneDNN's fused linear")
    monkeypatch.setattr(BL, "_FUSED", fused)
    leaves = _leaves(x_shape, out_features, bias, x_grad=True)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16)
    out, grads = _run(BL.bf16_linear, leaves, dtype, torch.autocast("cpu", enabled=False))
    want_out, want_grads = _run(F.linear, leaves, dtype, autocast)
    exact_out, exact_grads = _run(F.linear, leaves, torch.float64, torch.autocast("cpu", enabled=False))
    assert out.dtype == want_out.dtype == torch.bfloat16 and out.shape == want_out.shape
    assert _error(out, exact_out) <= 2 * _error(want_out, exact_out) + 1e-6
    assert grads.keys() == want_grads.keys()
    for name, grad in grads.items():
        assert grad.dtype == want_grads[name].dtype == dtype, name
        assert _error(grad, exact_grads[name]) <= 2 * _error(want_grads[name], exact_grads[name]) + 1e-6, name


def test_bf16_linear_computes_only_the_gradients_asked_for():
    leaves = _leaves((4, 6, 16), 9, True, x_grad=False)
    off = torch.autocast("cpu", enabled=False)
    grads = _run(BL.bf16_linear, leaves, torch.float32, off)[1]
    assert set(grads) == {"weight", "bias"} and all(g is not None for g in grads.values())
    x, w, _, grad_out, _ = leaves
    x = x.float().requires_grad_()
    BL.bf16_linear(x, w.float(), None).backward(grad_out.bfloat16())  # only x needs a gradient
    exact = grad_out @ w
    assert x.grad.dtype == torch.float32 and (x.grad.double() - exact).abs().max() < 0.02 * exact.abs().max()


def test_bf16_linear_is_differentiable_once():
    x = torch.randn(3, 4, requires_grad=True)
    w = torch.randn(5, 4, requires_grad=True)
    (grad_x,) = torch.autograd.grad(BL.bf16_linear(x, w).float().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError):
        grad_x.sum().backward()
