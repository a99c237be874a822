"""The ``triton`` backend: the fused Triton additive-attention kernel as a custom op, and the
decoder's Python step loop (``torch_ops.decoder_loop``) with that kernel as its attention.


The op ``seq2seq_fast::additive_attention_triton`` is a ``torch.library.custom_op`` with an
explicit fake and a registered autograd formula whose backward is the op
``seq2seq_fast::additive_attention_triton_backward``, so ``torch.compile(fullgraph=True)``
traces through both (a ``triton_op`` cannot be traced under the interpreter). Dropout is drawn
inside the kernel from a Philox seed that the caller draws from torch's generator and passes
to the op as a tensor, so the op itself is deterministic and backward reuses the same mask.

Runs on CUDA tensors, and on CPU tensors only under ``TRITON_INTERPRET=1`` (tests).
"""
from typing import Optional, Tuple

import torch
from torch import Tensor

from seq2seq_fast.backends import torch_ops
from seq2seq_fast.kernels import additive_attention as K

NAME = "triton"
# Whether this backend's ops check their own arguments (else ops.functional checks them first).
CHECKS_INPUTS = False

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def unsupported_reason(device_type, dtype, grad_mode):
    """``None`` if the kernel runs tensors of ``dtype`` on ``device_type``, else why not."""
    if dtype not in _DTYPES:
        return f"the Triton attention kernel takes float16, bfloat16, float32 or float64, not {dtype}"
    return None


@torch.library.custom_op("seq2seq_fast::additive_attention_triton", mutates_args=())
def _attention_op(
    q_proj: Tensor, key_proj: Tensor, values: Tensor, w_v: Tensor,
    valid_lens: Optional[Tensor], seed: Optional[Tensor], dropout_p: float,
) -> Tuple[Tensor, Tensor, Tensor]:
    return K.additive_attention_fwd(q_proj, key_proj, values, w_v, valid_lens, seed, dropout_p)


@_attention_op.register_fake
def _(q_proj, key_proj, values, w_v, valid_lens, seed, dropout_p):
    B, Q, _ = q_proj.shape
    T, DV = key_proj.shape[1], values.shape[2]
    return (
        values.new_empty((B, Q, DV)),
        q_proj.new_empty((B, Q, T)),
        q_proj.new_empty((B, Q, 2), dtype=K.accumulation_dtype(q_proj.dtype)),
    )


