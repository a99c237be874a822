"""Backends run in one dtype and returning the dtypes d2l's modules return: under
``torch.autocast``, and for float16 / bfloat16 models on the compiled CPU loop.

d2l's modules are built from ops on autocast's lists (``linear``, ``bmm``; on CUDA ``softmax``,
``cross_entropy`` and cuDNN's GRU too), so under autocast their outputs come in several dtypes:
on CPU with bfloat16, for example, the logits and attention weights are bfloat16 while the GRU
states and the loss stay float32. The compiled ops are on no autocast list and take float32 or
float64 only on CPU. A ``CastingBackend`` runs its backend with autocast switched off in one
dtype -- under autocast the parameters' (float32 for a float32 model), for a float16 / bfloat16
model on the ``cpp`` CPU loop float32 (the parameters cast on every call) -- takes float16 / bfloat16
inputs that autocast made (cast up once at the entry) and casts each output to the dtype the
reference returns, found once per (device type, parameter dtype, autocast dtype) by running the
reference's op kinds on tiny tensors under the caller's autocast (``reference_dtypes``). The
casts are differentiable: gradients reach the parameters in their own dtype.

Low-precision compute: on CPU under bfloat16 autocast (float32 models) and for bfloat16 models,
the ``cpp`` ops run their GEMMs on bfloat16 operands with float32 accumulation, where the
CPU has bfloat16 units and the GEMM gains by it (``cpp_ops.set_bf16_gemm``), and so do the
layers run outside the ops with a gradient: a large output layer (``bf16_linear``, as d2l's
``nn.Linear`` under autocast) and the key projection (``cpp_ops.bf16_key_projection``); gates,
softmax, scores, loss and the recurrent state stay float32, so the result is at least as
accurate as the reference's under autocast. A float64 model stays float64 under autocast, as
d2l's does.
"""
import functools
import os
import warnings
import weakref
from typing import NamedTuple

import torch
import torch.nn.functional as F

from seq2seq_fast.backends.bf16_linear import bf16_linear

_HALVES = (torch.float16, torch.bfloat16)
# The op runs an output layer of up to this many weights inside its step loop (csrc/cpu:
# kSmallWeightValues); a larger one once over all steps, which torch's bfloat16 linear does faster.
_OP_DENSE_MAX_VALUES = 1 << 18


def autocast_dtype(device_type):
    """The dtype of the enabled autocast on ``device_type``."""
    return torch.get_autocast_dtype(device_type)


class ReferenceDtypes(NamedTuple):
    linear: torch.dtype  # nn.Linear / bmm outputs: logits, attention context, projections
    softmax: torch.dtype  # attention weights: softmax of the linear dtype
    rnn: torch.dtype  # nn.GRU outputs and states: encoder outputs, decoder state


_REFERENCE_DTYPES = {}


def reference_dtypes(device_type, dtype):
    """The dtypes d2l's modules with parameters of ``dtype`` return under the autocast now
    enabled on ``device_type``, found by running each op kind once on tiny tensors: whatever
    this torch's autocast lists say (on CPU with bfloat16 the GRU returns float32 and softmax
    keeps bfloat16; on CUDA softmax is on the float32 list)."""
    key = (device_type, dtype, autocast_dtype(device_type))
    found = _REFERENCE_DTYPES.get(key)
    if found is None:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # cuDNN's note on weights outside one flat buffer
            x = torch.zeros(1, 1, 2, dtype=dtype, device=device_type)
            linear = F.linear(x, x[0]).dtype
            scores = torch.zeros(1, 1, 2, dtype=linear, device=device_type)
            softmax = torch.softmax(scores, dim=-1).dtype
            # nn.GRU's op on zero weights of one layer (a module would draw its init from the generator).
            weights = [torch.zeros(shape, dtype=dtype, device=device_type) for shape in ((6, 2), (6, 2), (6,), (6,))]
            rnn = torch._VF.gru(x, torch.zeros_like(x), weights, True, 1, 0.0, False, False, False)[0].dtype
        found = _REFERENCE_DTYPES[key] = ReferenceDtypes(linear, softmax, rnn)
    return found


