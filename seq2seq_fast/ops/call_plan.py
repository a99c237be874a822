"""A decoder's next inference calls, planned by its last one.

Decoding step by step (d2l's ``predict_seq2seq`` pattern, beam search: one step per call, the
state handed back) repeats one kind of call dozens of times. The long path
(``functional.decoder_forward``) re-derives everything per call: the backend, the lengths, the
cached keys, the parameter list, the dropout rates, through a dozen Python frames and native
entry points. Right after the op's step loop each of those runs several times slower than warm,
so a 10-step call through the module cost about 40 us more than the op alone
(benchmarks/RESULTS.md, thirteenth and sixteenth sessions).

So after a call that the ``cpp`` backend ran on CPU without gradient or dropout (under CPU
autocast too, where its ``CastingBackend`` runs the op in the parameters' dtype and casts the
results to the reference's dtypes, the output layer in the op), the long path leaves a *plan*
in the decoder: the parameter list it built, and every object it read
to build it (the submodules, the parameters, where each was found), the requested backend and
the hook dicts. The decoder's ``__call__`` (``planned_call``) runs the next call from the plan
when it is of the same kind, checked in one function, mostly by identity in C: a state carrying
a key projection that is still valid (or none yet: a fresh state from ``init_state``, or d2l's
plain tuple or list, whose keys it projects as the long path would), int64 lengths or none, the
same submodule and parameter objects in the same places (``torch.func.functional_call`` swaps
included), eval mode, no grad mode, the autocast state the plan was made in (off, or on CPU
in its dtype, with a hidden state in the parameters' dtype), no tracing or compiling, no hooks,
no instance ``forward``. The op checks every argument itself (csrc/checks.h), as on the long path, so a bad
argument raises the same error. Any other call takes the long path. A plan outlives such calls
(decoding sentence after sentence, each from a fresh state, plans once) and is dropped when the
module it was made from changed; the long path then plans anew. (On CUDA a decoder's per-call
cost goes with ``capture_cuda_graph``.)
"""
import operator

import torch
from torch.nn.modules import module as _hooks

from seq2seq_fast.backends import cpp_ops
from seq2seq_fast.backends.autocast import CastingBackend, as_dtype
from seq2seq_fast.ops.dispatch import any_autocast_enabled, backend_for
from seq2seq_fast.ops.state import DecoderState, projected_key_cache

PLAN = "_call_plan"  # the decoder's attribute: its plan, the mark for one (a str), or None

# What planned_call reads, bound once.
_Module, _Tensor, _int64 = torch.nn.Module, torch.Tensor, torch.int64
_is_grad_enabled = torch.is_grad_enabled
_tracing_state = torch._C._get_tracing_state
_is_compiling = torch.compiler.is_dynamo_compiling  # constant True while Dynamo traces; one frame here
_is_autocast_enabled, _get_autocast_dtype = torch.is_autocast_enabled, torch.get_autocast_dtype
_is_, _get = operator.is_, dict.get
_new_list, _extend = list.__new__, list.extend
_PLAIN_STATES = (list, tuple)  # d2l's init_state returns a tuple, its decoder a list


def plan_next_calls(decoder, backend, state, lens, cache):
    """After a long-path decoder call: mark ``decoder`` for a plan of its next calls like this
    one, or drop its plan when this call was of another kind. ``backend``, ``lens`` and ``cache``
    are what the call ran with (``prepare_decoder_call``); ``state`` is the one it was given.

    The mark is the requested backend's name; the plan is made at the next call that could use
    it (``planned_call``), from the module as it is then, and checked there on every call
    (submodules in eval mode, tracing...). Lengths that needed normalising (float, (B, 1))
    would need it at every call: no plan for those."""
    own = decoder.__dict__
    if (_runs_planned(backend, decoder) and cache is not None and cache.dtype is _cache_dtype(backend)
            and lens is state[2] and not own["training"] and not _is_grad_enabled() and not _is_compiling()
            and cache.values.is_cpu):
        if type(own.get(PLAN)) is not tuple:  # a plan made already stays: planned_call checks it
            own[PLAN] = own.get("backend")
    elif own.get(PLAN) is not None:
        own[PLAN] = None


