"""The functional forms of d2l's modules: each call picks its backend once, checks once, runs.

A module owns its parameters and calls one function here. Checks live in one place per
backend: a backend whose ops validate their own arguments (``CHECKS_INPUTS = True``: the
compiled ``cpp`` ops, in C++) gets the call after only the normalisation of d2l's loose
inputs (float or (B, 1) lengths); the others get it after ``validation``'s shared checks.
"""
import torch
from torch.nn.modules import module as _module_hooks

from seq2seq_fast.backends import cpp_ops, torch_ops
from seq2seq_fast.backends.autocast import CastingBackend, as_dtype, autocast_disabled, loss_dtype
from seq2seq_fast.ops import call_plan, validation
from seq2seq_fast.ops.dispatch import backend_for
from seq2seq_fast.ops.state import DecoderState, projected_keys


_HALVES = (torch.float16, torch.bfloat16)


def unpack_state(state):
    """``(enc_outputs, hidden_state, enc_valid_lens)`` of a d2l decoder state, or TypeError."""
    if type(state) is DecoderState or (isinstance(state, (list, tuple)) and len(state) == 3):
        return state[0], state[1], state[2]
    raise TypeError(
        "state must be [enc_outputs, hidden_state, enc_valid_lens] as init_state returns, "
        f"got {type(state).__name__}" + (f" of length {len(state)}" if isinstance(state, (list, tuple)) else "")
    )


def check_decoder_inputs(decoder, X, enc_outputs, hidden, lens):
    """The Python checks of a decoder call (backends without checks of their own)."""
    rnn = decoder._modules["rnn"]  # without nn.Module.__getattr__
    H, L = rnn.hidden_size, rnn.num_layers
    validation.check_tokens(X, "X", decoder._modules["embedding"].num_embeddings)
    validation.check_floating(enc_outputs, "enc_outputs (state[0])", ndim=3)
    validation.check_floating(hidden, "hidden_state (state[1])", ndim=3)
    B, T, He = enc_outputs.shape
    if He != H or T == 0 or B == 0:
        raise ValueError(f"enc_outputs (state[0]) must have shape (B >= 1, T >= 1, {H}), got {tuple(enc_outputs.shape)}")
    if hidden.shape != (L, B, H):
        raise ValueError(
            f"hidden_state (state[1]) must have shape (num_layers={L}, B={B}, {H}), got {tuple(hidden.shape)}"
        )
    if X.shape[0] != B:
        raise ValueError(f"X must have the state's batch size {B}, got {X.shape[0]} rows")
    weight = decoder._modules["dense"].weight
    for name, tensor in (("enc_outputs (state[0])", enc_outputs), ("hidden_state (state[1])", hidden)):
        validation.check_same_device("the decoder's parameters", weight, name, tensor)
        if tensor.dtype != weight.dtype:
            raise TypeError(f"{name} must have the parameters' dtype {weight.dtype}, got {tensor.dtype}")
    validation.check_same_device("enc_outputs (state[0])", enc_outputs, "X", X)
    if lens is not None:
        validation.check_lengths(lens, "enc_valid_lens (state[2])", B)
        validation.check_same_device("enc_outputs (state[0])", enc_outputs, "enc_valid_lens (state[2])", lens)


def check_activation(backend, name, tensor):
    """A tensor input of a ``CastingBackend`` call: floating, in the parameters' dtype or (under
    autocast) float16 / bfloat16, else TypeError."""
    validation.check_floating(tensor, name)
    if not backend.accepts(tensor.dtype):
        also = " (or float16 / bfloat16 under autocast)" if backend.autocast else ""
        raise TypeError(f"{name} must have the parameters' dtype {backend.param_dtype}{also}, got {tensor.dtype}")


