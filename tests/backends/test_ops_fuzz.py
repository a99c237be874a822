"""Malformed calls of every public ``torch.ops.seq2seq_fast`` op: each must raise a clean Python
error (ValueError, TypeError, IndexError, RuntimeError, NotImplementedError), never crash.

The calls run in a child interpreter, one per op (a fresh interpreter costs seconds), so that a
segfault fails its op's test and names the case that was running: the child prints
``START <case>`` before each call and ``<case>: OK <error type>`` (or ``FAIL ...``) after it.
Expectations per case: "raise" (malformed), "work" (legal but unusual: non-contiguous inputs,
lengths >= T, no gradients), "any" (meta tensors: the fake implementation may answer them).

Run one op's cases by hand: ``python tests/backends/test_ops_fuzz.py decoder_forward``.
"""
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

ALLOWED = (ValueError, TypeError, IndexError, RuntimeError, NotImplementedError)
B, T, S, H, E, V, L = 2, 3, 2, 4, 3, 7, 2


# ---- valid arguments and their mutations --------------------------------------------------------------


def rnd(*shape):
    return torch.randn(*shape)


def strided(t):
    """t's values in memory with a stride of 2 in the last dimension (non-contiguous)."""
    return torch.stack([t, torch.zeros_like(t)], -1)[..., 0]


def gru(L, in0):
    w_ih = [rnd(3 * H, in0 if k == 0 else H) for k in range(L)]
    return [*w_ih, *[rnd(3 * H, H) for _ in range(L)], *[rnd(3 * H) for _ in range(2 * L)]]


def decoder_params(layers=L):
    return [rnd(V, E), rnd(H, H), rnd(1, H), *gru(layers, H + E), rnd(V, H), rnd(V)]


def encoder_params(layers=L):
    return [rnd(V, E), *gru(layers, E)]


def tensor_cases(name, t, noncontig=True):
    """Wrong shape, rank and dtypes of one float tensor; its meta and non-contiguous twins."""
    cases = [
        (f"{name}-shape", torch.randn(*t.shape[:-1], t.shape[-1] + 1) if t.dim() else rnd(2), "raise"),
        (f"{name}-rank", t.unsqueeze(0), "raise"),
        (f"{name}-int64", t.long(), "raise"),
        (f"{name}-float16", t.half(), "raise"),
        (f"{name}-float64", t.double(), "raise"),
        (f"{name}-meta", t.to("meta"), "any"),
    ]
    if noncontig and t.numel() > 1:
        cases.append((f"{name}-noncontiguous", strided(t), "work"))
    return cases


def params_cases(params, fixed, layers=L):
    """Malformed packed params lists: lengths, missing biases, each tensor's shape/dtype/device."""
    head = 3 if fixed > 1 else 1  # tensors before the GRU's: [embedding, W_q, w_v] or [embedding]

    def without_biases(params, layers):
        return params[:head + 2 * layers] + params[head + 4 * layers:]

    one_layer = decoder_params(1) if fixed > 1 else encoder_params(1)
    cases = [
        ("params-empty", [], "raise"),
        ("params-one", params[:1], "raise"),
        ("params-fixed-only", params[:fixed], "raise"),
        ("params-minus-1", params[:-1], "raise"),
        ("params-plus-1", params + [params[-1]], "raise"),
        ("params-no-biases", without_biases(params, layers), "raise"),
        # The old API's empty b_ih/b_hh lists, which crashed the forward ops before the packed params.
        ("params-L1-no-biases", without_biases(one_layer, 1), "raise"),
        ("params-L1-no-dense-bias", one_layer[:-1], "raise"),
    ]
    for i, t in enumerate(params):
        for name, bad, expect in tensor_cases(f"params[{i}]", t):
            cases.append((name, params[:i] + [bad] + params[i + 1:], expect))
    return cases


def token_cases(name, X, vocab):
    return [
        (f"{name}-float", X.float(), "raise"),
        (f"{name}-int32", X.int(), "raise"),
        (f"{name}-rank1", X[0], "raise"),
        (f"{name}-rank3", X[None], "raise"),
        (f"{name}-id-V", torch.full_like(X, vocab), "raise"),
        (f"{name}-id-negative", torch.full_like(X, -1), "raise"),
        (f"{name}-id-huge", torch.full_like(X, 2 ** 62), "raise"),
        (f"{name}-meta", X.to("meta"), "any"),
        (f"{name}-noncontiguous", strided(X), "work"),
    ]


