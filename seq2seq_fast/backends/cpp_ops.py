"""The ``cpp`` backend: the decoder's and the encoder's whole step loops in the compiled extension.

The ops ``torch.ops.seq2seq_fast.{decoder_forward, decoder_backward, greedy_decode,
encoder_forward, encoder_backward}`` are defined in ``csrc/ops.cpp`` and implemented for CPU in
``csrc/cpu``: preallocated buffers, BLAS GEMMs (the non-recurrent ones batched over all steps),
fused and vectorized attention and GRU-gate loops, and a hand-written backward through time.
Their autograd is registered in C++ (``csrc/autograd.cpp``); this module registers their fake
(meta) implementations with ``torch.library`` (so ``torch.compile(fullgraph=True)`` traces them
and ``opcheck`` passes), draws the dropout masks from torch's generator, and adapts d2l's
modules to the ops.
"""
import contextlib

import torch

from seq2seq_fast.backends.extension import extension_error, has_kernel
from seq2seq_fast.backends.verified import gpu_verified

NAME = "cpp"
# Whether this backend's ops check their own arguments (else ops.functional checks them first):
# the ops check every argument in C++ (csrc/checks.h) before reading it.
CHECKS_INPUTS = True

_FLOATS = (torch.float32, torch.float64)
_HALVES = (torch.float16, torch.bfloat16)  # the CUDA kernels (fp32 accumulation); on CPU the loss takes bfloat16


def unsupported_reason(device_type, dtype, grad_mode):
    """``None`` if the compiled loop can run a call on ``device_type`` in ``dtype``, else why not."""
    error = extension_error()
    if error is not None:
        return error
    if not has_kernel("decoder_forward", device_type):
        return f"the C++ extension has no {device_type} kernels for the decoder loop"
    allowed = _FLOATS + _HALVES if device_type == "cuda" else _FLOATS
    if dtype not in allowed:
        names = ", ".join(str(d).replace("torch.", "") for d in allowed)
        return f"the compiled loop runs on {device_type} in {names}, not {dtype}"
    return None


def _ops():
    if _EXTENSION_ERROR is not None:
        raise RuntimeError(_EXTENSION_ERROR)
    return torch.ops.seq2seq_fast


# ---- memory ---------------------------------------------------------------------------------------


def empty_cache():
    """Frees what the CPU ops keep for reuse: the cache of freed blocks (csrc/cpu/workspace.h)
    and the weights packed for their GEMMs (csrc/cpu/weight_cache.h); returns the bytes they held
    (``cpu_cache_bytes()`` just before). The block cache holds at most ``SEQ2SEQ_FAST_CPU_CACHE_MB``
    megabytes (default 512), the packed weights at most 64 entries."""
    return 0 if _EXTENSION_ERROR is not None else int(torch.ops.seq2seq_fast.release_cpu_cache())


def cpu_cache_bytes():
    """Bytes the CPU ops keep for reuse: freed blocks waiting for the next call, and packed weights."""
    return 0 if _EXTENSION_ERROR is not None else int(torch.ops.seq2seq_fast.cpu_cache_bytes())


# ---- parameters and dropout ----------------------------------------------------------------------


def _gru_weights(rnn):
    """[w_ih_0.., w_hh_0.., b_ih_0.., b_hh_0..] of an ``nn.GRU``, as the ops' params list them
    (zero biases for a GRU built with bias=False)."""
    # Read from _parameters by one C call, as nn.GRU's forward reads them: not its _flat_weights
    # list, which torch.func.functional_call's swaps leave stale until the GRU's own forward.
    try:
        weights = list(map(rnn._parameters.__getitem__, gru_parameter_names(rnn.num_layers, rnn.bias)))
    except KeyError:  # a weight that is no parameter now (e.g. pruned): nn.GRU's own lookup
        rnn._update_flat_weights()
        flat, per_layer = rnn._flat_weights, 4 if rnn.bias else 2
        weights = [flat[i + kind] for kind in range(per_layer) for i in range(0, len(flat), per_layer)]
    if rnn.bias:
        return weights
    w_ih, w_hh = weights[:rnn.num_layers], weights[rnn.num_layers:]
    return [*w_ih, *w_hh, *[w.new_zeros(w.shape[0]) for w in w_ih], *[w.new_zeros(w.shape[0]) for w in w_hh]]