def prepare_decoder_call(decoder, X, state):
    """One decoder call made ready for its backend: ``(backend, values, hidden, valid_lens,
    key_proj, cache)``, with ``values`` = ``state[0]`` laid out contiguously as (B, T, H) (what
    the backends read), ``key_proj = W_k(values)`` (from ``state``'s cache when it holds) and
    the lengths as int64 (B,) or None."""
    # The usual call (a state from init_state or from the previous call, tensor inputs) in as
    # few Python calls as possible: after the previous call's step loop, each costs several
    # times its warm time (benchmarks/RESULTS.md, thirteenth session).
    enc_outputs, hidden, valid_lens = state if type(state) is DecoderState and len(state) == 3 else unpack_state(state)
    if not (isinstance(X, torch.Tensor) and isinstance(enc_outputs, torch.Tensor)):
        validation.check_tensor(X, "X")
        validation.check_tensor(enc_outputs, "enc_outputs (state[0])")
    W_k = decoder._modules["attention"]._modules["W_k"]  # without nn.Module.__getattr__
    backend = backend_for(decoder.backend, "decoder_forward", enc_outputs, W_k._parameters["weight"])
    lens = validation.normalize_lengths(valid_lens, "enc_valid_lens (state[2])")
    if type(backend) is CastingBackend:
        # The work in backend.dtype: the keys projected there, from enc_outputs cast once.
        for name, tensor in (("enc_outputs (state[0])", enc_outputs), ("hidden_state (state[1])", hidden)):
            check_activation(backend, name, tensor)
        hidden = as_dtype(hidden, backend.dtype)
        with backend.autocast_off():
            values, key_proj, cache = projected_keys(state, enc_outputs, W_k, backend.dtype,
                                                     getattr(backend, "project_keys", None), backend.linear_keys)
        if not backend.CHECKS_INPUTS:
            check_decoder_inputs(decoder, X, values, hidden, lens)
        return backend, values, hidden, lens, key_proj, cache
    if not backend.CHECKS_INPUTS:
        check_decoder_inputs(decoder, X, enc_outputs, hidden, lens)
    values, key_proj, cache = projected_keys(state, enc_outputs, W_k, project=getattr(backend, "project_keys", None))
    return backend, values, hidden, lens, key_proj, cache


def decoder_forward(decoder, X, state, plan=False):
    """``Seq2SeqAttentionDecoder.forward``: (logits (B, S, V), the new state); the attention
    weights (B, S, T) are left in ``decoder._attention_weights``. ``plan``: leave in ``decoder``
    the plan of its next calls like this one (``call_plan``; for a call through its own
    ``__call__`` and ``forward``), or forget it."""
    backend, values, hidden, lens, key_proj, cache = prepare_decoder_call(decoder, X, state)
    Y, hidden_n, attention = backend.decoder_forward(decoder, X, values, hidden, lens, key_proj)
    # d2l's list of S views (B, 1, T) is built on first read of attention_weights (most calls
    # never read it), except when the weights need a gradient: their views must be made in this
    # call's grad mode. Written to __dict__: a plain attribute, no nn.Module.__setattr__ checks.
    decoder.__dict__["_attention_weights"] = (
        list(attention.unsqueeze(2).unbind(1)) if attention.requires_grad else attention)
    if plan:
        call_plan.plan_next_calls(decoder, backend, state, lens, cache)
    return Y, DecoderState([state[0], hidden_n, state[2]], cache)


def encoder_forward(encoder, X):
    """``Seq2SeqEncoder.forward``: (outputs (T, B, H), state (L, B, H))."""
    weight = encoder._modules["embedding"].weight
    backend = backend_for(encoder.backend, "encoder_forward", weight)
    validation.check_tensor(X, "X")
    if not backend.CHECKS_INPUTS:
        validation.check_tokens(X, "X", weight.shape[0])
        validation.check_same_device("embedding.weight", weight, "X", X)
    return backend.encoder_forward(encoder, X)


