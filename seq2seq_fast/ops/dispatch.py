"""Which backends can run here, and which one ``backend="auto"`` picks for a call.

A backend is a module ``seq2seq_fast.backends.<name>_ops`` imported on first use, so importing
the package never imports triton. Each backend module provides ``NAME``, ``CHECKS_INPUTS``,
``unsupported_reason(device_type, dtype, grad_mode)``, ``decoder_forward(decoder, X,
enc_outputs, hidden, valid_lens, key_proj)`` (see ``backends.torch_ops``), ``encoder_forward``
and ``attention_forward``; a backend may also provide ``greedy_loop``.
"""
import importlib
import importlib.util
import os

import torch

from seq2seq_fast.backends.autocast import autocast_dtype, in_float32, under_autocast
from seq2seq_fast.backends.extension import extension_error, has_kernel
from seq2seq_fast.backends.verified import gpu_verified

BACKEND_NAMES = ("torch", "triton", "cpp")


def _triton_reason(device_type):
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (pip install triton)"
    interpreted = os.environ.get("TRITON_INTERPRET", "0") == "1"
    if device_type == "cpu" or (device_type is None and interpreted):
        if interpreted:
            return None
        return "triton runs on CPU tensors only under TRITON_INTERPRET=1 (set before import)"
    if device_type not in (None, "cuda"):
        return f"triton runs on CUDA devices, not {device_type}"
    if not torch.cuda.is_available():
        return "triton needs a CUDA device (or TRITON_INTERPRET=1 for CPU tensors)"
    return None


def _cpp_reason(device_type):
    error = extension_error()
    if error is not None:
        return error
    if device_type is not None and not has_kernel("decoder_forward", device_type):
        return f"the C++ extension was built without {device_type.upper()} kernels"
    if device_type is None and not has_kernel("decoder_forward", "cpu"):
        return "the C++ extension registers no decoder ops"
    return None


def unavailable_reason(name, device_type=None):
    """``None`` if backend ``name`` can run (on ``device_type``, if given), else why not."""
    check_backend_name(name)
    if name == "torch":
        return None
    reason = _triton_reason(device_type) if name == "triton" else _cpp_reason(device_type)
    if reason is None and importlib.util.find_spec(f"seq2seq_fast.backends.{name}_ops") is None:
        reason = f"this installation has no {name} backend module"
    return reason


def available_backends(device_type=None):
    """Names of the backends that can run on this machine (on tensors of ``device_type``, if
    given: on a GPU machine Triton runs CUDA tensors, not CPU ones), among ``torch``,
    ``triton``, ``cpp``."""
    return [name for name in BACKEND_NAMES if unavailable_reason(name, device_type) is None]


_REQUESTABLE = BACKEND_NAMES + ("auto",)


def check_backend_name(name):
    if not isinstance(name, str) or name not in _REQUESTABLE:
        raise ValueError(f"backend must be one of {_REQUESTABLE}, got {name!r}")


def _auto_order(device_type):
    # The compiled loop first, then the Triton kernel (CUDA only: the interpreter is for tests),
    # then plain torch, which runs everything. On CUDA only the paths a GPU has run the tests of
    # (backends/verified_gpu.json, written by make gpu-check): compiling is not running.
    if device_type == "cuda":
        return tuple(name for name in ("cpp", "triton") if gpu_verified(name, "cuda")) + ("torch",)
    return ("cpp", "torch")


def _call_unsupported(name, entry, device_type, dtype, grad_mode):
    reason = unavailable_reason(name, device_type)
    if reason is not None:
        return reason
    module = backend_module(name)
    if not hasattr(module, entry):
        return f"the {name} backend provides no {entry}"
    return module.unsupported_reason(device_type, dtype, grad_mode)


_HALVES = (torch.float16, torch.bfloat16)


def _choose(requested, entry, device_type, dtype, grad_mode):
    """(name, None) of the backend that runs the call, or (None, why the named one cannot).

    A float16 / bfloat16 model on CPU goes to the ``cpp`` loop when it can run the call in
    float32 (``auto`` or ``cpp`` requested): ``backend_for`` wraps it in a ``CastingBackend``
    that casts the parameters to float32 on every call and the results back. Measured on one
    thread of a Xeon with AMX-BF16, a bfloat16 model's training step / greedy decoding:
    B4 T7 H32 V50 1.6 / 0.5 ms against 33 / 9.7 ms on the torch backend in bfloat16;
    B64 T32 H256 V8000 1.55 / 0.68 s against 1.35 / 0.80 s; and more accurate.
    """
    if (dtype in _HALVES and device_type == "cpu" and requested in ("auto", "cpp")
            and _call_unsupported("cpp", entry, device_type, torch.float32, grad_mode) is None):
        return "cpp", None
    if requested != "auto":
        reason = _call_unsupported(requested, entry, device_type, dtype, grad_mode)
        if reason is not None:
            return None, f"backend {requested!r} cannot run this call on {device_type}: {reason}"
        return requested, None
    for name in _auto_order(device_type):
        if _call_unsupported(name, entry, device_type, dtype, grad_mode) is None:
            return name, None
    return "torch", None


# (requested, entry, device type, dtype, grad mode, autocast, TRITON_INTERPRET) -> _choose's
# answer. The answers depend otherwise only on what is installed and on the extension's
# registered kernels, which do not change once it is loaded. TRITON_INTERPRET decides only
# whether a requested triton runs on CPU (auto never picks triton there), and a process (a
# test) may set it after import: it is part of the key of triton requests only.
_CHOICES = {}