def lens_cases(lens):
    return [
        ("valid_lens-negative", torch.tensor([1, -2]), "raise"),
        ("valid_lens-int32", lens.int(), "raise"),
        ("valid_lens-float", lens.float(), "raise"),
        ("valid_lens-rank2", lens[:, None], "raise"),
        ("valid_lens-rows", lens[:1], "raise"),
        ("valid_lens-beyond-T", torch.full_like(lens, T + 5), "work"),
        ("valid_lens-zero", torch.zeros_like(lens), "work"),
        ("valid_lens-none", None, "work"),
        ("valid_lens-meta", lens.to("meta"), "any"),
        ("valid_lens-noncontiguous", strided(lens), "work"),
    ]


def replace(args, index, value):
    out = list(args)
    out[index] = value
    return out


def decoder_inputs():
    X = torch.randint(0, V, (B, S))
    return X, rnd(B, T, H), rnd(L, B, H), torch.tensor([3, 1]), rnd(B, T, H)


def masks(steps, layers=L):
    return rnd(steps, B, T).abs(), rnd(layers - 1, steps, B, H).abs()


def shared_decoder_cases(args, i_enc, i_lens, i_kp, i_params, i_masks, steps):
    """Cases of the arguments every decoder op takes: enc_outputs, valid_lens, key_proj, params, masks."""
    enc, kp = args[i_enc], args[i_kp]
    cases = [(n, replace(args, i_params, p), e) for n, p, e in params_cases(args[i_params], 5)]
    cases += [(n, replace(args, i_enc, t), e) for n, t, e in tensor_cases("enc_outputs", enc)]
    cases += [
        ("enc_outputs-B0", replace(replace(args, i_enc, enc[:0]), i_kp, kp[:0]), "raise"),
        ("enc_outputs-T0", replace(replace(args, i_enc, enc[:, :0]), i_kp, kp[:, :0]), "raise"),
        ("enc_outputs-rank2", replace(args, i_enc, enc[0]), "raise"),
    ]
    cases += [(n, replace(args, i_kp, t), e) for n, t, e in tensor_cases("key_proj", kp)]
    cases += [(n, replace(args, i_lens, t), e) for n, t, e in lens_cases(args[i_lens])]
    attn_mask, layer_mask = masks(steps)
    one_layer = decoder_params(1)
    cases += [
        ("attn_mask-given", replace(args, i_masks, attn_mask), "work"),
        ("layer_mask-given", replace(args, i_masks + 1, layer_mask), "work"),
        ("layer_mask-with-one-layer", replace(replace(args, i_params, one_layer), i_masks + 1, layer_mask[:0]),
         "raise"),
    ]
    cases += [(n, replace(args, i_masks, t), e) for n, t, e in tensor_cases("attn_mask", attn_mask)]
    cases += [(n, replace(args, i_masks + 1, t), e) for n, t, e in tensor_cases("layer_mask", layer_mask)]
    return cases


def decoder_forward_cases():
    X, enc, hidden, lens, kp = decoder_inputs()
    args = [X, enc, hidden, lens, kp, decoder_params(), None, None, True]
    cases = [("valid", args, "work"), ("no-activations", replace(args, 8, False), "work")]
    cases += shared_decoder_cases(args, 1, 3, 4, 5, 6, S)
    cases += [(n, replace(args, 0, t), e) for n, t, e in token_cases("X", X, V)]
    cases += [("X-rows", replace(args, 0, X[:1]), "raise"), ("X-no-steps", replace(args, 0, X[:, :0]), "any")]
    cases += [(n, replace(args, 2, t), e) for n, t, e in tensor_cases("hidden", hidden)]
    cases += [("hidden-layers", replace(args, 2, hidden[:1]), "raise")]
    return cases


def decoder_call_cases():
    """decoder_forward's cases without its last argument (the call decides what to keep)."""
    return [(name, args[:-1], expect) for name, args, expect in decoder_forward_cases() if name != "no-activations"]