def attention_forward(attention, queries, keys, values, valid_lens):
    """``AdditiveAttention.forward``: (context (B, Q, Dv), weights (B, Q, T))."""
    validation.check_floating(queries, "queries", ndim=3)
    validation.check_floating(keys, "keys", ndim=3)
    validation.check_floating(values, "values", ndim=3)
    B, Q, _ = queries.shape
    if keys.shape[0] != B or values.shape[0] != B or keys.shape[1] != values.shape[1]:
        raise ValueError(
            "keys (B, T, Dk) and values (B, T, Dv) must share B and T with queries (B, Q, Dq); "
            f"got queries {tuple(queries.shape)}, keys {tuple(keys.shape)}, values {tuple(values.shape)}"
        )
    if B == 0:
        raise ValueError(f"queries must have a batch of at least one row, got shape {tuple(queries.shape)}")
    for name, tensor in (("keys", keys), ("values", values)):
        validation.check_same_device("queries", queries, name, tensor)
    lens = validation.normalize_valid_lens(valid_lens, "valid_lens", B, queries=Q)
    if lens is not None:
        validation.check_same_device("queries", queries, "valid_lens", lens)
    weight = attention._modules["W_q"]._parameters["weight"]
    backend = backend_for(attention.backend, "attention_forward", queries, weight)
    return backend.attention_forward(attention, queries, keys, values, lens)


def masked_softmax(X, valid_lens):
    """d2l's ``masked_softmax`` (see ``seq2seq_fast.masked_softmax``)."""
    validation.check_floating(X, "X", ndim=3)
    lens = validation.normalize_valid_lens(valid_lens, "valid_lens", X.shape[0], queries=X.shape[1])
    if lens is not None:
        validation.check_same_device("X", X, "valid_lens", lens)
    return torch_ops.masked_softmax_scores(X, torch_ops.key_mask(lens, X.shape[-1]))


def masked_ce_loss(loss, pred, label, valid_len):
    """``MaskedSoftmaxCELoss.forward``: the per-sequence loss (B,)."""
    validation.check_tensor(pred, "pred")
    validation.check_tensor(label, "label")
    device_type = pred.device.type
    autocast = torch.is_autocast_enabled(device_type)
    if pred.dtype in _HALVES and (autocast or device_type == "cpu"):
        # float16 / bfloat16 logits under autocast or on CPU: the loss in float32, returned in the
        # dtype of d2l's loss (under the same autocast). The fused CPU op reads bfloat16 logits
        # as they are; others are cast up first.
        dtype = loss_dtype(device_type, pred.dtype) if autocast else pred.dtype
        if device_type != "cpu" or cpp_ops.loss_unsupported_reason(pred, loss) is not None:
            pred = pred.float()
        with autocast_disabled(device_type):
            return _masked_ce_loss(loss, pred, label, valid_len).to(dtype)
    return _masked_ce_loss(loss, pred, label, valid_len)


def _masked_ce_loss(loss, pred, label, valid_len):
    if cpp_ops.loss_unsupported_reason(pred, loss) is None:
        # One fused pass (CPU; CUDA once verified); the op checks its arguments. Only d2l's loose inputs are made
        # what it takes.
        label, lens = _loss_targets(label, valid_len)
        return cpp_ops.masked_ce_loss(pred, label, lens)
    validation.check_floating(pred, "pred", ndim=3)
    B, S, vocab = pred.shape
    validation.check_tokens(label, "label", vocab)
    if tuple(label.shape) != (B, S):
        raise ValueError(f"label must have shape (B, S) = {(B, S)}, got {tuple(label.shape)}")
    lens = validation.normalize_valid_lens(valid_len, "valid_len", B)
    validation.check_same_device("pred", pred, "label", label)
    validation.check_same_device("pred", pred, "valid_len", lens)
    return torch_ops.masked_ce_loss(loss, pred, label, lens)


