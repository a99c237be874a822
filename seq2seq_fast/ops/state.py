"""The decoder state: d2l's three items, plus the projected keys cached for incremental decoding."""
import torch
import torch.nn.functional as F
from torch.nn.modules import module as _module_hooks

from seq2seq_fast.backends.autocast import as_dtype
from seq2seq_fast.ops.validation import check_projectable


class DecoderState(list):
    """``[enc_outputs (B, T, H), hidden_state (L, B, H), enc_valid_lens]``, unpacking as d2l's state.

    It also remembers ``W_k · enc_outputs`` so that decoding one step per ``forward`` call (as
    d2l's ``predict_seq2seq`` does) projects the keys once per sentence. The cache is used only
    while the same ``enc_outputs`` object and the same ``W_k`` weight are unchanged (tensor
    versions included) and no gradient is needed; otherwise the keys are projected anew. A plain
    list from user code works too, without the cache.
    """

    __slots__ = ("key_cache",)

    def __init__(self, items, key_cache=None):
        super().__init__(items)
        if len(self) != 3:
            raise ValueError(
                f"state must have 3 items [enc_outputs, hidden_state, enc_valid_lens], got {len(self)}"
            )
        self.key_cache = key_cache

    def __reduce_ex__(self, protocol):
        # The cache is an optimisation: pickles and deep copies carry the three items only.
        return (DecoderState, (list(self),))


class KeyCache:
    """Projected keys valid for one (enc_outputs, W_k weight) pair at given tensor versions, with
    ``values``: enc_outputs laid out contiguously (B, T, H), the tensor the backends read."""

    # Read on every planned decoder call (ops/call_plan.py): slots, not a __dict__ to look in.
    __slots__ = ("enc_outputs", "dtype", "enc_version", "weight", "weight_version", "key_proj", "values")

    def __init__(self, enc_outputs, weight, key_proj, values=None, dtype=None):
        self.enc_outputs = enc_outputs
        self.dtype = dtype  # projected_keys' dtype argument: what values were cast to
        self.enc_version = enc_outputs._version
        self.weight = weight
        self.weight_version = weight._version
        self.key_proj = key_proj
        self.values = enc_outputs.contiguous() if values is None else values

    def matches(self, enc_outputs, weight, dtype=None):
        # call_plan.planned_call makes the same test inline: change both together.
        return (
            self.enc_outputs is enc_outputs
            and self.dtype == dtype
            and self.enc_version == enc_outputs._version
            and self.weight is weight
            and self.weight_version == weight._version
        )


def projected_keys(state, enc_outputs, W_k, dtype=None, project=None, linear=None):
    """``(values, key_proj, cache)``: ``enc_outputs`` (B, T, H) laid out contiguously (the
    encoder's outputs arrive as a permuted view of (T, B, H), which the compiled ops would
    otherwise copy on every call, forward and backward), ``W_k(values)``, both taken from
    ``state``'s cache when it still holds, and the cache to hand on (None when a gradient is
    needed: a graph must not outlive one backward). ``dtype``: what ``enc_outputs`` and W_k's
    weight are cast to first (a ``CastingBackend``'s dtype; the caller checked their dtypes).
    ``project``: the backend's ``project_keys(enc_outputs, weight)``, which makes both without
    a gradient where it can (else None; with ``dtype``, where ``enc_outputs`` is in it already);
    torch makes them otherwise, and whenever W_k has forward hooks (a hook expects its call).
    ``linear``: the backend's ``linear_keys(values, weight)``, which projects them with a
    gradient in its GEMM precision where it can (else None)."""
    weight = W_k._parameters["weight"]  # without nn.Module.__getattr__
    if torch.compiler.is_compiling():  # a compiled graph recomputes; versions are not traceable
        values = _laid_out(enc_outputs, dtype)
        return values, _project(W_k, weight, values, dtype), None
    needs_grad = torch.is_grad_enabled() and (enc_outputs.requires_grad or weight.requires_grad)
    if not needs_grad and isinstance(state, DecoderState):
        cache = state.key_cache
        if cache is not None and cache.matches(enc_outputs, weight, dtype):
            return cache.values, cache.key_proj, cache
    if not (needs_grad or project is None or dtype not in (None, enc_outputs.dtype)):
        cache = projected_key_cache(enc_outputs, W_k, project, dtype)
        if cache is not None:
            return cache.values, cache.key_proj, cache
    values = _laid_out(enc_outputs, dtype)
    key_proj = _project(W_k, weight, values, dtype, linear if needs_grad else None)
    return values, key_proj, None if needs_grad else KeyCache(enc_outputs, weight, key_proj, values, dtype)


def projected_key_cache(enc_outputs, W_k, project, dtype=None):
    """The cache of ``enc_outputs``' keys made by ``project`` (a backend's ``project_keys``,
    without a gradient), or None where it does not apply (it returned None) or W_k is hooked."""
    if _hooked(W_k):
        return None
    weight = W_k._parameters["weight"]
    projected = project(enc_outputs, weight)
    return None if projected is None else KeyCache(enc_outputs, weight, projected[1], projected[0], dtype)


def _hooked(module):
    """Whether a forward hook (the module's or a global one) expects ``module`` to be called."""
    return bool(module._forward_hooks or module._forward_pre_hooks or _module_hooks._global_forward_hooks
                or _module_hooks._global_forward_pre_hooks)


def _laid_out(enc_outputs, dtype):
    """``enc_outputs`` contiguous, and in ``dtype`` when one is given."""
    values = enc_outputs.contiguous()
    return values if dtype is None else as_dtype(values, dtype)


def _project(W_k, weight, values, dtype, linear=None):
    """``W_k(values)``, with W_k's ``weight`` cast to ``dtype`` first when it differs (a float16 /
    bfloat16 model run in float32), by ``linear`` (see projected_keys) where it applies and no
    hook expects W_k's call. It runs before any backend's checks: its operand must fit W_k first."""
    cast = dtype is not None and weight.dtype != dtype
    if cast:
        weight = weight.to(dtype)
    check_projectable(values, "enc_outputs (state[0])", weight)
    projected = None if linear is None or _hooked(W_k) else linear(values, weight)
    if projected is not None:
        return projected
    return F.linear(values, weight) if cast else W_k(values)


def reindex_state(state, index):
    """A new state whose batch rows are rows ``index`` (int64 (N,)) of ``state``.

    Beam search uses it to expand each sentence to its beams and to reorder them; the cached
    projected keys are gathered too, so a sentence's beams share one key projection.
    """
    enc_outputs, hidden, valid_lens = state
    new_enc = enc_outputs.index_select(0, index)
    new_valid = None if valid_lens is None else valid_lens.index_select(0, index)
    cache = getattr(state, "key_cache", None)
    new_cache = None
    if cache is not None and cache.matches(enc_outputs, cache.weight, cache.dtype):
        new_cache = KeyCache(new_enc, cache.weight, cache.key_proj.index_select(0, index),
                             None if cache.dtype is None else cache.values.index_select(0, index), cache.dtype)
    return DecoderState([new_enc, hidden.index_select(1, index), new_valid], new_cache)