def gru_parameter_names(layers, bias):
    """The names of an ``nn.GRU``'s parameters in the ops' order: w_ih of every layer, w_hh, b_ih, b_hh."""
    names = _GRU_NAMES.get((layers, bias))
    if names is None:
        kinds = ("weight_ih", "weight_hh") + (("bias_ih", "bias_hh") if bias else ())
        names = _GRU_NAMES[layers, bias] = tuple(f"{kind}_l{layer}" for kind in kinds for layer in range(layers))
    return names


_GRU_NAMES = {}  # a dict, not functools.lru_cache: Dynamo traces through it under torch.compile


def _keep_mask(shape, p, like):
    """nn.Dropout's scaled keep-mask: 1/(1-p) with probability 1-p, else 0 (on CPU and CUDA the
    extension's counter-based op, keyed by torch's generator of that device; else bernoulli_)."""
    if like.dtype in _KEEP_MASK_DTYPES.get(like.device.type, ()):
        return _ops().keep_mask(like, shape, p)
    if p >= 1:
        return like.new_zeros(shape)
    return torch.empty(shape, dtype=like.dtype, device=like.device).bernoulli_(1 - p).div_(1 - p)


def _layer_mask(rnn, steps, batch, like):
    """The inter-layer dropout masks (L - 1, steps, B, H) of ``rnn`` in training mode, else None."""
    L = rnn.num_layers
    if not (rnn.training and rnn.dropout > 0 and L > 1):
        return None
    return _keep_mask((L - 1, steps, batch, rnn.hidden_size), rnn.dropout, like)


def _attention_mask(decoder, steps, batch, keys, like):
    dropout = decoder.attention.dropout
    if not (dropout.training and dropout.p > 0):
        return None
    return _keep_mask((steps, batch, keys), dropout.p, like)


def _needs_grad(tensors):
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def decoder_params(decoder):
    """The decoder ops' ``params`` (order documented in csrc/ops.cpp): [embedding, W_q, w_v,
    w_ih_0.., w_hh_0.., b_ih_0.., b_hh_0.., dense weight, dense bias]."""
    # Straight from _modules and _parameters: nn.Module.__getattr__ costs more than the list.
    modules = decoder._modules
    attention = modules["attention"]._modules
    dense = modules["dense"]._parameters
    return [modules["embedding"]._parameters["weight"], attention["W_q"]._parameters["weight"],
            attention["w_v"]._parameters["weight"], *_gru_weights(modules["rnn"]), dense["weight"], dense["bias"]]


def encoder_params(encoder):
    """The encoder ops' ``params``: [embedding, w_ih_0.., w_hh_0.., b_ih_0.., b_hh_0..]."""
    modules = encoder._modules
    return [modules["embedding"]._parameters["weight"], *_gru_weights(modules["rnn"])]


# ---- backend entry points --------------------------------------------------------------------------


def _cast(params, dtype):
    """``params`` in ``dtype`` (differentiable casts), or as they are when ``dtype`` is None."""
    return params if dtype is None else [p.to(dtype) for p in params]


def _dropout_rates(decoder):
    """The decoder ops' dropout rates (attention's, between layers') of ``decoder`` in its
    current mode (0: none)."""
    modules = decoder._modules
    dropout = modules["attention"]._modules["dropout"]
    rnn = modules["rnn"]
    return dropout.p if dropout.training else 0.0, rnn.dropout if rnn.training else 0.0


def decoder_forward(decoder, X, enc_outputs, hidden, valid_lens, key_proj, *, params_dtype=None):
    """The compiled teacher-forced loop of ``Seq2SeqAttentionDecoder.forward``.

    X int64 (B, S); enc_outputs (B, T, H) (keys = values); hidden (L, B, H); valid_lens None or
    int64 (B,); key_proj (B, T, H) = W_k(enc_outputs). Returns (logits (B, S, V), final hidden
    (L, B, H), attention weights before dropout (B, S, T)); differentiable w.r.t. every decoder
    parameter, enc_outputs, key_proj and hidden. ``params_dtype``: what the parameters are cast
    to first (the compiled loop runs a bfloat16 model in float32).
    """
    params = decoder_params(decoder)
    if params_dtype is not None:
        params = _cast(params, params_dtype)
    attention_dropout, layer_dropout = _dropout_rates(decoder)
    return decoder_apply(X, enc_outputs, hidden, valid_lens, key_proj, params, attention_dropout=attention_dropout,
                         layer_dropout=layer_dropout)


