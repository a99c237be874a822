"""Fused additive (Bahdanau) attention: Triton kernels and their host launchers (no autograd here).

For batch row b, query i and key j, with the projections already applied:

    e_ij = w_v · tanh(q_i + k_j)               q (B, Q, H), k (B, T, H), w_v (H,)
    e_ij = -1e6              where j >= valid_len    (d2l's fill: a length-0 row is uniform)
    P_i  = softmax_j(e_i)                      in fp32 (fp64 for float64), online over T tiles
    A_i  = dropout(P_i)                        keep with prob 1 - p, scale 1 / (1 - p)
    c_i  = sum_j A_ij v_j                      v (B, T, Dv), Dv free to differ from H

The forward kernel makes one pass over the keys and values of a (b, i) row; it writes the
context, the weights P (d2l's ``attention_weights``, before dropout) and the row statistics
(max, sum of exp) that the backward needs. The backward kernel recomputes tanh and P from
those statistics rather than storing anything of size (B, Q, T, H).

Bytes a forward must move: q (B·Q·H), k (B·T·H), v (B·T·Dv), w_v (H), context (B·Q·Dv) and
weights (B·Q·T), times the element size.

Under ``TRITON_INTERPRET=1`` (CPU tensors) ``tl`` has no tanh and ``libdevice.tanh`` fails,
so tanh is ``2·sigmoid(2x) - 1`` everywhere.
"""
import struct

import torch
import triton
import triton.language as tl

# d2l's fill value for the scores of hidden keys.
MASK_VALUE = tl.constexpr(-1e6)


@triton.jit
def _only_if(mask, flag):
    # ``mask`` where the scalar ``flag`` holds, else all false: a boolean block either way
    # (``mask & flag`` becomes int32 under Triton 3.9's interpreter, which rejects it as a mask).
    return tl.where(flag, mask, tl.zeros_like(mask))


@triton.jit
def _tanh(x):
    return 2.0 * tl.sigmoid(2.0 * x) - 1.0


@triton.jit
def _tile_scores(q_row, stride_qh, k_base, stride_kt, stride_kh, wv_ptr, stride_wvh,
                 offs_t, in_t, H, ACC: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr):
    """Raw scores w_v · tanh(q + k_j) of one tile of keys, (BLOCK_T,) in ACC; 0 where not in_t."""
    s = tl.zeros([BLOCK_T], dtype=ACC)
    for h0 in range(0, H, BLOCK_H):
        offs_h = h0 + tl.arange(0, BLOCK_H)
        in_h = offs_h < H
        q = tl.load(q_row + offs_h * stride_qh, mask=in_h, other=0.0).to(ACC)
        w = tl.load(wv_ptr + offs_h * stride_wvh, mask=in_h, other=0.0).to(ACC)
        k = tl.load(k_base + offs_t[:, None] * stride_kt + offs_h[None, :] * stride_kh,
                    mask=in_t[:, None] & in_h[None, :], other=0.0).to(ACC)
        s += tl.sum(w[None, :] * _tanh(q[None, :] + k), 1)
    return s


@triton.jit
def _keep(seed, row, offs_t, dropout_p):
    """The dropout mask of one tile of row ``row`` (int64, b·Q + i) at keys ``offs_t``: kept when
    a Philox uniform >= p, so with probability 1 - p. The key and the row's low and high 32 bits
    are three separate counter words, so no two (row, key) pairs of any size of call share a
    counter (a single 32-bit counter row·T + j wraps at 2^32 weights and repeats masks)."""
    zero = offs_t.to(tl.uint32) * 0  # the counters as blocks of offs_t's shape
    row_lo = zero + (row & 0xFFFFFFFF).to(tl.uint32)
    row_hi = zero + ((row >> 32) & 0xFFFFFFFF).to(tl.uint32)
    bits, _, _, _ = tl.philox(seed, offs_t.to(tl.uint32), row_lo, row_hi, zero)
    # The top 24 bits as a float32 in [0, 1), exactly.
    return (bits >> 8).to(tl.float32) * (1.0 / 16777216.0) >= dropout_p


