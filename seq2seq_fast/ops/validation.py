"""Input checks shared by every public entry point, run once per call before any backend.

Each failure raises ``TypeError`` (wrong type or dtype), ``ValueError`` (wrong shape, size or
value) or ``IndexError`` (token id outside the vocabulary), naming the argument, what was
expected and what came. The value checks (ids in range, lengths non-negative) cost one host
sync per call and are skipped while torch.compile traces, and for CUDA tensors while a CUDA
graph is being captured.
"""
import torch


def _capturing(tensor):
    """True while tracing for torch.compile, or while a CUDA graph is being captured and
    ``tensor`` is on a CUDA device: no host syncs then. Reading a CPU tensor syncs nothing, so
    it is checked even during a capture (and ``torch.cuda.is_available()`` is not asked on every
    CPU call)."""
    if torch.compiler.is_compiling():
        return True
    return tensor.is_cuda and torch.cuda.is_current_stream_capturing()


def check_tensor(value, name):
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    return value


def check_floating(value, name, ndim=None):
    check_tensor(value, name)
    if not value.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {value.dtype}")
    if ndim is not None and value.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(value.shape)}")
    return value


def check_int(value, name, minimum=None):
    """A Python int (or 0-d integer tensor) at least ``minimum``."""
    if isinstance(value, torch.Tensor) and value.dim() == 0 and not value.is_floating_point():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def check_same_device(name_a, a, name_b, b):
    if a.device != b.device:
        raise ValueError(
            f"{name_b} must be on the same device as {name_a} ({a.device}), got {b.device}"
        )


def check_tokens(X, name, vocab_size, ndim=2):
    """Token ids: an integer tensor of ``ndim`` dimensions, non-empty batch."""
    check_tensor(X, name)
    if X.is_floating_point() or X.is_complex() or X.dtype == torch.bool:
        raise TypeError(f"{name} must hold integer token ids, got dtype {X.dtype}")
    if X.dim() != ndim:
        raise ValueError(
            f"{name} must have shape (batch, steps), got shape {tuple(X.shape)}"
        )
    if X.shape[0] == 0:
        raise ValueError(f"{name} must have a batch of at least one row, got shape {tuple(X.shape)}")
    if X.numel() and not _capturing(X):
        low, high = torch.aminmax(X)  # one pass, then one host read each
        low, high = low.item(), high.item()
        if low < 0 or high >= vocab_size:
            bad = low if low < 0 else high
            raise IndexError(
                f"{name} holds token id {bad}, outside the vocabulary [0, {vocab_size})"
            )
    return X


def normalize_valid_lens(valid_lens, name, batch, queries=None):
    """d2l's ``valid_lens`` (None, (B,) or (B, Q); int or float) as int64 counts of valid keys.

    Position j counts as valid when ``j < valid_len``, as d2l compares, so a float length
    becomes its ceiling; lengths >= T are legal and mean "all keys". Negative lengths raise.
    """
    if valid_lens is None:
        return None
    check_tensor(valid_lens, name)
    if valid_lens.dtype == torch.bool or valid_lens.is_complex():
        raise TypeError(f"{name} must be an integer or float tensor, got dtype {valid_lens.dtype}")
    expected = "(batch,)" if queries is None else f"(batch,) or (batch, {queries})"
    if valid_lens.dim() == 1:
        ok = valid_lens.shape[0] == batch
    elif valid_lens.dim() == 2 and queries is not None:
        ok = tuple(valid_lens.shape) == (batch, queries)
    else:
        ok = False
    if not ok:
        raise ValueError(
            f"{name} must have shape {expected} with batch {batch}, got shape {tuple(valid_lens.shape)}"
        )
    if valid_lens.is_floating_point():
        valid_lens = torch.ceil(valid_lens)
    if valid_lens.numel() and not _capturing(valid_lens):
        low = valid_lens.min().item()  # NaN propagates through min
        if not low >= 0:
            raise ValueError(f"{name} must hold lengths >= 0, got {low}")
    # .to() is a call of its own even when the dtype already matches.
    return valid_lens if valid_lens.dtype == torch.int64 else valid_lens.to(torch.int64)


def normalize_lengths(valid_lens, name):
    """A decoder's ``enc_valid_lens`` made what the backends take, without reading its values:
    None stays None; float lengths become their ceiling (position j is valid when j < length,
    as d2l compares; NaN raises ValueError); (B, 1) (one query per step) becomes (B,); other
    integer dtypes become int64. The shape, bool dtype and sign are the backend's checks."""
    if valid_lens is None:
        return None
    if not isinstance(valid_lens, torch.Tensor):
        check_tensor(valid_lens, name)
    if valid_lens.dtype is torch.int64 and valid_lens.dim() == 1:  # what the backends take
        return valid_lens
    if valid_lens.is_floating_point():
        if not _capturing(valid_lens) and bool(torch.isnan(valid_lens).any()):
            raise ValueError(f"{name} must hold lengths >= 0, got nan")
        valid_lens = torch.ceil(valid_lens).to(torch.int64)
    elif valid_lens.dtype != torch.int64 and valid_lens.dtype != torch.bool and not valid_lens.is_complex():
        valid_lens = valid_lens.to(torch.int64)
    if valid_lens.dim() == 2 and valid_lens.shape[1] == 1:
        valid_lens = valid_lens.reshape(valid_lens.shape[0])
    return valid_lens


def check_lengths(lens, name, batch):
    """int64 (batch,) lengths >= 0 (lengths >= T are legal: all keys)."""
    if lens.dtype != torch.int64:
        raise TypeError(f"{name} must be an integer or float tensor, got dtype {lens.dtype}")
    if tuple(lens.shape) != (batch,):
        raise ValueError(f"{name} must have shape (batch,) or (batch, 1) with batch {batch}, got shape {tuple(lens.shape)}")
    if lens.numel() and not _capturing(lens):
        low = lens.min().item()
        if low < 0:
            raise ValueError(f"{name} must hold lengths >= 0, got {low}")


def check_projectable(values, name, weight):
    """``values`` (B, T, in) can go through the linear layer of ``weight`` (out, in): a floating
    tensor of 3 dimensions, at least one row and step, with the weight's dtype and device."""
    check_floating(values, name, ndim=3)
    B, T, width = values.shape
    if width != weight.shape[1] or B == 0 or T == 0:
        raise ValueError(f"{name} must have shape (B >= 1, T >= 1, {weight.shape[1]}), got {tuple(values.shape)}")
    if values.dtype != weight.dtype:
        raise TypeError(f"{name} must have the parameters' dtype {weight.dtype}, got {values.dtype}")
    check_same_device("the decoder's parameters", weight, name, values)