def decoder_backward_cases():
    X, enc, hidden, lens, kp = decoder_inputs()
    params = decoder_params()
    attn_mask, layer_mask = masks(S)
    ops = torch.ops.seq2seq_fast
    with torch.no_grad():
        out = ops.decoder_forward(X, enc, hidden, lens, kp, params, attn_mask, layer_mask, True)
        no_gates = ops.decoder_forward(X, enc, hidden, lens, kp, params, attn_mask, layer_mask, False)[5]
    logits, attention, states, inputs, layer_inputs, gates = out
    grads = [torch.randn_like(logits), torch.randn_like(attention), torch.randn_like(states)]
    args = [*grads, X, enc, lens, kp, params, attn_mask, layer_mask, attention, states, inputs, layer_inputs,
            gates]
    cases = [("valid", args, "work"), ("no-gradients", [None, None, None] + args[3:], "work")]
    cases += shared_decoder_cases(args, 4, 5, 6, 7, 8, S)
    cases += [(n, replace(args, 3, t), e) for n, t, e in token_cases("X", X, V)]
    for i, name in enumerate(("grad_logits", "grad_attention", "grad_states")):
        cases += [(n, replace(args, i, t), e) for n, t, e in tensor_cases(name, grads[i])]
        cases += [(f"{name}-transposed", replace(args, i, grads[i].transpose(0, 1).contiguous().transpose(0, 1)),
                   "work")]
    for i, name in zip(range(10, 15), ("attention", "states", "inputs", "layer_inputs", "gates")):
        cases += [(n, replace(args, i, t), e) for n, t, e in tensor_cases(name, args[i])]
    cases += [("gates-not-kept", replace(args, 14, no_gates), "raise")]
    return cases


def greedy_decode_cases():
    _, enc, hidden, lens, kp = decoder_inputs()
    args = [enc, hidden, lens, kp, decoder_params(), None, None, 1, 2, 4, True]
    cases = [("valid", args, "work"), ("no-attention", replace(args, 10, False), "work")]
    cases += shared_decoder_cases(args, 0, 2, 3, 4, 5, 4)
    cases += [(n, replace(args, 1, t), e) for n, t, e in tensor_cases("hidden", hidden)]
    cases += [
        ("bos-V", replace(args, 7, V), "raise"), ("bos-negative", replace(args, 7, -1), "raise"),
        ("eos-V", replace(args, 8, V), "raise"), ("eos-negative", replace(args, 8, -1), "raise"),
        ("max_len-0", replace(args, 9, 0), "raise"), ("max_len-negative", replace(args, 9, -3), "raise"),
        ("max_len-2^31", replace(args, 9, 2 ** 31), "raise"),
        ("embedding-rows-not-V", replace(args, 4, [rnd(V + 1, E)] + args[4][1:]), "raise"),
    ]
    return cases


def encoder_forward_cases():
    X = torch.randint(0, V, (B, T))
    params = encoder_params()
    layer_mask = rnd(L - 1, T, B, H).abs()
    args = [X, params, None, True]
    cases = [("valid", args, "work"), ("layer_mask-given", replace(args, 2, layer_mask), "work")]
    cases += [(n, replace(args, 1, p), e) for n, p, e in params_cases(params, 1)]
    cases += [(n, replace(args, 0, t), e) for n, t, e in token_cases("X", X, V)]
    cases += [("X-B0", replace(args, 0, X[:0]), "raise"), ("X-no-steps", replace(args, 0, X[:, :0]), "any")]
    cases += [(n, replace(args, 2, t), e) for n, t, e in tensor_cases("layer_mask", layer_mask)]
    cases += [("layer_mask-with-one-layer", [X, encoder_params(1), layer_mask[:0], True], "raise")]
    return cases


def encoder_backward_cases():
    X = torch.randint(0, V, (B, T))
    params = encoder_params()
    layer_mask = rnd(L - 1, T, B, H).abs()
    with torch.no_grad():
        states, layer_inputs, gates = torch.ops.seq2seq_fast.encoder_forward(X, params, layer_mask, True)
        no_gates = torch.ops.seq2seq_fast.encoder_forward(X, params, layer_mask, False)[2]
    args = [torch.randn_like(states), X, params, layer_mask, states, layer_inputs, gates]
    cases = [("valid", args, "work")]
    cases += [(n, replace(args, 2, p), e) for n, p, e in params_cases(params, 1)]
    cases += [(n, replace(args, 1, t), e) for n, t, e in token_cases("X", X, V)]
    for i, name in zip((0, 3, 4, 5, 6), ("grad_states", "layer_mask", "states", "layer_inputs", "gates")):
        cases += [(n, replace(args, i, t), e) for n, t, e in tensor_cases(name, args[i])]
    cases += [("gates-not-kept", replace(args, 6, no_gates), "raise")]
    return cases