def loss_dtype(device_type, pred_dtype):
    """The dtype of d2l's ``MaskedSoftmaxCELoss`` of ``pred_dtype`` logits under the autocast now
    enabled on ``device_type``."""
    key = ("loss", device_type, pred_dtype, autocast_dtype(device_type))
    found = _REFERENCE_DTYPES.get(key)
    if found is None:
        with torch.no_grad():
            pred = torch.zeros(1, 2, 1, dtype=pred_dtype, device=device_type)
            label = torch.zeros(1, 1, dtype=torch.long, device=device_type)
            found = _REFERENCE_DTYPES[key] = F.cross_entropy(pred, label, reduction="none").dtype
    return found


def as_dtype(tensor, dtype):
    """``tensor.to(dtype)`` without the call when it is one already (a dispatch saved: most of a
    call's casts under autocast change nothing)."""
    return tensor if tensor.dtype == dtype else tensor.to(dtype)


def cast_up(tensor, dtype):
    """``tensor`` in ``dtype`` if autocast made it float16 / bfloat16, else unchanged (a wrong
    dtype of any other kind is left for the checks to reject)."""
    if tensor is not None and tensor.dtype != dtype and tensor.dtype in _HALVES:
        return tensor.to(dtype)
    return tensor


class _Running:
    """The scope of one inner call: autocast off on ``device_type`` and, with ``set_bf16_gemm``,
    bfloat16 GEMMs on; both restored after. Set directly, not through ``torch.autocast``, whose
    context costs several microseconds (a d2l zh training step makes three such calls). One
    object per call: a backend serves every thread."""
    __slots__ = ("device_type", "set_bf16_gemm", "autocast", "bf16_gemm")

    def __init__(self, device_type, set_bf16_gemm):
        self.device_type = device_type
        self.set_bf16_gemm = set_bf16_gemm

    def __enter__(self):
        self.autocast = torch.is_autocast_enabled(self.device_type)
        torch.set_autocast_enabled(self.device_type, False)
        if self.set_bf16_gemm is not None:
            self.bf16_gemm = self.set_bf16_gemm(True)

    def __exit__(self, *exc):
        if self.set_bf16_gemm is not None:
            self.set_bf16_gemm(self.bf16_gemm)
        torch.set_autocast_enabled(self.device_type, self.autocast)


def autocast_disabled(device_type):
    """``torch.autocast(device_type, enabled=False)`` at a third of its cost."""
    return _Running(device_type, None)