def bf16_key_projection(values, weight):
    """``values @ weight.T`` (values (B, T, H) float32, W_k's weight (H, H) float32) with a
    gradient, every GEMM forward and backward on bfloat16-rounded operands with float32
    accumulation and output (``cpu_bf16_matmul``: the rounding autocast asks for, the keys and
    gradients left in float32 as the ops' own GEMMs leave them). Needs ``bf16_gemm_available()``."""
    return _Bf16KeyProjection.apply(values, weight)


def _bf16_matmul(a, b):
    return _ops().cpu_bf16_matmul(a, b, False)


class _Bf16KeyProjection(torch.autograd.Function):
    @staticmethod
    def forward(ctx, values, weight):
        ctx.save_for_backward(values, weight)
        rows = values.reshape(-1, values.shape[-1])
        return _bf16_matmul(rows, weight.t()).view(*values.shape[:-1], weight.shape[0])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        values, weight = ctx.saved_tensors
        grad_rows = grad.reshape(-1, grad.shape[-1]).contiguous()
        d_values = d_weight = None
        if ctx.needs_input_grad[0]:
            d_values = _bf16_matmul(grad_rows, weight).view(values.shape)
        if ctx.needs_input_grad[1]:
            d_weight = _bf16_matmul(grad_rows.t(), values.reshape(-1, values.shape[-1]))
        return d_values, d_weight


def project_keys(enc_outputs, weight):
    """``(values, key_proj)`` of a call without gradient on CPU: ``enc_outputs`` (B, T, H) laid
    out contiguously and ``values @ weight.T`` (the attention's W_k), made by the compiled op in
    the code the step loops keep warm (see csrc/cpu/key_projection.cpp); None where the op does
    not apply (another device, a dtype or shape the caller's checks then name)."""
    if (enc_outputs.device.type != "cpu" or weight.device.type != "cpu" or enc_outputs.dtype not in _FLOATS
            or weight.dtype != enc_outputs.dtype or enc_outputs.dim() != 3 or weight.dim() != 2):
        return None
    B, T, H = enc_outputs.shape
    if B == 0 or T == 0 or weight.shape[0] != H or weight.shape[1] != H or _EXTENSION_ERROR is not None:
        return None
    return torch.ops.seq2seq_fast.project_keys(enc_outputs, weight)


def decoder_apply(X, enc_outputs, hidden, valid_lens, key_proj, params, *, attention_dropout=0.0,
                  layer_dropout=0.0):
    """``decoder_forward`` on explicit parameters (what ``torch.compile`` traces: Dynamo does
    not look into ``nn.GRU`` modules). ``params``: the flat list of ``decoder_params``
    (embedding (V, E), W_q (H, H), w_v (1, H), w_ih, w_hh, b_ih, b_hh of each layer, dense weight
    (V, H), dense bias (V,)); the dropout rates apply as in training mode (0: none)."""
    attn_mask = layer_mask = None
    if attention_dropout > 0 or layer_dropout > 0:
        B, T, H = enc_outputs.shape if enc_outputs.dim() == 3 else (0, 0, 0)
        attn_mask, layer_mask = _decoder_masks(X, B, T, H, params, enc_outputs, attention_dropout, layer_dropout)
    # One dispatch returns what the module returns (csrc/autograd.cpp).
    return _ops().decoder_call(X, enc_outputs, hidden, valid_lens, key_proj, params, attn_mask, layer_mask)


def decoder_call_op():
    """The op ``decoder_apply`` calls (``decoder_call``, without dropout masks here) as the
    dispatcher's own callable: no ``OpOverload.__call__`` frame in between."""
    overload = _ops().decoder_call.default
    return getattr(overload, "_op", overload)