def _runs_planned(backend, decoder):
    """Whether a plan can run the calls ``backend`` runs for ``decoder``: ``cpp_ops``, or under CPU
    autocast its ``CastingBackend`` in the parameters' own dtype with the output layer in the op
    (the op, run in the backend's scope, and its results cast to the reference's dtypes)."""
    return backend is cpp_ops or (type(backend) is CastingBackend and backend.autocast and backend.device_type == "cpu"
                                  and backend.runs_in_op(cpp_ops, decoder))


def _cache_dtype(backend):
    """The ``dtype`` of the key caches ``backend``'s calls make (``projected_keys``)."""
    return None if backend is cpp_ops else backend.dtype


def _plan_marked(decoder, requested):
    """The plan of a decoder marked for one after a call on backend ``requested``, kept in it;
    None (and no mark) when the module changed since: another backend requested, a submodule
    or parameter gone."""
    own = decoder.__dict__
    plan = None
    if own.get("backend") is requested:
        try:
            plan = _plan(decoder)
        except (KeyError, AttributeError, ValueError):  # ValueError: the backend cannot run it now
            pass
    own[PLAN] = plan
    return plan


def _plan(decoder):
    """What ``planned_call`` checks and runs with, as one tuple (unpacked in one step)."""
    modules = decoder._modules
    attention = modules["attention"]
    inner = attention._modules
    embedding, rnn, dense = modules["embedding"], modules["rnn"], modules["dense"]
    W_q, w_v, W_k, dropout = inner["W_q"], inner["w_v"], inner["W_k"], inner["dropout"]
    params = cpp_ops.decoder_params(decoder)
    key_weight = W_k._parameters["weight"]
    # The backend the long path would take now, in this call's autocast state: the plan covers
    # calls in that state only (a CastingBackend's outputs depend on the autocast dtype).
    backend = backend_for(decoder.backend, "decoder_forward", key_weight)
    if not _runs_planned(backend, decoder):
        return None
    casting = None if backend is cpp_ops else backend
    autocast_dtype = None if casting is None else _get_autocast_dtype("cpu")
    project = backend.project_keys  # a fresh state's keys, as the long path projects them
    own = decoder.__dict__
    hook_names = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
    global_hooks = tuple("_global" + name for name in hook_names)
    # What the long path would read, where it reads it, and what it found there, all compared by
    # identity in C on every planned call: the submodules, the parameters, eval mode.
    places = ((modules, "embedding", embedding), (modules, "attention", attention), (modules, "rnn", rnn),
              (modules, "dense", dense), (inner, "W_q", W_q), (inner, "w_v", w_v), (inner, "W_k", W_k),
              (inner, "dropout", dropout), (rnn.__dict__, "training", False), (dropout.__dict__, "training", False),
              (embedding._parameters, "weight", params[0]), (W_q._parameters, "weight", params[1]),
              (w_v._parameters, "weight", params[2]), (W_k._parameters, "weight", key_weight),
              (dense._parameters, "weight", params[-2]), (dense._parameters, "bias", params[-1]),
              *((rnn._parameters, name, rnn._parameters[name])
                for name in cpp_ops.gru_parameter_names(rnn.num_layers, rnn.bias)))
    containers, names, found = zip(*places)
    # The hook dicts themselves: registering a hook adds to them, nothing rebinds them (torch's
    # global ones are bound once at import, a module's in its __init__).
    hooks = tuple(own[name] for name in hook_names) + tuple(_hooks.__dict__[name] for name in global_hooks)
    # The decoder's own attributes (None: absent), read from the __dict__ of the module called
    # (the plan does not hold that dict: it lives in it): the backend request, no instance
    # `forward`, no compiled call.
    attributes = (("_modules", modules), ("backend", decoder.backend), ("forward", None), ("_compiled_call_impl", None))
    own_names, own_found = zip(*attributes)
    return (key_weight, key_weight.dtype, W_k, own_names, own_found, containers, names, found, hooks, params,
            cpp_ops.decoder_call_op(), casting, autocast_dtype, _cache_dtype(backend), project)