def project_keys_cases():
    enc, W_k = rnd(B, T, H), rnd(H, H)
    args = [enc, W_k]
    cases = [("valid", args, "work"), ("enc_outputs-permuted", [rnd(T, B, H).permute(1, 0, 2), W_k], "work")]
    cases += [(n, replace(args, 0, t), e) for n, t, e in tensor_cases("enc_outputs", enc)]
    cases += [(n, replace(args, 1, t), e) for n, t, e in tensor_cases("W_k", W_k)]
    cases += [
        ("enc_outputs-B0", [enc[:0], W_k], "raise"),
        ("enc_outputs-T0", [enc[:, :0], W_k], "raise"),
        ("W_k-not-square", [enc, rnd(H + 1, H)], "raise"),
        ("needs-grad", [enc.clone().requires_grad_(), W_k], "raise"),
    ]
    return cases


def keep_mask_cases():
    like = torch.zeros(())
    return [
        ("valid", [like, [3, 4], 0.3], "work"),
        ("p-0", [like, [3, 4], 0.0], "work"),
        ("p-1", [like, [3, 4], 1.0], "work"),
        ("p-negative", [like, [3, 4], -0.1], "raise"),
        ("p-above-1", [like, [3, 4], 1.5], "raise"),
        ("p-nan", [like, [3, 4], float("nan")], "raise"),
        ("like-int64", [like.long(), [3, 4], 0.3], "raise"),
        ("like-float16", [like.half(), [3, 4], 0.3], "raise"),
        ("like-meta", [like.to("meta"), [3, 4], 0.3], "any"),
        ("like-noncontiguous", [strided(rnd(3, 4)), [3, 4], 0.3], "work"),
        ("size-negative", [like, [3, -4], 0.3], "raise"),
        ("size-empty", [like, [0, 4], 0.3], "work"),
    ]


def loss_args():
    pred = rnd(B, S, V)
    return [pred, torch.randint(0, V, (B, S)), torch.tensor([1, 2])]


def loss_input_cases(args, offset):
    pred, label, valid_len = args[offset:offset + 3]
    # pred is the reference: it fixes V and the dtype (which grad_loss and lse then must share).
    cases = [(n, replace(args, offset, t), e) for n, t, e in tensor_cases("pred", pred, noncontig=False)
             if n not in ("pred-shape", "pred-float64")]
    cases += [
        ("pred-wider-vocabulary", replace(args, offset, rnd(B, S, V + 1)), "work"),
        ("pred-float64", replace(args, offset, pred.double()), "work" if offset == 0 else "raise"),
        ("pred-noncontiguous", replace(args, offset, strided(pred)), "work"),
        ("pred-step-major", replace(args, offset, pred.transpose(0, 1).contiguous().transpose(0, 1)), "work"),
        ("pred-V0", replace(args, offset, pred[..., :0]), "raise"),
        ("pred-rank2", replace(args, offset, pred[0]), "raise"),
        ("label-shape", replace(args, offset + 1, label[:, :1]), "raise"),
    ]
    cases += [(n, replace(args, offset + 1, t), e) for n, t, e in token_cases("label", label, V)]
    cases += [(n, replace(args, offset + 2, t), e) for n, t, e in lens_cases(valid_len)
              if n != "valid_lens-none"]
    cases += [("valid_len-none", replace(args, offset + 2, None), "raise")]
    return cases


def masked_ce_loss_cases():
    args = loss_args()
    return [("valid", args, "work")] + loss_input_cases(args, 0)


def masked_ce_loss_backward_cases():
    pred, label, valid_len = loss_args()
    _, lse = torch.ops.seq2seq_fast.masked_ce_loss(pred, label, valid_len)
    args = [rnd(B), pred, label, valid_len, lse]
    cases = [("valid", args, "work")] + loss_input_cases(args, 1)
    cases += [(n, replace(args, 0, t), e) for n, t, e in tensor_cases("grad_loss", args[0])]
    cases += [(n, replace(args, 4, t), e) for n, t, e in tensor_cases("lse", lse)]
    return cases