@triton.jit
def _additive_attn_fwd_kernel(
    context_ptr, stride_cb, stride_cq, stride_cd,
    weights_ptr, stride_wb, stride_wq, stride_wt,
    scores_ptr, stride_sb, stride_sq, stride_st,
    stats_ptr, stride_mb, stride_mq, stride_mk,
    q_ptr, stride_qb, stride_qq, stride_qh,
    k_ptr, stride_kb, stride_kt, stride_kh,
    v_ptr, stride_vb, stride_vt, stride_vd,
    wv_ptr, stride_wvh,
    lens_ptr, stride_nb, stride_nq,
    seed_ptr,
    Q, T, H, DV,
    dropout_p, scale_hi, scale_lo,
    HAS_LENS: tl.constexpr,  # hide keys j >= lens[b, i] (stride_nq = 0 for one length per row)
    HAS_DROPOUT: tl.constexpr,  # drop weights of the context with the Philox seed at seed_ptr
    ACC: tl.constexpr,  # accumulation dtype: tl.float32, or tl.float64 for float64 inputs
    BLOCK_T: tl.constexpr,  # keys per tile
    BLOCK_H: tl.constexpr,  # hidden units per chunk of the score
    BLOCK_D: tl.constexpr,  # value columns per program (axis 1 of the grid)
):
    # Grid (B·Q, cdiv(Dv, BLOCK_D)). Every program scores all keys of its row; the one with
    # pid_d == 0 also writes the weights and the statistics. ``scores`` (ACC) holds the raw
    # scores between the two passes; it may be the weights tensor itself.
    row = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1)
    b = row // Q
    i = row % Q
    owner = pid_d == 0
    q_row = q_ptr + b * stride_qb + i * stride_qq
    k_base = k_ptr + b * stride_kb
    v_base = v_ptr + b * stride_vb
    s_row = scores_ptr + b * stride_sb + i * stride_sq
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    in_d = offs_d < DV
    valid = T
    if HAS_LENS:
        valid = tl.load(lens_ptr + b * stride_nb + i * stride_nq)
    if HAS_DROPOUT:
        seed = tl.load(seed_ptr)
        scale = tl.cast(scale_hi, ACC) + tl.cast(scale_lo, ACC)

    m = tl.full([], float("-inf"), ACC)
    l = tl.full([], 0.0, ACC)
    acc = tl.zeros([BLOCK_D], dtype=ACC)
    for t0 in range(0, T, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        in_t = offs_t < T
        s = _tile_scores(q_row, stride_qh, k_base, stride_kt, stride_kh, wv_ptr, stride_wvh,
                         offs_t, in_t, H, ACC, BLOCK_T, BLOCK_H)
        if HAS_LENS:
            s = tl.where(offs_t < valid, s, MASK_VALUE)
        s = tl.where(in_t, s, float("-inf"))
        tl.store(s_row + offs_t * stride_st, s, mask=_only_if(in_t, owner))
        m_new = tl.maximum(m, tl.max(s, 0))
        alpha = tl.exp(m - m_new)
        p = tl.exp(s - m_new)
        l = l * alpha + tl.sum(p, 0)
        if HAS_DROPOUT:
            p = tl.where(_keep(seed, row, offs_t, dropout_p), p * scale, 0.0)
        v = tl.load(v_base + offs_t[:, None] * stride_vt + offs_d[None, :] * stride_vd,
                    mask=in_t[:, None] & in_d[None, :], other=0.0).to(ACC)
        acc = acc * alpha + tl.sum(p[:, None] * v, 0)
        m = m_new
    tl.store(context_ptr + b * stride_cb + i * stride_cq + offs_d * stride_cd,
             (acc / l).to(context_ptr.dtype.element_ty), mask=in_d)

    tl.debug_barrier()
    if owner:
        stats_row = stats_ptr + b * stride_mb + i * stride_mq
        tl.store(stats_row, m)
        tl.store(stats_row + stride_mk, l)
        w_row = weights_ptr + b * stride_wb + i * stride_wq
        for t0 in range(0, T, BLOCK_T):
            offs_t = t0 + tl.arange(0, BLOCK_T)
            in_t = offs_t < T
            s = tl.load(s_row + offs_t * stride_st, mask=in_t, other=float("-inf"))
            tl.store(w_row + offs_t * stride_wt, (tl.exp(s - m) / l).to(weights_ptr.dtype.element_ty), mask=in_t)


@triton.jit
def _additive_attn_bwd_kernel(
    dq_ptr, stride_dqb, stride_dqn, stride_dqq, stride_dqh,
    dk_ptr, stride_dkb, stride_dkt, stride_dkh,
    dv_ptr, stride_dvb, stride_dvt, stride_dvd,
    dw_ptr, stride_dwb, stride_dwn, stride_dwh,
    dctx_ptr, stride_gcb, stride_gcq, stride_gcd,
    dweights_ptr, stride_gwb, stride_gwq, stride_gwt,
    q_ptr, stride_qb, stride_qq, stride_qh,
    k_ptr, stride_kb, stride_kt, stride_kh,
    v_ptr, stride_vb, stride_vt, stride_vd,
    wv_ptr, stride_wvh,
    lens_ptr, stride_nb, stride_nq,
    seed_ptr,
    stats_ptr, stride_mb, stride_mq, stride_mk,
    delta_ptr, stride_eb, stride_eq,
    Q, T, H, DV,
    dropout_p, scale_hi, scale_lo,
    HAS_LENS: tl.constexpr,  # hide keys j >= lens[b, i] (stride_nq = 0 for one length per row)
    HAS_DROPOUT: tl.constexpr,  # the forward dropped weights with the Philox seed at seed_ptr
    HAS_DWEIGHTS: tl.constexpr,  # a gradient flows into the weights output too
    ACC: tl.constexpr,  # accumulation dtype: tl.float32, or tl.float64 for float64 inputs
    BLOCK_T: tl.constexpr,  # keys per program (axis 1 of the grid)
    BLOCK_H: tl.constexpr,  # hidden units per chunk
    BLOCK_D: tl.constexpr,  # value columns per chunk
):
    # Grid (B, cdiv(T, BLOCK_T)). A program owns the key rows of its tile: it loops over the
    # queries of its batch row and accumulates dk and dv of those rows in place (no atomics).
    # dq (B, NT, Q, H) and dw (B, NT, H) are per-tile partial sums, added up by the launcher.
    #   dP_j = dW_j + keep_j·scale·(dc · v_j);  dS_j = P_j (dP_j - delta),  delta = sum_j P_j dP_j
    #   g_jh = dS_j w_h (1 - tanh²):  dq += sum_j g,  dk_j += g,  dw += sum_j dS_j tanh
    b = tl.program_id(0).to(tl.int64)
    tile = tl.program_id(1).to(tl.int64)
    offs_t = tile * BLOCK_T + tl.arange(0, BLOCK_T)
    in_t = offs_t < T
    k_base = k_ptr + b * stride_kb
    v_base = v_ptr + b * stride_vb
    dk_base = dk_ptr + b * stride_dkb
    dv_base = dv_ptr + b * stride_dvb
    dw_row = dw_ptr + b * stride_dwb + tile * stride_dwn
    if HAS_DROPOUT:
        seed = tl.load(seed_ptr)
        scale = tl.cast(scale_hi, ACC) + tl.cast(scale_lo, ACC)

    for i in range(0, Q):
        row = b * Q + i
        accumulate = i > 0  # the first query stores, later ones add to what it stored
        q_row = q_ptr + b * stride_qb + i * stride_qq
        live = in_t
        s = _tile_scores(q_row, stride_qh, k_base, stride_kt, stride_kh, wv_ptr, stride_wvh,
                         offs_t, in_t, H, ACC, BLOCK_T, BLOCK_H)
        if HAS_LENS:
            valid = tl.load(lens_ptr + b * stride_nb + i * stride_nq)
            live = in_t & (offs_t < valid)
            s = tl.where(offs_t < valid, s, MASK_VALUE)
        stats_row = stats_ptr + b * stride_mb + i * stride_mq
        m = tl.load(stats_row)
        l = tl.load(stats_row + stride_mk)
        p = tl.where(in_t, tl.exp(s - m) / l, 0.0)
        a = p
        if HAS_DROPOUT:
            keep = _keep(seed, row, offs_t, dropout_p)
            a = tl.where(keep, p * scale, 0.0)

        dcv = tl.zeros([BLOCK_T], dtype=ACC)
        for d0 in range(0, DV, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            in_d = offs_d < DV
            tile_mask = in_t[:, None] & in_d[None, :]
            dc = tl.load(dctx_ptr + b * stride_gcb + i * stride_gcq + offs_d * stride_gcd,
                         mask=in_d, other=0.0).to(ACC)
            v = tl.load(v_base + offs_t[:, None] * stride_vt + offs_d[None, :] * stride_vd,
                        mask=tile_mask, other=0.0).to(ACC)
            dcv += tl.sum(v * dc[None, :], 1)
            dv_ptrs = dv_base + offs_t[:, None] * stride_dvt + offs_d[None, :] * stride_dvd
            dv_prev = tl.load(dv_ptrs, mask=_only_if(tile_mask, accumulate), other=0.0)
            tl.store(dv_ptrs, dv_prev + a[:, None] * dc[None, :], mask=tile_mask)

        if HAS_DROPOUT:
            dp = tl.where(keep, scale * dcv, 0.0)
        else:
            dp = dcv
        if HAS_DWEIGHTS:
            dp += tl.load(dweights_ptr + b * stride_gwb + i * stride_gwq + offs_t * stride_gwt,
                          mask=in_t, other=0.0).to(ACC)
        delta = tl.load(delta_ptr + b * stride_eb + i * stride_eq)
        ds = tl.where(live, p * (dp - delta), 0.0)

        for h0 in range(0, H, BLOCK_H):
            offs_h = h0 + tl.arange(0, BLOCK_H)
            in_h = offs_h < H
            tile_mask = in_t[:, None] & in_h[None, :]
            q = tl.load(q_row + offs_h * stride_qh, mask=in_h, other=0.0).to(ACC)
            w = tl.load(wv_ptr + offs_h * stride_wvh, mask=in_h, other=0.0).to(ACC)
            k = tl.load(k_base + offs_t[:, None] * stride_kt + offs_h[None, :] * stride_kh,
                        mask=tile_mask, other=0.0).to(ACC)
            th = _tanh(q[None, :] + k)
            g = ds[:, None] * w[None, :] * (1.0 - th * th)
            dk_ptrs = dk_base + offs_t[:, None] * stride_dkt + offs_h[None, :] * stride_dkh
            dk_prev = tl.load(dk_ptrs, mask=_only_if(tile_mask, accumulate), other=0.0)
            tl.store(dk_ptrs, dk_prev + g, mask=tile_mask)
            tl.store(dq_ptr + b * stride_dqb + tile * stride_dqn + i * stride_dqq + offs_h * stride_dqh,
                     tl.sum(g, 0), mask=in_h)
            dw_prev = tl.load(dw_row + offs_h * stride_dwh, mask=_only_if(in_h, accumulate), other=0.0)
            tl.store(dw_row + offs_h * stride_dwh, dw_prev + tl.sum(ds[:, None] * th, 0), mask=in_h)
        tl.debug_barrier()


def _empty(shape, dtype, device):
    """Allocates every tensor the kernels write (outputs and scratch)."""
    return torch.empty(shape, dtype=dtype, device=device)


def accumulation_dtype(dtype):
    """The dtype the kernels accumulate in for inputs of ``dtype``: float64 or float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _tl_acc(dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _blocks(T, H, DV, block_t, block_h, block_d, max_t, max_d):
    # Defaults chosen from ptxas register counts for sm_90 (no spills in fp32 or fp64 with
    # four warps), not from timings: no GPU was at hand to tune on.
    return (
        block_t or min(max_t, triton.next_power_of_2(max(T, 1))),
        block_h or min(64, triton.next_power_of_2(max(H, 1))),
        block_d or min(max_d, triton.next_power_of_2(max(DV, 1))),
    )


def _lens_args(valid_lens, like):
    """(pointer, stride_b, stride_q, HAS_LENS) for None, (B,) or (B, Q) int64 lengths."""
    if valid_lens is None:
        return like, 0, 0, False
    if valid_lens.dim() == 1:
        return valid_lens, valid_lens.stride(0), 0, True
    return valid_lens, valid_lens.stride(0), valid_lens.stride(1), True


def _dropout_args(seed, dropout_p, like):
    """(seed pointer, p, scale_hi, scale_lo, HAS_DROPOUT); the scale 1/(1-p) in two fp32 parts
    so that float64 inputs get it to about 48 bits."""
    if seed is None or dropout_p <= 0.0:
        return like, 0.0, 1.0, 0.0, False
    scale = 0.0 if dropout_p >= 1.0 else 1.0 / (1.0 - dropout_p)
    hi = struct.unpack("f", struct.pack("f", scale))[0]
    return seed, float(dropout_p), hi, scale - hi, True


def additive_attention_fwd(q_proj, key_proj, values, w_v, valid_lens=None, seed=None, dropout_p=0.0,
                           *, block_t=None, block_h=None, block_d=None, num_warps=4):
    """Launches the forward kernel.

    q_proj (B, Q, H), key_proj (B, T, H), values (B, T, Dv), w_v (H,): one floating dtype on
    one device, any strides. valid_lens None or int64 (B,) / (B, Q). seed None or an int64
    tensor of one element (the Philox seed; dropout with probability ``dropout_p``).
    Returns (context (B, Q, Dv), weights (B, Q, T) before dropout, stats (B, Q, 2) = row max
    and row sum of exp, in the accumulation dtype).
    """
    B, Q, H = q_proj.shape
    T, DV = key_proj.shape[1], values.shape[2]
    dtype, device = q_proj.dtype, q_proj.device
    acc = accumulation_dtype(dtype)
    context = _empty((B, Q, DV), values.dtype, device)
    weights = _empty((B, Q, T), dtype, device)
    stats = _empty((B, Q, 2), acc, device)
    if B * Q == 0:
        return context, weights, stats
    if T == 0:
        context.zero_()
        stats[..., 0].fill_(float("-inf"))
        stats[..., 1].zero_()
        return context, weights, stats
    scores = weights if dtype == acc else _empty((B, Q, T), acc, device)
    BLOCK_T, BLOCK_H, BLOCK_D = _blocks(T, H, DV, block_t, block_h, block_d, 32, 256)
    lens, stride_nb, stride_nq, has_lens = _lens_args(valid_lens, q_proj)
    seed_arg, p, scale_hi, scale_lo, has_dropout = _dropout_args(seed, dropout_p, q_proj)
    grid = (B * Q, max(1, triton.cdiv(DV, BLOCK_D)))
    _additive_attn_fwd_kernel[grid](
        context, *context.stride(),
        weights, *weights.stride(),
        scores, *scores.stride(),
        stats, *stats.stride(),
        q_proj, *q_proj.stride(),
        key_proj, *key_proj.stride(),
        values, *values.stride(),
        w_v, w_v.stride(0),
        lens, stride_nb, stride_nq,
        seed_arg,
        Q, T, H, DV,
        p, scale_hi, scale_lo,
        HAS_LENS=has_lens, HAS_DROPOUT=has_dropout, ACC=_tl_acc(dtype),
        BLOCK_T=BLOCK_T, BLOCK_H=BLOCK_H, BLOCK_D=BLOCK_D,
        num_warps=num_warps,
    )
    return context, weights, stats


def additive_attention_bwd(grad_context, grad_weights, q_proj, key_proj, values, w_v, valid_lens, seed,
                           dropout_p, context, weights, stats,
                           *, block_t=None, block_h=None, block_d=None, num_warps=4):
    """Launches the backward kernel.

    grad_context (B, Q, Dv); grad_weights (B, Q, T) or None; the forward's inputs, and its
    outputs ``context``, ``weights``, ``stats`` (see ``additive_attention_fwd``).
    Returns contiguous (dq (B, Q, H), dk (B, T, H), dv (B, T, Dv), dw_v (H,)) in the inputs' dtypes.
    """
    B, Q, H = q_proj.shape
    T, DV = key_proj.shape[1], values.shape[2]
    dtype, device = q_proj.dtype, q_proj.device
    acc = accumulation_dtype(dtype)
    if B * Q == 0 or T == 0:
        return tuple(x.new_zeros(x.shape) for x in (q_proj, key_proj, values, w_v))
    BLOCK_T, BLOCK_H, BLOCK_D = _blocks(T, H, DV, block_t, block_h, block_d, 16, 64)
    NT = triton.cdiv(T, BLOCK_T)
    dq = _empty((B, NT, Q, H), acc, device)
    dk = _empty((B, T, H), acc, device)
    dv = _empty((B, T, DV), acc, device)
    dw = _empty((B, NT, H), acc, device)
    # delta_i = sum_j P_ij dP_ij = dc_i · c_i + sum_j W_ij dW_ij  (B, Q)
    delta = torch.linalg.vecdot(grad_context.to(acc), context.to(acc))
    if grad_weights is not None:
        delta = delta + torch.linalg.vecdot(grad_weights.to(acc), weights.to(acc))
    lens, stride_nb, stride_nq, has_lens = _lens_args(valid_lens, q_proj)
    seed_arg, p, scale_hi, scale_lo, has_dropout = _dropout_args(seed, dropout_p, q_proj)
    gw = grad_weights if grad_weights is not None else grad_context
    _additive_attn_bwd_kernel[(B, NT)](
        dq, *dq.stride(),
        dk, *dk.stride(),
        dv, *dv.stride(),
        dw, *dw.stride(),
        grad_context, *grad_context.stride(),
        gw, *(gw.stride() if grad_weights is not None else (0, 0, 0)),
        q_proj, *q_proj.stride(),
        key_proj, *key_proj.stride(),
        values, *values.stride(),
        w_v, w_v.stride(0),
        lens, stride_nb, stride_nq,
        seed_arg,
        stats, *stats.stride(),
        delta, *delta.stride(),
        Q, T, H, DV,
        p, scale_hi, scale_lo,
        HAS_LENS=has_lens, HAS_DROPOUT=has_dropout, HAS_DWEIGHTS=grad_weights is not None,
        ACC=_tl_acc(dtype),
        BLOCK_T=BLOCK_T, BLOCK_H=BLOCK_H, BLOCK_D=BLOCK_D,
        num_warps=num_warps,
    )
    return (dq.sum(1).to(dtype), dk.to(key_proj.dtype), dv.to(values.dtype), dw.sum((0, 1)).to(w_v.dtype))