@torch.library.custom_op("seq2seq_fast::additive_attention_triton_backward", mutates_args=())
def _attention_backward_op(
    grad_context: Tensor, grad_weights: Optional[Tensor],
    q_proj: Tensor, key_proj: Tensor, values: Tensor, w_v: Tensor,
    valid_lens: Optional[Tensor], seed: Optional[Tensor], dropout_p: float,
    context: Tensor, weights: Tensor, stats: Tensor,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    return K.additive_attention_bwd(
        grad_context, grad_weights, q_proj, key_proj, values, w_v, valid_lens, seed, dropout_p,
        context, weights, stats,
    )


@_attention_backward_op.register_fake
def _(grad_context, grad_weights, q_proj, key_proj, values, w_v, valid_lens, seed, dropout_p,
      context, weights, stats):
    # Contiguous, like the kernel's gradients (empty_like would copy the inputs' strides).
    return tuple(x.new_empty(x.shape) for x in (q_proj, key_proj, values, w_v))


def _setup_context(ctx, inputs, output):
    q_proj, key_proj, values, w_v, valid_lens, seed, dropout_p = inputs
    context, weights, stats = output
    ctx.mark_non_differentiable(stats)
    ctx.save_for_backward(q_proj, key_proj, values, w_v, valid_lens, seed, context, weights, stats)
    ctx.dropout_p = dropout_p


def _backward(ctx, grad_context, grad_weights, grad_stats):
    q_proj, key_proj, values, w_v, valid_lens, seed, context, weights, stats = ctx.saved_tensors
    if grad_context is None:
        grad_context = torch.zeros_like(context)
    dq, dk, dv, dw = _attention_backward_op(
        grad_context, grad_weights, q_proj, key_proj, values, w_v, valid_lens, seed, ctx.dropout_p,
        context, weights, stats,
    )
    return dq, dk, dv, dw, None, None, None


_attention_op.register_autograd(_backward, setup_context=_setup_context)


def _attend(q_proj, key_proj, values, w_v, valid_lens, dropout_p, training):
    """The op on checked inputs; draws the dropout seed from torch's generator when it drops."""
    seed = None
    if training and dropout_p > 0:
        seed = torch.randint(torch.iinfo(torch.int64).max, (1,), device=q_proj.device)
    else:
        dropout_p = 0.0
    context, weights, _ = _attention_op(q_proj, key_proj, values, w_v, valid_lens, seed, float(dropout_p))
    return context, weights


def _check(q_proj, key_proj, values, w_v, valid_lens, dropout_p):
    for name, tensor, ndim in (("q_proj", q_proj, 3), ("key_proj", key_proj, 3), ("values", values, 3),
                               ("w_v", w_v, 1)):
        if not isinstance(tensor, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
        if tensor.dtype not in _DTYPES:
            raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {tensor.dtype}")
        if tensor.dtype != q_proj.dtype:
            raise TypeError(f"{name} must have q_proj's dtype {q_proj.dtype}, got {tensor.dtype}")
        if tensor.device != q_proj.device:
            raise ValueError(f"{name} must be on q_proj's device {q_proj.device}, got {tensor.device}")
        if tensor.dim() != ndim:
            raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(tensor.shape)}")
    B, Q, H = q_proj.shape
    B_k, T, H_k = key_proj.shape
    if (B_k, H_k) != (B, H):
        raise ValueError(f"key_proj must have shape (B={B}, T, H={H}), got {tuple(key_proj.shape)}")
    if tuple(values.shape[:2]) != (B, T):
        raise ValueError(f"values must have shape (B={B}, T={T}, Dv), got {tuple(values.shape)}")
    if tuple(w_v.shape) != (H,):
        raise ValueError(f"w_v must have shape (H={H},), got {tuple(w_v.shape)}")
    if valid_lens is not None:
        if not isinstance(valid_lens, Tensor) or valid_lens.dtype != torch.int64:
            got = valid_lens.dtype if isinstance(valid_lens, Tensor) else type(valid_lens).__name__
            raise TypeError(f"valid_lens must be None or an int64 tensor, got {got}")
        if valid_lens.device != q_proj.device:
            raise ValueError(f"valid_lens must be on q_proj's device {q_proj.device}, got {valid_lens.device}")
        if tuple(valid_lens.shape) not in ((B,), (B, Q)):
            raise ValueError(f"valid_lens must have shape (B={B},) or (B, Q)={(B, Q)}, got {tuple(valid_lens.shape)}")
    if not isinstance(dropout_p, (int, float)) or isinstance(dropout_p, bool) or not 0.0 <= dropout_p <= 1.0:
        raise ValueError(f"dropout_p must be a number in [0, 1], got {dropout_p!r}")


def additive_attention(q_proj, key_proj, values, w_v, valid_lens, dropout_p, training):
    """Fused additive attention on projected queries and keys.

    q_proj (B, Q, H), key_proj (B, T, H), values (B, T, Dv), w_v (H,): one dtype among float16,
    bfloat16, float32, float64, on one device. valid_lens None, int64 (B,) or (B, Q): keys
    j >= valid_len score -1e6 (a length-0 row is uniform). In ``training`` mode the weights of
    the context are dropped with probability ``dropout_p`` and the rest scaled by 1/(1-p).
    Returns (context (B, Q, Dv) from the dropped weights, weights (B, Q, T) before dropout).

    >>> q, k, v, w = torch.rand(2, 1, 8), torch.rand(2, 5, 8), torch.rand(2, 5, 3), torch.rand(8)
    >>> additive_attention(q, k, v, w, torch.tensor([2, 5]), 0.1, False)[1].shape
    torch.Size([2, 1, 5])
    """
    _check(q_proj, key_proj, values, w_v, valid_lens, dropout_p)
    return _attend(q_proj, key_proj, values, w_v, valid_lens, dropout_p, training)


def attention_forward(attention, queries, keys, values, valid_lens):
    """``AdditiveAttention.forward`` on this backend: W_q and W_k by torch, then the fused op.

    queries (B, Q, Dq), keys (B, T, Dk), values (B, T, Dv); valid_lens None or int64 (B,) /
    (B, Q). Returns (context (B, Q, Dv), weights (B, Q, T)).
    """
    q_proj, key_proj = attention.W_q(queries), attention.W_k(keys)
    w_v = attention.w_v.weight.reshape(-1)
    return additive_attention(q_proj, key_proj, values, w_v, valid_lens, attention.dropout.p, attention.training)


def _attend_step(q_proj, key_proj, values, w_v, valid_lens, dropout_p, training):
    context, weights = _attend(q_proj.unsqueeze(1), key_proj, values, w_v, valid_lens, dropout_p, training)
    return context.squeeze(1), weights.squeeze(1)


def decoder_forward(decoder, X, enc_outputs, hidden, valid_lens, key_proj):
    """The ``triton`` backend of ``Seq2SeqAttentionDecoder.forward``: ``torch_ops``'s step
    loop with the fused kernel as each step's attention. Returns (logits (B, S, V), final
    hidden (L, B, H), attention weights (B, S, T))."""
    return torch_ops.decoder_loop(decoder, X, enc_outputs, hidden, valid_lens, key_proj, _attend_step)


def encoder_forward(encoder, X):
    """The encoder has no attention: the same ``nn.GRU`` call as the ``torch`` backend."""
    return torch_ops.encoder_forward(encoder, X)