def clip_grad_norm_cases():
    def grads():
        return [rnd(V, E), rnd(H), rnd(1, H)]

    cases = [("valid", [grads(), 1.0], "work"), ("tiny-theta", [grads(), 1e-30], "work"),
             ("empty-list", [[], 1.0], "raise"), ("theta-0", [grads(), 0.0], "raise"),
             ("theta-negative", [grads(), -1.0], "raise"), ("theta-nan", [grads(), float("nan")], "raise"),
             ("theta-inf", [grads(), float("inf")], "raise"),
             ("mixed-dtypes", [[rnd(3), rnd(3).double()], 1.0], "raise"),
             ("float64", [[rnd(3).double(), rnd(2, 2).double()], 1.0], "work"),
             ("noncontiguous", [[rnd(3), strided(rnd(2, 3))], 1.0], "raise"),
             ("meta", [[rnd(3).to("meta")], 1.0], "any")]
    cases += [(n, [[rnd(3), t], 1.0], e) for n, t, e in tensor_cases("grads", rnd(2, 3), noncontig=False)
              if n not in ("grads-shape", "grads-rank", "grads-float64", "grads-meta")]
    cases += [("int64-first", [[rnd(3).long()], 1.0], "raise"), ("empty-tensor", [[rnd(0), rnd(3)], 1.0], "work")]
    return cases


def set_cpu_threads_cases():
    return [("valid", [0], "work"), ("two", [2], "work"), ("negative", [-1], "raise"), ("huge", [10**6], "raise"),
            ("float", [1.5], "raise"), ("tensor", [torch.zeros(2)], "raise"), ("none", [], "raise"),
            ("reset", [0], "work")]
def set_cpu_row_split_cases():
    return [("on", [True], "work"), ("off", [False], "work"), ("string", ["yes"], "raise"),
            ("tensor", [torch.zeros(2)], "raise"), ("none", [], "raise")]


def linear_loss_input_cases(args, offset):
    """Malformed hidden, weight, bias, label, valid_len, chunk_rows at args[offset:offset + 6]."""
    hidden, weight, bias, label, valid_len = args[offset:offset + 5]
    cases = [("hidden-step-major", replace(args, offset, hidden.transpose(0, 1).contiguous().transpose(0, 1)),
              "work"), ("hidden-H0", replace(args, offset, hidden[..., :0]), "raise"),
             ("weight-V0", replace(replace(args, offset + 1, weight[:0]), offset + 2, bias[:0]), "raise")]
    for i, (name, t) in enumerate((("hidden", hidden), ("weight", weight), ("bias", bias))):
        cases += [(n, replace(args, offset + i, bad), e) for n, bad, e in tensor_cases(name, t)]
    cases += [(n, replace(args, offset + 3, t), e) for n, t, e in token_cases("label", label, V)]
    cases += [(n, replace(args, offset + 4, t), e) for n, t, e in lens_cases(valid_len) if n != "valid_lens-none"]
    cases += [("valid_len-none", replace(args, offset + 4, None), "raise"),
              ("chunk_rows-0", replace(args, offset + 5, 0), "raise"),
              ("chunk_rows-negative", replace(args, offset + 5, -1), "raise"),
              ("chunk_rows-huge", replace(args, offset + 5, 2 ** 40), "work")]
    return cases


def linear_masked_ce_cases():
    args = [rnd(B, S, H), rnd(V, H), rnd(V), torch.randint(0, V, (B, S)), torch.tensor([1, 2]), 2, True]
    return [("valid", args, "work"), ("no-grads", replace(args, 6, False), "work")] + linear_loss_input_cases(args, 0)


def linear_masked_ce_backward_cases():
    hidden, weight, bias, label, valid_len = rnd(B, S, H), rnd(V, H), rnd(V), torch.randint(0, V, (B, S)), \
        torch.tensor([1, 2])
    _, lse, *_ = torch.ops.seq2seq_fast.linear_masked_ce(hidden, weight, bias, label, valid_len, 2, False)
    args = [rnd(B), hidden, weight, bias, label, valid_len, lse, 2]
    cases = [("valid", args, "work")]
    cases += [(n, a[:6] + [lse] + a[6:], e)
              for n, a, e in linear_loss_input_cases(args[:6] + args[7:], 1)]
    cases += [(n, replace(args, 0, t), e) for n, t, e in tensor_cases("grad_loss", args[0])]
    cases += [(n, replace(args, 6, t), e) for n, t, e in tensor_cases("lse", lse)]
    return cases