def decoder_top_states(decoder, X, enc_outputs, hidden, valid_lens, key_proj, *, params_dtype=None):
    """``decoder_forward`` without the output layer: (the top GRU layer's states (B, S, H) that
    ``decoder.dense`` reads, a view of step-major memory; final hidden (L, B, H); attention
    (B, S, T)). The op gets a dense of 0 rows, so it makes no logits; the dense layer's gradient
    comes from what consumes the states (``linear_masked_ce``, or ``decoder.dense`` itself)."""
    params = _without_dense(_cast(decoder_params(decoder), params_dtype))
    _, attention, states = _decoder_op(X, enc_outputs, hidden, valid_lens, key_proj, params,
                                       *_dropout_rates(decoder))
    return _top_states(states), states.select(1, states.shape[1] - 1), attention.transpose(0, 1)


def _without_dense(params):
    """The decoder ops' ``params`` with a dense layer of 0 rows: the op makes no logits."""
    weight, bias = params[-2], params[-1]
    return [*params[:-2], weight.new_empty((0, weight.shape[1])), bias.new_empty((0,))]


def _top_states(states):
    """The top layer's states after each step (B, S, H), a view of the op's (L, S + 1, B, H)."""
    return states[-1, 1:].transpose(0, 1)


def _decoder_op(X, enc_outputs, hidden, valid_lens, key_proj, params, attention_dropout, layer_dropout):
    """The decoder_forward op with dropout masks drawn for the rates: (logits (S, B, V),
    attention (S, B, T), states (L, S + 1, B, H))."""
    keep = torch.is_grad_enabled() and _needs_grad([enc_outputs, hidden, key_proj, *params])
    B, T, H = enc_outputs.shape if enc_outputs.dim() == 3 else (0, 0, 0)
    masks = _decoder_masks(X, B, T, H, params, enc_outputs, attention_dropout, layer_dropout)
    logits, attention, states, _, _, _ = _ops().decoder_forward(
        X, enc_outputs, hidden, valid_lens, key_proj, params, *masks, keep)
    return logits, attention, states


def _decoder_masks(X, B, T, H, params, like, attention_dropout, layer_dropout):
    """The decoder op's (attn_mask, layer_mask) for the dropout rates (None where a rate is 0), for
    a batch of B rows, T keys and H hidden units, made like ``like``."""
    # The op checks every argument; the masks only need the sizes the op will check them against.
    S = X.shape[-1] if X.dim() else 0
    attn_mask = layer_mask = None
    if attention_dropout > 0 or layer_dropout > 0:
        L = len(params) // 4 - 1  # 5 + 4L tensors
        if attention_dropout > 0:
            attn_mask = _keep_mask((S, B, T), attention_dropout, like)
        if layer_dropout > 0 and L > 1:
            layer_mask = _keep_mask((L - 1, S, B, H), layer_dropout, like)
    return attn_mask, layer_mask


def greedy_loop(decoder, enc_outputs, hidden, valid_lens, key_proj, *, bos, eos, max_len, return_attention,
                params_dtype=None):
    """Batched greedy decoding entirely in C++ (no autograd).

    Every row starts from ``bos`` and feeds back its argmax; stops once every row produced ``eos``
    or after ``max_len`` steps. Dropout follows the decoder's mode, as its forward does.
    Returns (tokens int64 (B, steps) with eos past each row's end, lengths int64 (B,) = tokens
    before the first eos, attention (B, steps, T) or None). ``params_dtype`` as in ``decoder_forward``.
    """
    B, T = enc_outputs.shape[:2]
    params = _cast(decoder_params(decoder), params_dtype)
    attn_mask = _attention_mask(decoder, max_len, B, T, enc_outputs)
    layer_mask = _layer_mask(decoder.rnn, max_len, B, enc_outputs)
    with torch.no_grad():
        tokens, lengths, attention = _ops().greedy_decode(
            enc_outputs, hidden, valid_lens, key_proj, params, attn_mask, layer_mask,
            int(bos), int(eos), int(max_len), bool(return_attention))
    return tokens, lengths, attention if return_attention else None


