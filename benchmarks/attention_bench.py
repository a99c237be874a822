"""The additive attention alone: d2l's module, its math with the key projection hoisted out (as a
decoder does once per sequence), the same under ``torch.compile``, and the fused Triton kernel.

Implementations (``ATTENTION_IMPLS``): ``reference`` is d2l's module, which also projects queries
and keys (W_q, W_k) on every call, as d2l's decoder does per step; ``hoisted`` is d2l's math
op for op from projected queries and keys; ``hoisted+compile`` is that under ``torch.compile``;
``triton`` the fused kernel (CUDA; on a CPU Triton runs only under its interpreter, which says
nothing about speed, so it is not run there).

``attention_rows`` returns rows in the runner's format (``rows.group_rows``), each group ending
with its floor (``floor.FloorWork``): the GEMMs below run by torch.matmul, or the bytes the fused
kernel must move copied, whichever takes longer. Bytes, in
elements of the input dtype:
    forward:   q (B·Q·H) + keys (B·T·H) + values (B·T·Dv) + w_v (H) + context (B·Q·Dv) + weights (B·Q·T)
    backward:  reads q, keys, values, w_v, grad context (B·Q·Dv); writes their four gradients
GEMMs: the score, tanh features (B·Q·T, H) by w_v (H, 1), and the context, weights (Q, T) by
values (T, Dv) batched over B; with backward also their gradients (``floor.backward_gemms``).
"""
import torch
import torch.nn.functional as F

import seq2seq_fast as sf
from floor import FloorWork, Gemm, backward_gemms
from rows import failing, group_rows, time_group
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

# A tiny shape for the runner's smoke test (not a benchmark).
SMOKE_SHAPE = (3, 1, 4, 6, 6, 0.1)

ATTENTION_WORKLOADS = ("forward", "forward+backward")
ATTENTION_IMPLS = ("reference", "hoisted", "hoisted+compile", "triton")

# Inductor (torch 2.14; the bug is open upstream) fails on the forward of d2l's masked softmax (sequence_mask writes
# X[~mask] = value in place): its CPP backend's outer-loop fusion promotes that mutation's output
# to a local buffer and raises KeyError: 'bufN' (pytorch/pytorch#196570, fix proposed in #196639).
# Fusing at most 4 nodes into one kernel avoids the failing fusion.
INDUCTOR_WORKAROUND = {"max_fusion_size": 4}
INDUCTOR_WORKAROUND_NOTE = ("compiled with options max_fusion_size=4: the default options fail in inductor's "
                            "CPP backend on d2l's in-place mask (InductorError: KeyError: 'buf2', "
                            "pytorch/pytorch#196570)")


def attention_gemms(shape, workload):
    B, Q, T, H, Dv, _ = shape
    forward = [Gemm(B * Q * T, 1, H), Gemm(Q, Dv, T, batch=B)]
    return forward if workload == "forward" else forward + backward_gemms(forward)


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


def _is_known_inductor_bug(exc):
    return type(exc).__name__ == "InductorError" and "KeyError" in str(exc)


def _compiled_hoisted(run_with):
    """``(fn, note)``: ``run_with(compiled hoisted_attention)`` under the default options, or
    under ``INDUCTOR_WORKAROUND`` where those hit the known inductor bug. Compiles on the way."""
    torch._dynamo.reset()
    fn = run_with(torch.compile(hoisted_attention, dynamic=False))
    try:
        fn()
        return fn, ""
    except Exception as exc:
        if not _is_known_inductor_bug(exc):
            raise
    torch._dynamo.reset()
    fn = run_with(torch.compile(hoisted_attention, dynamic=False, options=INDUCTOR_WORKAROUND))
    return fn, INDUCTOR_WORKAROUND_NOTE


def _callables(shape, device, dtype, workload, impls):
    """``({impl: fn}, {impl: note})`` of the implementations in ``impls``."""
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

    fns, notes = {}, {}
    for impl in impls:
        if impl == "reference":
            fns[impl] = reference
        elif impl == "hoisted":
            fns[impl] = hoisted(hoisted_attention)
        elif impl == "hoisted+compile":
            try:
                fns[impl], notes[impl] = _compiled_hoisted(hoisted)
            except Exception as exc:  # the row says why instead of stopping the run
                fns[impl] = failing(exc)
        elif impl == "triton":
            from seq2seq_fast.backends.triton_ops import additive_attention

            fns[impl] = hoisted(additive_attention)
    return fns, notes


def runnable_impls(device, impls):
    """``(impls that run on device, {impl: why not})``; ``best`` is the Triton kernel."""
    device_type = torch.device(device).type
    impls = ["triton" if i == "best" else i for i in impls]
    reason = ("on a CPU Triton runs only under its interpreter (TRITON_INTERPRET=1), which says nothing about speed"
              if device_type != "cuda" else sf.unavailable_reason("triton", device_type))
    skipped = {"triton": reason} if "triton" in impls and reason else {}
    return [i for i in dict.fromkeys(impls) if i not in skipped], skipped


def attention_rows(device, shapes, workloads, impls, dtype=torch.float32, min_time=0.5, log=None):
    """Rows of every implementation in ``impls`` (see :func:`runnable_impls`) on every shape and
    workload, each group ending with its floor; ``log(rows)`` is called with each group's rows
    as it is done."""
    element = torch.empty((), dtype=dtype).element_size()
    dtype_name = str(dtype).replace("torch.", "")
    rows = []
    for config, shape in shapes.items():
        for workload in workloads:
            fns, notes = _callables(shape, device, dtype, workload, impls)
            work = FloorWork(attention_gemms(shape, workload), kernel_bytes(shape, workload, element), device, dtype)
            times, notes, bound = time_group(fns, device, min_time, work, notes)
            group = group_rows("attention", config, dtype_name, workload, times, notes, bound)
            if log:
                log(group)
            rows += group
    return rows