@torch.compiler.assume_constant_result
def _selected_name(requested, entry, device_type, dtype, grad_mode, autocast):
    # Runs in plain Python even under torch.compile (imports, environment, dispatcher queries):
    # the traced graph sees only the resulting name.
    interpret = os.environ.get("TRITON_INTERPRET") if requested == "triton" else None
    if not isinstance(requested, str):  # a dict key must hash; the name check says what is wrong
        check_backend_name(requested)
    key = (requested, entry, device_type, dtype, grad_mode, autocast, interpret)
    choice = _CHOICES.get(key)
    if choice is None:
        check_backend_name(requested)
        choice = _CHOICES[key] = _choose(requested, entry, device_type, dtype, grad_mode)
    name, error = choice
    if error is not None:
        raise ValueError(error)
    return name


def backend_for(requested, entry, tensor, weight=None):
    """The backend module that runs ``entry`` (e.g. ``"decoder_forward"``) for a call on
    ``tensor``'s device and dtype in the current grad mode and autocast state.

    A named backend that cannot run the call raises ``ValueError`` saying why; ``auto`` takes
    the first that can of: ``cpp``, ``triton`` (CUDA only), ``torch`` (on CUDA only paths that
    ``make gpu-check`` verified: ``backends/verified_gpu.json``). Under ``torch.autocast`` on
    ``tensor``'s device the backend comes wrapped in a ``CastingBackend``, which runs it in the
    parameters' dtype and returns the reference's dtypes under the same autocast; a float16 /
    bfloat16 model on CPU runs on the ``cpp`` loop in float32 (see ``_choose``). The
    backend is chosen for ``weight``'s dtype (a parameter of the module) when given, else
    ``tensor``'s.
    The answer for each kind of call is worked out once per process and remembered: later
    calls cost one lookup.
    """
    # The memo's key: torch.device hashes as cheaply as its type string is made, and autocast
    # outside any autocast region (the usual case) is one call.
    device = tensor.device
    autocast = any_autocast_enabled() and torch.is_autocast_enabled(device.type)
    dtype = tensor.dtype if weight is None else weight.dtype
    if autocast:
        return _backend_under_autocast(requested, entry, device, dtype)
    key = (requested, entry, device, dtype, torch.is_grad_enabled(), autocast)
    try:
        module = _RESOLVED.get(key)
    except TypeError:  # an unhashable backend name
        check_backend_name(requested)
    if module is not None:
        return module
    name = _selected_name(requested, entry, device.type, dtype, key[4], autocast)
    module = _LOADED.get(name) or backend_module(name)
    if name == "cpp" and dtype in _HALVES:  # see _choose
        module = in_float32(module, device.type, dtype, autocast=False)
    if requested != "triton":  # a triton request also depends on TRITON_INTERPRET: never short-cut
        _RESOLVED[key] = module
    return module


def _backend_under_autocast(requested, entry, device, dtype):
    """backend_for under autocast: the backend chosen for the parameters' ``dtype``, wrapped in a
    ``CastingBackend`` once per key (the autocast dtype is part of it)."""
    key = (requested, entry, device, dtype, torch.is_grad_enabled(), autocast_dtype(device.type))
    try:
        module = _RESOLVED.get(key)
    except TypeError:  # an unhashable backend name
        check_backend_name(requested)
    if module is not None:
        return module
    name = _selected_name(requested, entry, device.type, dtype, key[4], True)
    module = _LOADED.get(name) or backend_module(name)
    if name == "cpp" and dtype in _HALVES:  # see _choose
        module = in_float32(module, device.type, dtype, autocast=True)
    else:
        module = under_autocast(module, device.type, dtype)
    if requested != "triton":
        _RESOLVED[key] = module
    return module


def any_autocast_enabled():
    """False when autocast is off on every device type (one native call where this torch has
    ``torch._C._is_any_autocast_enabled``; else True, and the caller asks per device type)."""
    return True


any_autocast_enabled = getattr(torch._C, "_is_any_autocast_enabled", any_autocast_enabled)


# backend_for's answers by its key (requested backend, entry, device, dtype, grad mode, autocast):
# the memo of _selected_name, one lookup from the module.
_RESOLVED = {}


def wants_grad(*tensors, module=None):
    """Whether autograd records this call: grad mode is on and an input or parameter needs it."""
    if not torch.is_grad_enabled():
        return False
    for t in tensors:
        if t is not None and t.requires_grad:
            return True
    if module is None:
        return False
    if torch.compiler.is_compiling():
        return any(p.requires_grad for p in module.parameters())
    return _any_parameter_requires_grad(module)


def _any_parameter_requires_grad(module):
    # What any(p.requires_grad for p in module.parameters()) answers, without the generators of
    # named_modules/named_parameters, which cost more than the scan itself.
    for p in module._parameters.values():
        if p is not None and p.requires_grad:
            return True
    for child in module._modules.values():
        if child is not None and _any_parameter_requires_grad(child):
            return True
    return False


_LOADED = {}


def backend_module(name):
    """The module implementing backend ``name`` (imported on first use)."""
    if name not in _LOADED:
        _LOADED[name] = importlib.import_module(f"seq2seq_fast.backends.{name}_ops")
    return _LOADED[name]