class CastingBackend:
    """Backend module ``inner`` run in ``dtype`` for a model whose parameters are of
    ``param_dtype``, its outputs cast to ``out``'s dtypes: under autocast (``autocast=True``;
    ``dtype`` is then ``param_dtype``, ``out`` the reference's dtypes), and for float16 /
    bfloat16 models on the compiled CPU loop, which runs them in float32 (the parameters are cast
    on every call, ``inner`` taking ``params_dtype``) and returns their dtype."""

    def __init__(self, inner, device_type, param_dtype, dtype, out, autocast, bf16_gemm=False):
        self.inner = inner
        self.NAME = inner.NAME
        self.CHECKS_INPUTS = inner.CHECKS_INPUTS
        self.device_type = device_type
        self.param_dtype = param_dtype
        self.dtype = dtype  # what the work runs in
        self.out = out
        self.autocast = autocast  # whether autocast's float16 / bfloat16 inputs are accepted
        self._kwargs = {} if dtype == param_dtype else {"params_dtype": dtype}
        # Only float32 work: autocast leaves float64 tensors alone, so d2l's float64 model runs
        # in float64 under it (the extension's float64 GEMMs never round).
        bf16_gemm = bf16_gemm and dtype == torch.float32
        # bfloat16 GEMMs (float32 accumulation) where the inner backend offers them and they are
        # faster here (the extension times them once, now, outside any parallel region): its
        # setter, switched on around each call, else None.
        fast_bf16 = bf16_gemm and hasattr(inner, "set_bf16_gemm") and inner.bf16_gemm_available()
        self._set_bf16_gemm = inner.set_bf16_gemm if fast_bf16 else None
        # A large output layer runs in bfloat16 (bf16_linear, oneDNN) wherever the CPU has bfloat16
        # units, whichever kernel the inner backend's GEMMs got (see dense_outside).
        self._dense_in_bf16 = bf16_gemm and device_type == "cpu" and _cpu_has_bf16_units()
        if hasattr(inner, "greedy_loop"):
            self.greedy_loop = self._greedy_loop
        if hasattr(inner, "project_keys"):
            self.project_keys = self._project_keys

    def autocast_off(self):
        return autocast_disabled(self.device_type)

    def _running(self):
        """Around each inner call: autocast off, and the GEMM precision chosen."""
        return _Running(self.device_type, self._set_bf16_gemm)

    def accepts(self, dtype):
        """Whether an activation of ``dtype`` fits: the parameters' dtype, or under autocast
        float16 / bfloat16 (what autocast makes)."""
        return dtype == self.param_dtype or (self.autocast and dtype in _HALVES)

    def decoder_forward(self, decoder, X, enc_outputs, hidden, valid_lens, key_proj):
        dtype, out = self.dtype, self.out
        if self.dense_outside(decoder):
            top, hidden_n, attention = self.decoder_top_states(decoder, X, enc_outputs, hidden, valid_lens, key_proj)
            Y = self._dense(decoder, top)
        else:
            with self._running():
                Y, hidden_n, attention = self.inner.decoder_forward(
                    decoder, X, as_dtype(enc_outputs, dtype), as_dtype(hidden, dtype), valid_lens,
                    as_dtype(key_proj, dtype), **self._kwargs)
        return as_dtype(Y, out.linear), as_dtype(hidden_n, out.rnn), as_dtype(attention, out.softmax)

    def runs_in_op(self, inner, decoder):
        """Whether this backend runs ``inner`` (a backend module) for ``decoder`` as ``inner`` runs
        it: in the parameters' own dtype (under autocast; no cast of a half-precision model), the
        output layer inside the op. Then a caller may call ``inner``'s ops in this backend's scope
        (``_running``) and cast their results to ``out``'s dtypes itself."""
        return self.inner is inner and self.dtype == self.param_dtype and not self.dense_outside(decoder)

    def dense_outside(self, decoder):
        """Whether the output layer runs as torch's own bfloat16 linear after the op: in
        bfloat16 compute on a CPU with bfloat16 units, for a weight too large for the op's
        per-step dense. oneDNN's bfloat16 GEMM runs (S * B) x V x H about twice as fast as MKL's
        bfloat16 GEMM the op would call on AMX; on AMD Zen 4 it made the large decoder forward
        1.28x as fast as the op's float32 output layer, and it still runs the large encoder +
        decoder inference forward 5 % faster than the op's own AVX512-BF16 kernel does (135
        against 142 ms, interleaved)."""
        weight = decoder._modules["dense"]._parameters["weight"]
        return (self._dense_in_bf16 and hasattr(self.inner, "decoder_top_states")
                and weight.numel() > _OP_DENSE_MAX_VALUES)

    def decoder_top_states(self, decoder, X, enc_outputs, hidden, valid_lens, key_proj):
        """The inner backend's ``decoder_top_states`` in the working dtype, for the fused output
        layer and loss (``linear_masked_ce``)."""
        dtype = self.dtype
        with self._running():
            return self.inner.decoder_top_states(decoder, X, as_dtype(enc_outputs, dtype), as_dtype(hidden, dtype),
                                                 valid_lens, as_dtype(key_proj, dtype), **self._kwargs)

    def linear_masked_ce(self, top, weight, bias, label, valid_len):
        """The inner backend's fused output layer and loss in the working dtype, returned in the
        dtype of d2l's loss of the reference's logits (float32 under autocast: its cross-entropy
        is on autocast's float32 list)."""
        dtype = self.dtype
        with self._running():
            loss = self.inner.linear_masked_ce(top, weight.to(dtype), bias.to(dtype), label, valid_len)
        return loss.to(loss_dtype(self.device_type, self.out.linear))

    def masked_ce_loss_grads(self, encoder, decoder, *args):
        """The inner backend's training step without autograd's graph (``cpp_ops``), for a model
        run in its own dtype (under autocast), in the GEMM precision chosen; the loss returned as
        ``linear_masked_ce``'s."""
        with self._running():
            loss, grads = self.inner.masked_ce_loss_grads(encoder, decoder, *args)
        return loss.to(loss_dtype(self.device_type, self.out.linear)), grads

    def _dense(self, decoder, top):
        """``decoder.dense`` of the top states in bfloat16 (float32 accumulation), as the reference's
        ``nn.Linear`` runs under autocast: the logits in bfloat16."""
        dense = decoder._modules["dense"]._parameters
        weight, bias = dense["weight"], dense["bias"]
        steps = top.transpose(0, 1)  # the step-major (S, B, H) memory the states are in: contiguous
        if torch.is_grad_enabled() and (top.requires_grad or weight.requires_grad or bias.requires_grad):
            logits = bf16_linear(steps, weight, bias)
        else:
            # Inference: one GEMM on the weight kept in bfloat16 as (H + 1, V) with the bias as
            # its last row, the states given a column of ones. oneDNN runs it about 1.5x as fast
            # as the (V, H) weight's transpose with a separate bias.
            S, B, H = steps.shape
            rows = steps.new_empty((S * B, H + 1), dtype=torch.bfloat16)
            rows[:, :H].copy_(steps.reshape(S * B, H))
            rows[:, H].fill_(1)
            logits = torch.mm(rows, _weight_with_bias(weight, bias)).view(S, B, -1)
        return logits.transpose(0, 1)  # the (B, S, V) view the op's logits are too

    def linear_keys(self, values, weight):
        """The attention's W_k of ``values`` (B, T, H) for a call with gradient, in the working
        dtype: on bfloat16 operands (float32 keys and gradients, as the inner ops' own GEMMs)
        where the inner backend's GEMMs run so here and the product is large enough to gain by
        it (bf16::use's sizes in csrc/cpu/gemm_bf16.cpp); else None."""
        B, T, K = values.shape
        N = weight.shape[0]
        if self._set_bf16_gemm is None or K < 64 or N < 64 or B * T * K * N < 1 << 22:
            return None
        return self.inner.bf16_key_projection(values, weight)

    def _project_keys(self, enc_outputs, weight):
        """The inner backend's ``project_keys`` (a call without gradient; None where it does not
        apply, e.g. a bfloat16 weight) in the GEMM precision chosen: under CPU bfloat16 autocast a
        large projection on bfloat16 operands, float32 out (d2l's W_k returns bfloat16 there)."""
        with self._running():
            return self.inner.project_keys(enc_outputs, weight)

    def _greedy_loop(self, decoder, enc_outputs, hidden, valid_lens, key_proj, **kwargs):
        dtype = self.dtype
        with self._running():
            tokens, lengths, attention = self.inner.greedy_loop(
                decoder, as_dtype(enc_outputs, dtype), as_dtype(hidden, dtype), valid_lens, as_dtype(key_proj, dtype),
                **kwargs, **self._kwargs)
        return tokens, lengths, None if attention is None else as_dtype(attention, self.out.softmax)

    def encoder_forward(self, encoder, X):
        with self._running():
            outputs, state = self.inner.encoder_forward(encoder, X, **self._kwargs)
        return as_dtype(outputs, self.out.rnn), as_dtype(state, self.out.rnn)

    def attention_forward(self, attention, queries, keys, values, valid_lens):
        dtype = self.dtype
        with self._running():
            context, weights = self.inner.attention_forward(
                attention, cast_up(queries, dtype), cast_up(keys, dtype), cast_up(values, dtype), valid_lens)
        return as_dtype(context, self.out.linear), as_dtype(weights, self.out.softmax)


