"""What the CPU backends keep between calls for reuse, counted and freed in one place
(``seq2seq_fast.cpu_cache_bytes`` / ``empty_cache``): the extension's cache of freed blocks and
packed weights (``cpp_ops``), and the bfloat16 output-layer weights kept for inference under
autocast (``autocast``)."""
from seq2seq_fast.backends import autocast, cpp_ops


def empty_cache():
    """Frees what the CPU backends keep for reuse: the extension's cache of freed blocks
    (csrc/cpu/workspace.h), the weights packed for its GEMMs (csrc/cpu/weight_cache.h) and the
    output layers' bfloat16 weights kept for inference under autocast; returns the bytes they
    held (``cpu_cache_bytes()`` just before). The block cache holds at most
    ``SEQ2SEQ_FAST_CPU_CACHE_MB`` megabytes (default 512), the packed weights at most 64 entries;
    each kept output-layer weight goes when its layer does."""
    return cpp_ops.empty_cache() + autocast.release_kept_weights("cpu")


def cpu_cache_bytes():
    """Bytes the CPU backends keep for reuse: freed blocks waiting for the next call, packed
    weights, and the output layers' bfloat16 weights kept for inference under autocast."""
    return cpp_ops.cpu_cache_bytes() + autocast.kept_weight_bytes("cpu")