def training_step_grads_cases():
    X, dec_X = torch.randint(0, V, (B, T)), torch.randint(0, V, (B, S))
    enc_p = [rnd(V, E), *gru(L, E)]
    dec_p = decoder_params()
    attn_mask, layer_mask = masks(S)
    args = [X, enc_p, rnd(L - 1, T, B, H).abs(), dec_X, torch.tensor([3, 1]), dec_p, rnd(H, H), attn_mask,
            layer_mask, torch.randint(0, V, (B, S)), torch.tensor([1, 2]), 3]
    cases = [("valid", args, "work"), ("no-masks", replace(replace(replace(args, 2, None), 7, None), 8, None), "work")]
    cases += [(f"enc-{n}", replace(args, 1, p), e) for n, p, e in params_cases(enc_p, 1)]
    cases += [(f"dec-{n}", replace(args, 5, p), e) for n, p, e in params_cases(dec_p, 5)]
    cases += [(f"enc-{n}", replace(args, 0, t), e) for n, t, e in token_cases("X", X, V)]
    cases += [(f"dec-{n}", replace(args, 3, t), e) for n, t, e in token_cases("X", dec_X, V)]
    cases += [(n, replace(args, 4, t), e) for n, t, e in lens_cases(args[4])]
    cases += [(n, replace(args, 6, t), e) for n, t, e in tensor_cases("W_k", args[6])]
    for i, name in ((2, "enc_layer_mask"), (7, "attn_mask"), (8, "dec_layer_mask")):
        cases += [(n, replace(args, i, t), e) for n, t, e in tensor_cases(name, args[i])]
    cases += [("dec_X-rows", replace(args, 3, dec_X[:1]), "raise"), ("X-B0", replace(args, 0, X[:0]), "raise"),
              ("label-id-V", replace(args, 9, torch.full((B, S), V)), "raise"),
              ("valid_len-negative", replace(args, 10, torch.tensor([1, -1])), "raise"),
              ("chunk_rows-0", replace(args, 11, 0), "raise"), ("dec-params-empty", replace(args, 5, []), "raise"),
              ("dec-params-one", replace(args, 5, dec_p[-1:]), "raise")]
    return cases


def adam_step_cases():
    ps = [rnd(V, E), rnd(H)]
    args = [ps, [torch.ones_like(p) for p in ps], [torch.zeros_like(p) for p in ps],
            [torch.zeros_like(p) for p in ps], [torch.zeros(()), torch.zeros(())], [2], [0.1], [0.9], [0.999], [1e-8]]
    cases = [("valid", args, "work"), ("two-groups", args[:5] + [[1, 1], [0.1, 0.2], [0.9] * 2, [0.999] * 2,
                                                              [1e-8] * 2], "work")]
    for i, name in enumerate(("params", "grads", "exp_avgs", "exp_avg_sqs")):
        cases += [(f"{name}-short", replace(args, i, args[i][:1]), "raise"),
                  (f"{name}-empty", replace(args, i, []), "raise")]
        cases += [(n, replace(args, i, [t, args[i][1]]), e) for n, t, e in tensor_cases(name, args[i][0])
                  if not n.endswith("-noncontiguous")]
        cases += [(f"{name}-noncontiguous", replace(args, i, [strided(args[i][0]), args[i][1]]), "raise")]
    cases += [("steps-int64", replace(args, 4, [torch.zeros((), dtype=torch.int64), args[4][1]]), "raise"),
              ("steps-two-values", replace(args, 4, [torch.zeros(2), args[4][1]]), "raise"),
              ("groups-short", replace(args, 5, [1]), "raise"), ("groups-zero", replace(args, 5, [2, 0]), "raise"),
              ("groups-negative", replace(args, 5, [-1, 3]), "raise"), ("lr-two", replace(args, 6, [0.1, 0.1]), "raise"),
              ("lr-nan", replace(args, 6, [float("nan")]), "raise"), ("beta1-1", replace(args, 7, [1.0]), "raise"),
              ("eps-negative", replace(args, 9, [-1e-8]), "raise"), ("groups-empty", replace(args, 5, []), "raise")]
    return cases