def encoder_forward(encoder, X, *, params_dtype=None):
    """d2l's ``Seq2SeqEncoder.forward`` in C++: (output (T, B, H), state (L, B, H)).

    X int64 (B, T). Inter-layer dropout in training mode; differentiable w.r.t. the embedding and
    every GRU parameter. ``params_dtype`` as in ``decoder_forward``.
    """
    params = _cast(encoder_params(encoder), params_dtype)
    layer_mask = _layer_mask(encoder._modules["rnn"], X.shape[-1], X.shape[0], params[0]) if X.dim() else None
    states, _, _ = _ops().encoder_forward(X, params, layer_mask, _needs_grad(params))
    L, T = states.shape[0], states.shape[1] - 1
    return states[L - 1, 1:], states[:, T].contiguous()


def loss_unsupported_reason(pred, loss_module):
    """``None`` if the fused op can compute ``loss_module``'s loss of ``pred``, else why not. On
    CUDA only once ``make gpu-check`` verified the cpp path there (MaskedSoftmaxCELoss has no
    backend argument: it is always "auto")."""
    reason = _fused_reason("the fused loss", pred, _LOSS_KERNEL_MISSING, cpu_dtypes=_FLOATS + (torch.bfloat16,))
    if reason is not None:
        return reason
    if loss_module.weight is not None or loss_module.label_smoothing != 0 or loss_module.ignore_index >= 0:
        return "the fused loss has no class weights, label smoothing or ignored class"
    return None


def masked_ce_loss(pred, label, valid_len):
    """d2l's masked softmax cross-entropy (B,) of logits ``pred`` (B, S, V), ``label`` (B, S)
    and ``valid_len`` int64 (B,), fused in one pass (differentiable w.r.t. ``pred``); float32
    for bfloat16 logits on CPU."""
    return _ops().masked_ce_loss(pred, label, valid_len)[0]


@contextlib.contextmanager
def step_on_caller():
    """For a small model's training step on CPU: all of it on the calling thread, torch's own ops
    (a few small GEMMs, fills, additions between this package's ops) and the compiled ops' pieces
    alike. An OpenMP region waits for every thread of its team, and on a busy machine one starts
    a time slice late, at every region (the zh step went from 3 to 50+ ms on 2 threads with
    another process running). The compiled ops' own threads never hold a call up that way, but
    a d2l zh step hands them about 50 pieces in 15 calls, too small to pay for waking a thread:
    the trainer's step ran 7-14 % faster on the caller alone (AMD Zen 4, 2 threads; the
    sessions before measured 2 threads at 0.98-1.02 of one)."""
    if _EXTENSION_ERROR is not None:
        yield
        return
    threads = torch.get_num_threads()
    previous = _ops().set_cpu_threads(1)
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        _ops().set_cpu_threads(previous)


def bf16_gemm_kernel():
    """What the CPU ops' bfloat16 GEMMs run on here: "amx" (the extension's AMX tile kernel for
    the step loops' weights, MKL's bfloat16 GEMM for the rest), "avx512bf16" (the extension's
    AVX512-BF16 kernel for every GEMM: AMD Zen 4), "mkl" (MKL's, with both kernels ruled out by
    ``SEQ2SEQ_FAST_AMX=0`` and ``SEQ2SEQ_FAST_AVX512BF16=0``), or "none" (bfloat16 no faster than
    float32 here)."""
    return "none" if _EXTENSION_ERROR is not None else _ops().cpu_bf16_gemm()


def bf16_gemm_available():
    """Whether the CPU ops run their GEMMs faster on bfloat16 operands here."""
    return bf16_gemm_kernel() != "none"


def set_bf16_gemm(enabled):
    """Whether the CPU ops this thread calls from now on (and the backward of those that record
    one) run their GEMMs on bfloat16 operands with float32 accumulation, where
    ``bf16_gemm_available()``: the precision autocast asks for. The GRU gates, softmax, attention
    scores, loss and recurrent state stay float32, and so do GEMMs too small to be faster in
    bfloat16 (csrc/cpu/gemm_bf16.h). Returns the previous setting."""
    return _ops().set_bf16_gemm(enabled)


def clip_grad_norm_(grads, theta):
    """d2l's gradient clipping of ``grads`` (CPU, contiguous, one float dtype) in one call: the
    global norm, and every tensor scaled in place by ``theta / norm`` when it exceeds ``theta``.
    Returns the norm (0-dim); ``None`` when the op cannot take these tensors (the caller falls
    back to torch's multi-tensor ops)."""
    first = grads[0]
    if _EXTENSION_ERROR is not None or first.device.type != "cpu" or first.dtype not in _FLOATS:
        return None
    try:
        # The op checks every tensor (one dtype and device, contiguous) before it touches any:
        # a list it rejects is left as it was, for torch's ops.
        return _ops().clip_grad_norm_(grads, theta)
    except (TypeError, ValueError):
        return None