def planned_call(self, *args, **kwargs):
    """The decoder's ``__call__``: ``nn.Module.__call__``, except that a call its plan covers
    runs here, in this one frame (every Python frame between two step loops costs several
    times its warm time), its checks in a few C calls."""
    plan = self._call_plan
    if plan is None or len(args) != 2 or kwargs:
        return _Module.__call__(self, *args, **kwargs)
    X, state = args
    if _is_grad_enabled() or _is_compiling():
        return _Module.__call__(self, *args, **kwargs)
    if type(state) is DecoderState:
        cache = state.key_cache
    elif type(state) in _PLAIN_STATES and len(state) == 3:  # d2l's own: its keys are projected here
        cache = None
    else:
        return _Module.__call__(self, *args, **kwargs)
    own = self.__dict__
    if type(plan) is str:  # marked by the long path (plan_next_calls): made now, for this call on
        plan = _plan_marked(self, plan)
        if plan is None:
            return _Module.__call__(self, *args, **kwargs)
    (key_weight, dtype, key_module, own_names, own_found, containers, names, found, hooks, params, run,
     casting, autocast_dtype, cache_dtype, project) = plan
    # The module as the plan found it; else the plan is stale: dropped, and the long path plans anew.
    # The parameters' dtype is part of the backend choice (a bfloat16 model runs cast to float32).
    if not (key_weight.dtype is dtype and all(map(_is_, map(own.get, own_names), own_found))
            and all(map(_is_, map(_get, containers, names), found))):
        own[PLAN] = None
        return _Module.__call__(self, *args, **kwargs)
    # This call of the kind the plan covers; else the long path runs it and the plan stays.
    enc_outputs, hidden, valid_lens = state
    if casting is None:
        autocast_as_planned = not any_autocast_enabled()
    else:  # hidden as the backend runs it: the long path casts what autocast made, rejects the rest
        autocast_as_planned = (_is_autocast_enabled("cpu") and _get_autocast_dtype("cpu") is autocast_dtype
                               and type(hidden) is _Tensor and hidden.dtype is cache_dtype)
    if not (isinstance(X, _Tensor) and autocast_as_planned and _tracing_state() is None
            and (valid_lens is None or type(valid_lens) is _Tensor and valid_lens.dtype is _int64
                 and valid_lens.dim() == 1)
            and not any(hooks)):
        return _Module.__call__(self, *args, **kwargs)
    if cache is None:  # a fresh state: its keys projected here as the long path would, else by it
        if type(enc_outputs) is not _Tensor:
            return _Module.__call__(self, *args, **kwargs)
        cache = projected_key_cache(enc_outputs, key_module, project, cache_dtype)
        if cache is None:
            return _Module.__call__(self, *args, **kwargs)
    # KeyCache.matches(enc_outputs, key_weight, cache_dtype) written out: no frame for it.
    elif not (cache.enc_outputs is enc_outputs and cache.weight is key_weight and cache.dtype is cache_dtype
              and cache.enc_version == enc_outputs._version and cache.weight_version == key_weight._version):
        return _Module.__call__(self, *args, **kwargs)
    if casting is None:
        Y, hidden_n, weights = run(X, cache.values, hidden, valid_lens, cache.key_proj, params, None, None)
    else:  # CastingBackend.decoder_forward's work, without its frames
        with casting._running():
            Y, hidden_n, weights = run(X, cache.values, hidden, valid_lens, cache.key_proj, params, None, None)
        out = casting.out
        Y, hidden_n, weights = as_dtype(Y, out.linear), as_dtype(hidden_n, out.rnn), as_dtype(weights, out.softmax)
    own["_attention_weights"] = weights
    new_state = _new_list(DecoderState)  # DecoderState(...) without its __init__ frame
    _extend(new_state, (enc_outputs, hidden_n, valid_lens))
    new_state.key_cache = cache
    return Y, new_state