def cache_cases():
    return [("valid", [], "work"), ("extra-argument", [1], "raise"), ("tensor-argument", [torch.zeros(1)], "raise")]


CASES = {
    "decoder_forward": decoder_forward_cases,
    "decoder_call": decoder_call_cases,
    "decoder_backward": decoder_backward_cases,
    "greedy_decode": greedy_decode_cases,
    "encoder_forward": encoder_forward_cases,
    "encoder_backward": encoder_backward_cases,
    "keep_mask": keep_mask_cases,
    "project_keys": project_keys_cases,
    "masked_ce_loss": masked_ce_loss_cases,
    "masked_ce_loss_backward": masked_ce_loss_backward_cases,
    "clip_grad_norm_": clip_grad_norm_cases,
    "set_cpu_threads": set_cpu_threads_cases,
    "set_cpu_row_split": set_cpu_row_split_cases,
    "linear_masked_ce": linear_masked_ce_cases,
    "linear_masked_ce_backward": linear_masked_ce_backward_cases,
    "cpu_cache_bytes": cache_cases,
    "release_cpu_cache": cache_cases,
    "training_step_grads": training_step_grads_cases,
    "adam_step_": adam_step_cases,
}


# ---- the child: runs one op's cases ---------------------------------------------------------------------


def run_cases(op_name):
    from seq2seq_fast.backends import cpp_ops  # noqa: F401  (registers the ops and their fakes)

    torch.manual_seed(0)
    torch.set_num_threads(1)
    op = getattr(torch.ops.seq2seq_fast, op_name)
    for name, args, expect in CASES[op_name]():
        print(f"START {name}", flush=True)
        try:
            op(*args)
            error = None
        except ALLOWED as exc:
            error = exc
        except Exception as exc:  # noqa: BLE001  (any other type is a finding)
            print(f"{name}: FAIL {type(exc).__name__} is not a clean error: {exc}", flush=True)
            continue
        if expect == "raise" and error is None:
            verdict = "FAIL expected an error, got none"
        elif expect == "work" and error is not None:
            verdict = f"FAIL expected to work, got {type(error).__name__}: {str(error).splitlines()[0]}"
        else:
            verdict = f"OK {type(error).__name__ if error is not None else 'none'}"
        print(f"{name}: {verdict}", flush=True)


# ---- the parent: one child per op -------------------------------------------------------------------------


def _extension_error():
    from seq2seq_fast.backends.extension import extension_error

    return extension_error()


def _run_child(op_name):
    import seq2seq_fast

    # The child imports the same seq2seq_fast as this process (not another checkout's).
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(seq2seq_fast.__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([package_root, os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, os.path.abspath(__file__), op_name], env=env, capture_output=True,
                          text=True, timeout=300)


@pytest.fixture(scope="module")
def children(request):
    """The selected ops' children, started two at a time as soon as the first test asks (most of a
    child's time is its import of torch: two overlap on two cores)."""
    selected = sorted({item.callspec.params["op_name"] for item in request.session.items
                       if item.originalname == "test_malformed_calls_raise_clean_errors"})
    with ThreadPoolExecutor(max_workers=2) as pool:
        yield {op: pool.submit(_run_child, op) for op in selected}


@pytest.mark.skipif(_extension_error() is not None, reason=f"{_extension_error()}")
@pytest.mark.parametrize("op_name", sorted(CASES))
def test_malformed_calls_raise_clean_errors(op_name, children):
    child = children[op_name].result()
    lines = child.stdout.splitlines()
    started = [line[len("START "):] for line in lines if line.startswith("START ")]
    results = dict(line.split(": ", 1) for line in lines if not line.startswith("START ") and ": " in line)
    if child.returncode != 0:
        last = started[-1] if started else "(before the first case)"
        pytest.fail(f"{op_name}: the child died (exit {child.returncode}) in case {last!r}\n{child.stderr[-2000:]}")
    assert started, f"{op_name}: no case ran\n{child.stderr[-2000:]}"
    missing = [name for name in started if name not in results]
    assert not missing, f"{op_name}: cases without a result: {missing}"
    failures = [f"{name}: {verdict}" for name, verdict in results.items() if not verdict.startswith("OK")]
    assert not failures, f"{op_name}: {len(failures)} of {len(results)} cases failed:\n" + "\n".join(failures)


if __name__ == "__main__":
    run_cases(sys.argv[1])
