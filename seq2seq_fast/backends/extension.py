"""Loads the compiled extension ``seq2seq_fast._C`` once, and remembers why it failed if it did."""
import functools

import torch


@functools.lru_cache(maxsize=None)
def extension_error():
    """``None`` when ``seq2seq_fast._C`` loaded (its ops are registered), else the reason."""
    try:
        from seq2seq_fast import _C  # noqa: F401  (importing registers torch.ops.seq2seq_fast)
    except ImportError as exc:
        return (
            f"the C++ extension seq2seq_fast._C is not built ({exc}); "
            "run `pip install --no-build-isolation -e .` in the source tree"
        )
    except Exception as exc:  # noqa: BLE001  (a library that loads but fails to register, etc.)
        # Built against another torch, a failing static initialiser: the package still imports
        # and runs the torch backend; the reason shows in unavailable_reason("cpp").
        return (
            f"the C++ extension seq2seq_fast._C failed to load ({type(exc).__name__}: {exc}); "
            "rebuild it against this torch with `pip install --no-build-isolation -e .`"
        )
    return None


def has_kernel(op_name, device_type):
    """Whether ``torch.ops.seq2seq_fast.<op_name>`` has an implementation for ``device_type``."""
    if extension_error() is not None:
        return False
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(device_type)
    if key is None:
        return False
    qualified = f"seq2seq_fast::{op_name}"
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(qualified, key)
    except RuntimeError:
        return False