def clip_grad_norm_(grads, theta):
    """d2l's ``grad_clipping`` rule on a list of gradient tensors: when their global 2-norm
    exceeds ``theta``, scale each in place by ``theta / norm``. One call and no host read of the
    norm: the compiled op on CPU, torch's multi-tensor kernels elsewhere. Returns the norm (0-dim).

    >>> grads = [p.grad for p in net.parameters() if p.grad is not None]
    >>> clip_grad_norm_(grads, 1.0)
    tensor(0.8312)
    """
    if not isinstance(grads, (list, tuple)) or not all(isinstance(g, torch.Tensor) for g in grads):
        raise TypeError(f"grads must be a list of tensors, got {type(grads).__name__}")
    if isinstance(theta, bool) or not isinstance(theta, (int, float)) or not theta > 0 or theta == float("inf"):
        raise ValueError(f"theta must be a positive finite number, got {theta!r}")
    if not grads:
        return torch.zeros(())
    norm = cpp_ops.clip_grad_norm_(grads, float(theta))
    if norm is None:
        norm = torch_ops.clip_grad_norm_(grads, float(theta))
    return norm


def _loss_targets(label, valid_len):
    """d2l's loose loss targets made what the fused ops take: integer labels of any width as
    int64, float or (B, 1) lengths as int64 (B,)."""
    if not label.is_floating_point() and label.dtype not in (torch.int64, torch.bool) and not label.is_complex():
        label = label.long()
    return label, validation.normalize_lengths(valid_len, "valid_len")


def linear_masked_ce_loss(hidden, weight, bias, label, valid_len, chunk_rows=None):
    """d2l's ``MaskedSoftmaxCELoss()(hidden @ weight.T + bias, label, valid_len)`` without holding
    the (B, S, V) logits or their gradient: they are made ``chunk_rows`` rows at a time (default:
    about 2M values per chunk) and the gradients are computed in the same pass.

    hidden (B, S, H) float (a (B, S, H) view of step-major memory is read in place), weight
    (V, H), bias (V,), label int (B, S) in [0, V), valid_len (B,). Returns the loss (B,),
    differentiable w.r.t. hidden, weight and bias. CPU, and CUDA once verified on a GPU.

    >>> dense = torch.nn.Linear(16, 10)
    >>> h, label = torch.randn(4, 7, 16), torch.randint(0, 10, (4, 7))
    >>> linear_masked_ce_loss(h, dense.weight, dense.bias, label, torch.tensor([7, 3, 0, 9])).shape
    torch.Size([4])
    """
    validation.check_tensor(hidden, "hidden")
    validation.check_tensor(label, "label")
    reason = cpp_ops.linear_loss_unsupported_reason(hidden)
    if reason is not None:
        raise RuntimeError(f"linear_masked_ce_loss: {reason}")
    if chunk_rows is not None:
        validation.check_int(chunk_rows, "chunk_rows", minimum=1)
    label, lens = _loss_targets(label, valid_len)
    return cpp_ops.linear_masked_ce(hidden, weight, bias, label, lens, chunk_rows)


def decoder_masked_ce_loss(decoder, X, state, label, valid_len, loss):
    """``loss(decoder.forward(X, state)[0], label, valid_len)`` for d2l's ``MaskedSoftmaxCELoss``
    ``loss``: on the cpp backend with the output layer and the loss fused (the logits are never
    held whole, ``linear_masked_ce_loss``), else through the logits. Returns the loss (B,)."""
    backend, values, hidden, lens, key_proj, _ = prepare_decoder_call(decoder, X, state)
    dense = decoder._modules["dense"]._parameters
    # Under autocast / for a half-precision model the fused op runs in the CastingBackend's
    # dtype, unless the output layer is one it runs as torch's bfloat16 linear (faster there).
    casting = type(backend) is CastingBackend
    if (getattr(backend, "inner", backend) is cpp_ops and not (casting and backend.dense_outside(decoder))
            and cpp_ops.linear_loss_unsupported_reason(values) is None
            and cpp_ops.loss_unsupported_reason(values, loss) is None):
        top, _, _ = backend.decoder_top_states(decoder, X, values, hidden, lens, key_proj)
        validation.check_tensor(label, "label")
        label, lens = _loss_targets(label, valid_len)
        return backend.linear_masked_ce(top, dense["weight"], dense["bias"], label, lens)
    return masked_ce_loss(loss, decoder_forward(decoder, X, state)[0], label, valid_len)