# id(weight) -> (a weak reference to it, its version, bias, bias version, [weight^T ; bias] in
# bfloat16): each dense layer's inference weight, made again when either tensor changes, dropped
# with the weight. (Keyed by id: tensors compare elementwise, so they cannot be dict keys.)
_WEIGHTS_WITH_BIAS = {}


def _weight_with_bias(weight, bias):
    key = id(weight)
    kept = _WEIGHTS_WITH_BIAS.get(key)
    if (kept is not None and kept[0]() is weight and kept[1] == weight._version and kept[2] is bias
            and kept[3] == bias._version):
        return kept[4]
    packed = torch.cat([weight.detach().t(), bias.detach().unsqueeze(0)]).to(torch.bfloat16)
    ref = weakref.ref(weight, lambda _, key=key: _WEIGHTS_WITH_BIAS.pop(key, None))
    _WEIGHTS_WITH_BIAS[key] = (ref, weight._version, bias, bias._version, packed)
    return packed


def kept_weight_bytes(device_type):
    """Bytes of the output layers' weights kept in bfloat16 on ``device_type``."""
    return sum(kept[4].nbytes for kept in _WEIGHTS_WITH_BIAS.values() if kept[4].device.type == device_type)


def release_kept_weights(device_type):
    """Drops the output layers' weights kept on ``device_type`` (the next inference call makes its
    layer's again); returns their bytes."""
    dropped = [key for key, kept in _WEIGHTS_WITH_BIAS.items() if kept[4].device.type == device_type]
    return sum(_WEIGHTS_WITH_BIAS.pop(key)[4].nbytes for key in dropped)