def _clip_fake(grads, theta):
    return grads[0].new_empty(())


# Values of the logits chunk that linear_masked_ce holds at once (8 MiB in float32): 262 rows on
# an 8000-word vocabulary, enough for its GEMMs to run at speed. On the large benchmark setting
# (benchmarks/train_memory.py) 2M and 4M values ran equally fast within the noise; 2M held less.
LINEAR_LOSS_CHUNK_VALUES = 1 << 21


def linear_loss_unsupported_reason(hidden):
    """``None`` if the fused output layer + loss can run on ``hidden``'s device and dtype, else
    why not (on CUDA only once ``make gpu-check`` verified the cpp path there)."""
    return _fused_reason("the fused output layer + loss", hidden, _LINEAR_LOSS_KERNEL_MISSING)


def _fused_reason(what, tensor, kernel_missing, cpu_dtypes=_FLOATS):
    """Why op ``what`` cannot run on ``tensor``'s device and dtype (``kernel_missing``: {device:
    None, or why its kernel is missing}), or None: CPU in ``cpu_dtypes`` and, once ``make
    gpu-check`` verified the cpp path, CUDA in float32/float64/float16/bfloat16."""
    device = tensor.device.type
    if device not in kernel_missing:
        return f"{what} runs on CPU and CUDA, not {device}"
    if device == "cuda" and not gpu_verified("cpp", "cuda"):
        return f"{what}'s CUDA code has not run on a GPU yet (make gpu-check)"
    allowed = _FLOATS + _HALVES if device == "cuda" else cpu_dtypes
    if tensor.dtype not in allowed:
        names = ", ".join(str(dtype).removeprefix("torch.") for dtype in allowed)
        return f"{what} runs on {device} in {names}, not {tensor.dtype}"
    return kernel_missing[device]


def linear_masked_ce(hidden, weight, bias, label, valid_len, chunk_rows=None):
    """d2l's masked softmax cross-entropy (B,) of the logits ``hidden @ weight.T + bias``, without
    making them whole: hidden (B, S, H), weight (V, H), bias (V,), label int64 (B, S), valid_len
    int64 (B,). Differentiable w.r.t. hidden, weight and bias; the gradients are computed in the
    forward when one is needed (see csrc/ops.cpp)."""
    if chunk_rows is None:
        chunk_rows = _loss_chunk_rows(weight)
    with_grads = _needs_grad([hidden, weight, bias])
    return _ops().linear_masked_ce(hidden, weight, bias, label, valid_len, chunk_rows, with_grads)[0]


