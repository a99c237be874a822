"""``nn.Linear`` as CPU bfloat16 autocast runs it -- operands rounded to bfloat16, float32
accumulation, the output in bfloat16 -- for d2l's output layer where a ``CastingBackend`` runs
it outside the compiled ops with a gradient.

The forward adds the bias inside oneDNN's GEMM (``mkldnn._linear_pointwise``, the op torch's
own compiler lowers CPU linears to): torch's bfloat16 ``addmm`` first copies the bias into its
whole output, 5 of the 16 ms of the large setting's output layer in the training step's profile
(benchmarks/RESULTS.md, nineteenth session). The backward runs the GEMMs autograd runs for ``F.linear`` under autocast,
on the operands rounded once in the forward.
"""
import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

_BF16 = torch.bfloat16


def _fused_available():
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


_FUSED = _fused_available()


def _forward(x, weight, bias):
    """``F.linear`` of bfloat16 operands, the bias inside the GEMM where oneDNN is there."""
    if _FUSED:
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return F.linear(x, weight, bias)


class _Bf16Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias):
        x16, w16 = x.to(_BF16), weight.to(_BF16)
        ctx.save_for_backward(x16, w16)
        ctx.dtypes = (x.dtype, weight.dtype, None if bias is None else bias.dtype)
        return _forward(x16, w16, None if bias is None else bias.to(_BF16))

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        x16, w16 = ctx.saved_tensors
        x_dtype, w_dtype, b_dtype = ctx.dtypes
        grad = grad.to(_BF16)
        rows = grad.reshape(-1, grad.shape[-1])
        d_x = d_w = d_b = None
        if ctx.needs_input_grad[0]:
            d_x = torch.matmul(grad, w16).to(x_dtype)
        if ctx.needs_input_grad[1]:
            # (out, in) as the weight is laid out: the other order's transpose would be copied
            # to the parameter's layout when the gradient is accumulated.
            d_w = rows.t().mm(x16.reshape(-1, x16.shape[-1])).to(w_dtype)
        if b_dtype is not None and ctx.needs_input_grad[2]:
            d_b = rows.sum(0).to(b_dtype)  # float32 sums inside; sum(dtype=float32) takes 10x as long
        return d_x, d_w, d_b


def bf16_linear(x, weight, bias=None):
    """``F.linear(x, weight, bias)`` on CPU under bfloat16 autocast (x (..., in), weight (out,
    in), bias (out,) or None, any float dtypes): bfloat16 out; gradients in the inputs' dtypes."""
    return _Bf16Linear.apply(x, weight, bias)