@functools.cache
def _cpu_has_bf16_units():
    """Whether this CPU has bfloat16 units (AVX512-BF16 or AMX), which torch's bfloat16 GEMMs
    (oneDNN) use; SEQ2SEQ_FAST_BF16_GEMM=0 (every GEMM float32) says no."""
    if os.environ.get("SEQ2SEQ_FAST_BF16_GEMM") == "0":
        return False
    cpu = torch.cpu
    return any(getattr(cpu, name, lambda: False)() for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))


def under_autocast(inner, device_type, param_dtype):
    """``inner`` for calls under the autocast now enabled on ``device_type``, parameters of
    ``param_dtype``: run in that dtype with autocast off, results in the reference's dtypes;
    under CPU bfloat16 autocast its GEMMs on bfloat16 operands."""
    bf16 = device_type == "cpu" and autocast_dtype(device_type) == torch.bfloat16
    return CastingBackend(inner, device_type, param_dtype, param_dtype, reference_dtypes(device_type, param_dtype),
                          True, bf16_gemm=bf16)


def in_float32(inner, device_type, param_dtype, autocast):
    """``inner`` (taking ``params_dtype``) for a float16 / bfloat16 model: run in float32,
    results in the reference's dtypes (the model's, or autocast's when ``autocast``); a bfloat16
    model's GEMMs on bfloat16 operands (a float16 model's would lose precision so)."""
    out = reference_dtypes(device_type, param_dtype) if autocast else ReferenceDtypes(*[param_dtype] * 3)
    bf16 = device_type == "cpu" and param_dtype == torch.bfloat16
    return CastingBackend(inner, device_type, param_dtype, torch.float32, out, autocast, bf16_gemm=bf16)