def masked_ce_loss_grads(model, encoder, decoder, enc_X, dec_X, label, valid_len, enc_valid_len):
    """The loss (B,) of ``decoder_masked_ce_loss`` after ``encoder`` and ``init_state``, and the
    gradient of its sum for every parameter of ``model`` (the module holding both), computed by
    the compiled ops without autograd's graph: ``(loss, [(parameter, gradient), ...])``, or None
    where that path does not apply and autograd's must run: not both on the ``cpp`` backend
    (under autocast too, but not for a half-precision model, which runs cast to float32, nor with
    an output layer that autocast runs as torch's bfloat16 linear), a parameter that needs no
    gradient, grad mode off, a module or parameter hook (autograd's path would call it), or while
    torch.compile traces. The caller checked that ``encoder`` and ``decoder`` are this package's
    modules with their own ``forward`` and ``init_state``."""
    embedding = encoder._modules["embedding"]._parameters["weight"]
    W_k = decoder._modules["attention"]._modules["W_k"]
    if (not torch.is_grad_enabled() or torch.compiler.is_compiling() or W_k._parameters.get("bias") is not None
            or cpp_ops.linear_loss_unsupported_reason(embedding) is not None):
        return None
    backend = _own_step_backend(encoder, decoder, embedding, W_k._parameters["weight"])
    parameters = None if backend is None else _plain_parameters(model)
    if parameters is None:
        return None
    validation.check_tensor(enc_X, "X")
    validation.check_tensor(dec_X, "X")
    validation.check_tensor(label, "label")
    lens = validation.normalize_lengths(enc_valid_len, "enc_valid_lens (state[2])")
    label, label_lens = _loss_targets(label, valid_len)
    loss, grads = backend.masked_ce_loss_grads(encoder, decoder, enc_X, dec_X, lens, label, label_lens)
    return loss, [(tensor, grad) for tensor, grad in grads if id(tensor) in parameters]


def _own_step_backend(encoder, decoder, embedding, W_k):
    """``cpp_ops``, or under autocast its ``CastingBackend`` (a model in its own dtype, the output
    layer inside the op), when both modules' calls go there; else None."""
    backend = backend_for(decoder.backend, "decoder_forward", embedding, W_k)
    encoder_backend = backend_for(encoder.backend, "encoder_forward", embedding)
    if backend is cpp_ops:
        return backend if encoder_backend is cpp_ops else None
    casting = type(backend) is CastingBackend and backend.runs_in_op(cpp_ops, decoder)
    if casting and type(encoder_backend) is CastingBackend and encoder_backend.inner is cpp_ops:
        return backend
    return None


def _plain_parameters(model):
    """The ids of ``model``'s parameters, or None where autograd's path through it would run a
    hook (of a module, global or of a parameter) or a parameter needs no gradient (its gradient
    must stay None). Walks ``_modules`` itself: ``model.modules()`` names every module on the
    way, about a fifth of a trainer step's Python."""
    if (_module_hooks._global_forward_hooks or _module_hooks._global_forward_pre_hooks
            or _module_hooks._global_backward_hooks or _module_hooks._global_backward_pre_hooks):
        return None
    ids = set()
    modules = [model]
    while modules:
        module = modules.pop()
        if module._forward_hooks or module._forward_pre_hooks or module._backward_hooks or module._backward_pre_hooks:
            return None
        for p in module._parameters.values():
            if p is None:
                continue
            if not p.requires_grad or p._backward_hooks or p._post_accumulate_grad_hooks:
                return None
            ids.add(id(p))
        modules.extend(child for child in module._modules.values() if child is not None)
    return ids
