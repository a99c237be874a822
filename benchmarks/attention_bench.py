"""The additive attention alone: d2l's module, its math with the key projection hoisted out (as a
decoder does once per sequence), the same under ``torch.compile``, and the fused Triton kernel.

``attention_rows(device, measure)`` returns one dict per (shape, workload, implementation):
``config, workload, impl, median_s, gbps, ratio_to_reference, note``, where ``gbps`` is the
bytes the fused kernel must move (below) over the median time, for every row alike, and
``ratio_to_reference`` is the reference module's median over the row's (> 1: faster).

Bytes the attention must move, elements of the input dtype:
    forward:   q (B·Q·H) + keys (B·T·H) + values (B·T·Dv) + w_v (H) + context (B·Q·Dv) + weights (B·Q·T)
    backward:  reads q, keys, values, w_v, grad context (B·Q·Dv); writes their four gradients

The reference module also projects queries and keys (W_q, W_k) on every call, as d2l's decoder
does per step; the other rows start from projected queries and keys. On a CPU the Triton rows
are not timed: there Triton runs only under its interpreter, which says nothing about speed.
"""
import torch
import torch.nn.functional as F

import seq2seq_fast as sf
from seq2seq_fast import reference as R

# name: (B, Q, T, H, Dv, dropout) — the attention of the decoder configurations (benchmarks/configs.py:
# B, one query per step, T source steps, H hidden units) and the two attention shapes of MLPerf GNMT.
ATTENTION_SHAPES = {
    "zh": (64, 1, 10, 32, 32, 0.1),
    "en": (128, 1, 9, 256, 256, 0.2),
    "large": (64, 1, 30, 512, 512, 0.1),
    "gnmt-b128-q10": (128, 10, 128, 1024, 1024, 0.2),
    "gnmt-b1280-q1": (1280, 1, 66, 1024, 1024, 0.2),
}

WORKLOADS = ("forward", "forward+backward")


def kernel_bytes(shape, workload, element_size):
    B, Q, T, H, Dv, _ = shape
    forward = B * Q * H + B * T * H + B * T * Dv + H + B * Q * Dv + B * Q * T
    if workload == "forward":
        return forward * element_size
    backward = 2 * (B * Q * H + B * T * H + B * T * Dv + H) + B * Q * Dv
    return (forward + backward) * element_size


def hoisted_attention(q_proj, key_proj, values, w_v, valid_lens, dropout_p, training):
    """d2l's attention math, op for op, from projected queries and keys."""
    features = torch.tanh(q_proj.unsqueeze(2) + key_proj.unsqueeze(1))
    weights = R.masked_softmax(features @ w_v, valid_lens)
    return torch.bmm(F.dropout(weights, dropout_p, training), values), weights


def _inputs(shape, device, dtype, seed=0):
    B, Q, T, H, Dv, p = shape
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    module = R.AdditiveAttention(H, H, H, p).to(device=device, dtype=dtype)
    queries = torch.randn(B, Q, H, generator=g, dtype=dtype).to(device)
    keys = torch.randn(B, T, H, generator=g, dtype=dtype).to(device)
    values = keys if Dv == H else torch.randn(B, T, Dv, generator=g, dtype=dtype).to(device)
    lens = torch.randint(1, T + 1, (B,), generator=g).to(device)
    with torch.no_grad():
        q_proj, key_proj = module.W_q(queries), module.W_k(keys)
    w_v = module.w_v.weight.detach().reshape(-1).clone()
    grad = torch.randn(B, Q, Dv, generator=g, dtype=dtype).to(device)
    return module, queries, keys, values.clone(), lens, q_proj, key_proj, w_v, grad


def _callables(shape, device, dtype, workload, compile_reference):
    """{impl: fn() or a string saying why it is not timed}."""
    module, queries, keys, values, lens, q_proj, key_proj, w_v, grad = _inputs(shape, device, dtype)
    p = shape[-1]
    training = workload != "forward"
    module.train(training)
    if training:
        leaves = [x.requires_grad_() for x in (queries, keys, values)]
        proj_leaves = [x.requires_grad_() for x in (q_proj, key_proj, values, w_v)]
    else:
        module.requires_grad_(False)

    def reference():
        context = module(queries, keys, values, lens)
        return torch.autograd.grad(context, leaves + list(module.parameters()), grad) if training else context

    def hoisted(fn):
        def run():
            context, _ = fn(q_proj, key_proj, values, w_v, lens, p, training)
            return torch.autograd.grad(context, proj_leaves, grad) if training else context
        return run

    impls = {"reference module": reference, "reference math, hoisted": hoisted(hoisted_attention)}
    if compile_reference:
        impls["reference math, hoisted, torch.compile"] = hoisted(torch.compile(hoisted_attention, dynamic=False))
    device_type = torch.device(device).type
    reason = sf.unavailable_reason("triton", device_type)
    if device_type != "cuda":
        impls["triton"] = ("not timed: on CPU Triton runs only under TRITON_INTERPRET=1, an interpreter "
                           "(no CUDA device here)")
    elif reason is not None:
        impls["triton"] = f"not timed: {reason}"
    else:
        from seq2seq_fast.backends.triton_ops import additive_attention

        impls["triton"] = hoisted(additive_attention)
    return impls


def _copy_rate(device, measure, nbytes=256 << 20):
    src = torch.empty(nbytes // 4, device=device, dtype=torch.float32).normal_()
    dst = torch.empty_like(src)
    return 2 * nbytes / measure(lambda: dst.copy_(src))


def _row(config, workload, impl, seconds, nbytes, base, note=""):
    return dict(
        config=config, workload=workload, impl=impl,
        median_s=float(f"{seconds:.4g}") if seconds else None,
        gbps=round(nbytes / seconds / 1e9, 2) if seconds else None,
        ratio_to_reference=round(base / seconds, 3) if seconds and base else None,
        note=note,
    )


def attention_rows(device, measure, shapes=None, workloads=WORKLOADS, dtype=torch.float32, compile_reference=True,
                   log=print):
    """Time every implementation on every shape; ``measure(fn) -> median seconds`` synchronises
    and warms up. Ends each (shape, workload) with a ``floor`` row: the bytes at the device's
    measured copy rate."""
    shapes = ATTENTION_SHAPES if shapes is None else shapes
    element = torch.empty((), dtype=dtype).element_size()
    bandwidth = _copy_rate(device, measure)
    rows = []
    for config, shape in shapes.items():
        for workload in workloads:
            nbytes = kernel_bytes(shape, workload, element)
            times, notes = {}, {}
            for impl, fn in _callables(shape, device, dtype, workload, compile_reference).items():
                if isinstance(fn, str):
                    times[impl], notes[impl] = None, fn
                    continue
                try:
                    times[impl] = measure(fn)
                except Exception as exc:  # a row that cannot run says why instead of stopping the run
                    times[impl], notes[impl] = None, f"failed: {type(exc).__name__}: {str(exc).strip().splitlines()[0][:120]}"
            base = times["reference module"]
            for impl, seconds in times.items():
                rows.append(_row(config, workload, impl, seconds, nbytes, base, notes.get(impl, "")))
            rows.append(_row(config, workload, "floor (bytes at copy rate)", nbytes / bandwidth, nbytes, base,
                             f"{bandwidth / 1e9:.1f} GB/s copy"))
            if log:
                for row in rows[-len(times) - 1:]:
                    log("  ".join(f"{k}={v}" for k, v in row.items() if v not in ("", None)))
    return rows
