"""Which GPU paths a ``make gpu-check`` run has verified (``verified_gpu.json`` beside this file,
written by that run's tests stage: the device, the torch/triton versions, the date, and per path
such as ``"cpp:cuda"`` whether its tests ran and passed there). ``backend="auto"`` picks only
verified paths on a GPU; a backend requested by name runs either way."""
import functools
import json
import os

RECORD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "verified_gpu.json")


@functools.lru_cache(maxsize=None)
def verified_paths(path=RECORD):
    """``{"cpp:cuda": bool, ...}`` from the record; empty (nothing verified) if it is missing."""
    try:
        with open(path) as f:
            return dict(json.load(f).get("paths", {}))
    except (OSError, ValueError):
        return {}


def gpu_verified(name, device_type):
    """Whether backend ``name`` on ``device_type`` (e.g. ``"cuda"``) ran its tests on a GPU."""
    return verified_paths().get(f"{name}:{device_type}", False) is True