def _loss_chunk_rows(weight):
    return max(1, LINEAR_LOSS_CHUNK_VALUES // max(1, weight.shape[0]))


def masked_ce_loss_grads(encoder, decoder, X, dec_X, enc_valid_lens, label, valid_len):
    """A training step's loss and gradients without autograd: d2l's ``MaskedSoftmaxCELoss`` (B,)
    of ``EncoderDecoder(encoder, decoder)(X, dec_X, enc_valid_lens)``'s logits, and the gradient
    of its sum w.r.t. every tensor the ops read, as ``[(tensor, gradient), ...]`` (the decoder's
    key projection W_k included; a GRU built without biases adds zero tensors that are no
    parameters). The same ops in the same order as the modules' forward and ``backward()``, so
    the same dropout draws and the same numbers; what it leaves out is the graph: its nodes,
    saved tensors, the gradient of each view the modules hand on (zero-filled (L, T + 1, B, H)
    tensors per view) and their sums: 12-17 % of a d2l zh training step here. One op call
    (``training_step_grads``, csrc/training_step.cpp); the dropout masks drawn here first.

    X, dec_X int64 (B, T), (B, S); enc_valid_lens None or int64 (B,); label int64 (B, S);
    valid_len int64 (B,). W_k has no bias (``AdditiveAttention``'s)."""
    enc_params, dec_params = encoder_params(encoder), decoder_params(decoder)
    W_k = decoder._modules["attention"]._modules["W_k"]._parameters["weight"]
    # The masks in the order the modules' forward draws them: the encoder's, then the decoder's.
    rnn = encoder._modules["rnn"]
    B, T = (X.shape[0], X.shape[-1]) if X.dim() else (0, 0)
    enc_mask = _layer_mask(rnn, T, B, enc_params[0])
    dec_masks = _decoder_masks(dec_X, B, T, rnn.hidden_size, dec_params, enc_params[0], *_dropout_rates(decoder))
    with torch.no_grad():
        loss, enc_grads, dec_grads, grad_W_k = _ops().training_step_grads(
            X, enc_params, enc_mask, dec_X, enc_valid_lens, dec_params, W_k, *dec_masks, label, valid_len,
            _loss_chunk_rows(dec_params[-2]))
    return loss, [*zip(enc_params, enc_grads), *zip(dec_params, dec_grads), (W_k, grad_W_k)]


# ---- torch.library registrations ---------------------------------------------------------------------


def _keep_mask_fake(like, size, p):
    return like.new_empty(size)


def _loss_fake(pred, label, valid_len):
    # float32 for bfloat16 logits on CPU (csrc/ops.cpp)
    dtype = torch.float32 if pred.dtype == torch.bfloat16 and pred.device.type == "cpu" else pred.dtype
    return pred.new_empty(pred.shape[:1], dtype=dtype), pred.new_empty(pred.shape[:2], dtype=dtype)


def _loss_backward_fake(grad_loss, pred, label, valid_len, lse):
    B, S, V = pred.shape
    if pred.transpose(0, 1).is_contiguous():  # step-major logits keep their layout
        return pred.new_empty((S, B, V)).transpose(0, 1)
    return pred.new_empty((B, S, V))


def _rows_like(hidden, width):
    """A (B, S, width) tensor laid out as the fused loss lays out hidden's rows (csrc/checks.h,
    linear_loss_rows): step-major when hidden is a (B, S, H) view of step-major memory."""
    B, S = hidden.shape[:2]
    if not hidden.is_contiguous() and hidden.transpose(0, 1).is_contiguous():
        return hidden.new_empty((S, B, width)).transpose(0, 1)
    return hidden.new_empty((B, S, width))


def _linear_loss_fake(hidden, weight, bias, label, valid_len, chunk_rows, with_grads):
    B, S = hidden.shape[:2]
    if not with_grads:
        return hidden.new_empty((B,)), hidden.new_empty((B, S)), *(hidden.new_empty((0,)) for _ in range(3))
    return (hidden.new_empty((B,)), hidden.new_empty((B, S)), _rows_like(hidden, hidden.shape[2]),
            weight.new_empty(weight.shape), bias.new_empty(bias.shape))


def _linear_loss_backward_fake(grad_loss, hidden, weight, bias, label, valid_len, lse, chunk_rows):
    return _rows_like(hidden, hidden.shape[2]), weight.new_empty(weight.shape), bias.new_empty(bias.shape)


def _layers(params, fixed):
    """L of a packed params list of ``fixed`` + 4L tensors (the C++ ops raise the same error)."""
    L, rest = divmod(len(params) - fixed, 4)
    if L < 1 or rest:
        raise ValueError(f"seq2seq_fast: params must list {fixed} + 4L tensors for L >= 1 GRU layers, "
                         f"got {len(params)} tensors")
    return L


def _decoder_forward_fake(X, enc_outputs, hidden, valid_lens, key_proj, params, attn_mask, layer_mask,
                          keep_activations):
    B, S = X.shape
    T, H = enc_outputs.shape[1], enc_outputs.shape[2]
    L = _layers(params, 5)
    E, V = params[0].shape[1], params[-2].shape[0]
    new = enc_outputs.new_empty
    layer_inputs = new((L - 1, S, B, H)) if layer_mask is not None else new((0,))
    inputs = new((S, B, H + E)) if keep_activations else new((0,))
    gates = new((S, L, B, 4 * H)) if keep_activations else new((0,))
    return new((S, B, V)), new((S, B, T)), new((L, S + 1, B, H)), inputs, layer_inputs, gates


def _contiguous_like(t):
    # The kernels allocate their gradients contiguous whatever the inputs' strides (enc_outputs
    # is usually a permuted view): empty_like would copy the strides and mislead inductor.
    return t.new_empty(t.shape)


def _decoder_backward_fake(grad_logits, grad_attention, grad_states, X, enc_outputs, valid_lens, key_proj, params,
                           attn_mask, layer_mask, attention, states, inputs, layer_inputs, gates):
    L = _layers(params, 5)
    H = enc_outputs.shape[2]
    return (
        _contiguous_like(enc_outputs), enc_outputs.new_empty((L, enc_outputs.shape[0], H)),
        _contiguous_like(key_proj), [_contiguous_like(p) for p in params],
    )


def _greedy_fake(enc_outputs, hidden, valid_lens, key_proj, params, attn_mask, layer_mask, bos, eos, max_len,
                 return_attention):
    _layers(params, 5)
    B, T = enc_outputs.shape[:2]
    steps = torch.library.get_ctx().new_dynamic_size(min=1, max=max_len)
    tokens = enc_outputs.new_empty((B, steps), dtype=torch.int64)
    attention = enc_outputs.new_empty((B, steps, T)) if return_attention else enc_outputs.new_empty((0,))
    return tokens, enc_outputs.new_empty((B,), dtype=torch.int64), attention


def _project_keys_fake(enc_outputs, W_k):
    return enc_outputs.new_empty(enc_outputs.shape), enc_outputs.new_empty(enc_outputs.shape)


def _encoder_forward_fake(X, params, layer_mask, keep_activations):
    B, T = X.shape
    L = _layers(params, 1)
    H = params[1 + L].shape[1]  # w_hh_0 (3H, H)
    new = params[0].new_empty
    layer_inputs = new((L - 1, T, B, H)) if layer_mask is not None else new((0,))
    gates = new((L, T, B, 4 * H)) if keep_activations else new((0,))
    return new((L, T + 1, B, H)), layer_inputs, gates


def _encoder_backward_fake(grad_states, X, params, layer_mask, states, layer_inputs, gates):
    _layers(params, 1)
    return [_contiguous_like(p) for p in params]


_EXTENSION_ERROR = extension_error()
# Per device, why the fused loss cannot run (None: it can), decided once: a constant to
# torch.compile. And the dtypes the keep-mask op makes on each device that has it.
_LOSS_KERNEL_MISSING = {
    device: _EXTENSION_ERROR or (
        None if has_kernel("masked_ce_loss", device) else f"the C++ extension has no {device} fused loss kernel")
    for device in ("cpu", "cuda")
}
_LINEAR_LOSS_KERNEL_MISSING = {
    device: _EXTENSION_ERROR or (
        None if has_kernel("linear_masked_ce", device)
        else f"the C++ extension has no {device} fused output layer + loss kernel")
    for device in ("cpu", "cuda")
}
_KEEP_MASK_DTYPES = {
    device: dtypes for device, dtypes in (("cpu", _FLOATS), ("cuda", _FLOATS + _HALVES))
    if _EXTENSION_ERROR is None and has_kernel("keep_mask", device)
}


def _register():
    if _EXTENSION_ERROR is not None:
        return
    lib = "seq2seq_fast::"
    torch.library.register_fake(lib + "decoder_forward", _decoder_forward_fake)
    torch.library.register_fake(lib + "decoder_backward", _decoder_backward_fake)
    torch.library.register_fake(lib + "greedy_decode", _greedy_fake)
    torch.library.register_fake(lib + "encoder_forward", _encoder_forward_fake)
    torch.library.register_fake(lib + "encoder_backward", _encoder_backward_fake)
    torch.library.register_fake(lib + "keep_mask", _keep_mask_fake)
    torch.library.register_fake(lib + "project_keys", _project_keys_fake)
    torch.library.register_fake(lib + "masked_ce_loss", _loss_fake)
    torch.library.register_fake(lib + "masked_ce_loss_backward", _loss_backward_fake)
    torch.library.register_fake(lib + "clip_grad_norm_", _clip_fake)
    torch.library.register_fake(lib + "linear_masked_ce", _linear_loss_fake)
    torch.library.register_fake(lib + "linear_masked_ce_backward", _linear_loss_backward_fake)


_register()
