"""The compiled CPU decoder loop (``cpp`` backend) against the d2l reference: outputs, every
gradient, the final state, dropout, gradcheck, opcheck, torch.compile and bad inputs."""
import pytest
import torch
from torch import nn

from seq2seq_fast import reference as R
from seq2seq_fast.backends.extension import extension_error

pytestmark = pytest.mark.skipif(extension_error() is not None, reason=f"{extension_error()}")

# dtype: (atol, rtol) of the compiled loop against the reference in the same dtype.
TOLERANCES = {torch.float64: (1e-10, 1e-8), torch.float32: (3e-5, 1e-4)}
VOCAB, EMBED = 13, 6

# (B, T, S, H, L)
SHAPES = [
    (1, 1, 1, 5, 1),
    (3, 7, 5, 5, 2),
    (8, 7, 5, 33, 3),
    (3, 1, 5, 33, 2),
    (8, 7, 1, 5, 1),
    # Long enough that the backward runs through time in blocks of steps (2 blocks in float32,
    # 3 in float64: csrc/cpu/loop.h steps_per_block), each block's weight gradients added up.
    (16, 5, 70, 256, 2),
]


def shape_id(shape):
    return "B{}-T{}-S{}-H{}-L{}".format(*shape)


def backend():
    from seq2seq_fast.backends import cpp_ops as backend_cpp

    return backend_cpp


def paired(H, L, dtype, dropout=0.0, seed=0, vocab=VOCAB):
    torch.manual_seed(seed)
    ref = R.Seq2SeqAttentionDecoder(vocab, EMBED, H, L, dropout).to(dtype)
    fast = R.Seq2SeqAttentionDecoder(vocab, EMBED, H, L, dropout).to(dtype)
    fast.load_state_dict(ref.state_dict())
    return ref, fast


def ragged(B, T, generator):
    lens = torch.randint(0, T + 1, (B,), generator=generator)
    special = torch.tensor([0, T, T + 3])[:B]
    lens[: len(special)] = special
    return lens


def inputs(B, T, S, H, L, dtype, valid, seed=1, vocab=VOCAB):
    g = torch.Generator().manual_seed(seed)
    enc = torch.randn(B, T, H, generator=g, dtype=dtype)
    hidden = torch.randn(L, B, H, generator=g, dtype=dtype)
    X = torch.randint(0, vocab, (B, S), generator=g)
    lens = ragged(B, T, g) if valid == "ragged" else None
    return X, enc, hidden, lens


def assert_close(actual, expected, name, dtype):
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol, msg=lambda m: f"{name}: {m}")


def run_reference(ref, X, enc, hidden, lens):
    Y, state = ref(X, [enc, hidden, lens])
    return Y, state[1], torch.cat(ref.attention_weights, dim=1)


def run_cpp(fast, X, enc, hidden, lens):
    key_proj = fast.attention.W_k(enc)
    return backend().decoder_forward(fast, X, enc, hidden, lens, key_proj)


def outputs_and_grads(module, run, X, enc, hidden, lens, grads_out):
    enc = enc.clone().requires_grad_()
    hidden = hidden.clone().requires_grad_()
    module.zero_grad(set_to_none=True)
    outs = run(module, X, enc, hidden, lens)
    loss = sum((o * g).sum() for o, g in zip(outs, grads_out))
    loss.backward()
    grads = {name: p.grad for name, p in module.named_parameters()}
    grads["enc_outputs"] = enc.grad
    grads["initial hidden"] = hidden.grad
    return [o.detach() for o in outs], grads


@pytest.mark.parametrize("valid", ["ragged", "none"])
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_forward_and_every_gradient_match_reference(shape, valid, dtype):
    B, T, S, H, L = shape
    ref, fast = paired(H, L, dtype)
    X, enc, hidden, lens = inputs(B, T, S, H, L, dtype, valid)
    g = torch.Generator().manual_seed(2)
    grads_out = [
        torch.randn(B, S, VOCAB, generator=g, dtype=dtype),
        torch.randn(L, B, H, generator=g, dtype=dtype),
        torch.randn(B, S, T, generator=g, dtype=dtype),
    ]
    expected, expected_grads = outputs_and_grads(ref, run_reference, X, enc, hidden, lens, grads_out)
    actual, actual_grads = outputs_and_grads(fast, run_cpp, X, enc, hidden, lens, grads_out)
    for name, a, e in zip(("logits", "final hidden state", "attention weights"), actual, expected):
        assert a.shape == e.shape, f"{name}: shape {tuple(a.shape)} != {tuple(e.shape)}"
        assert_close(a, e, name, dtype)
    assert expected_grads.keys() == actual_grads.keys()
    for name, grad in expected_grads.items():
        assert actual_grads[name] is not None, f"grad {name}: missing"
        assert_close(actual_grads[name], grad, f"grad {name}", dtype)


# Layer 0's embedding gates come from a (V, 3H) table kept across calls when it is small, else
# from a GEMM over the call's gathered embeddings (csrc/cpu/loop.h EmbeddingGates): 2731 x 99
# values pass the table's limit of 2^18.
@pytest.mark.parametrize("vocab", [VOCAB, 2731], ids=["table", "gemm"])
@pytest.mark.parametrize("S", [1, 5])
def test_eval_mode_no_grad_matches_reference(vocab, S):
    ref, fast = paired(33, 2, torch.float32, dropout=0.3, vocab=vocab)
    ref.eval(), fast.eval()
    X, enc, hidden, lens = inputs(8, 7, S, 33, 2, torch.float32, "ragged", vocab=vocab)
    with torch.no_grad():
        expected = run_reference(ref, X, enc, hidden, lens)
        actual = run_cpp(fast, X, enc, hidden, lens)
    for name, a, e in zip(("logits", "final hidden state", "attention weights"), actual, expected):
        assert_close(a, e, name, torch.float32)


def test_activations_for_the_backward_only_when_kept():
    X, enc, hidden, lens, kp, params, am, lm, _ = tiny_op_args(dropout=False, requires_grad=False)
    B, S = X.shape
    L, _, H = hidden.shape
    E = params[0].shape[1]
    for keep, inputs_shape, gates_shape in ((True, (S, B, H + E), (S, L, B, 4 * H)), (False, (0,), (0,))):
        *_, x_in, _layer_inputs, gates = torch.ops.seq2seq_fast.decoder_forward(
            X, enc, hidden, lens, kp, params, am, lm, keep)
        assert (tuple(x_in.shape), tuple(gates.shape)) == (inputs_shape, gates_shape), f"keep={keep}"


# ---- dropout ----------------------------------------------------------------------------------


class FixedMasks(nn.Module):
    """Stands in for nn.Dropout: multiplies the i-th call's input by the i-th given mask."""

    def __init__(self, masks):
        super().__init__()
        self.masks = list(masks)

    def forward(self, x):
        return x * self.masks.pop(0)


def python_decoder_with_masks(dec, X, enc, hidden, lens, attn_mask, layer_mask):
    """d2l's decoder loop written out with explicit dropout masks (reference for the op)."""
    B, S = X.shape
    L, H = hidden.shape[0], hidden.shape[2]
    rnn = dec.rnn
    key_proj = dec.attention.W_k(enc)
    states = list(hidden.unbind(0))
    emb = dec.embedding(X)
    tops, weights = [], []
    for t in range(S):
        q = dec.attention.W_q(states[-1])
        scores = dec.attention.w_v(torch.tanh(q.unsqueeze(1) + key_proj)).squeeze(-1)
        a = R.masked_softmax(scores.unsqueeze(1), lens).squeeze(1)
        context = torch.bmm((a * attn_mask[t]).unsqueeze(1), enc).squeeze(1)
        x = torch.cat([context, emb[:, t]], dim=-1)
        for k in range(L):
            w_ih, w_hh = getattr(rnn, f"weight_ih_l{k}"), getattr(rnn, f"weight_hh_l{k}")
            b_ih, b_hh = getattr(rnn, f"bias_ih_l{k}"), getattr(rnn, f"bias_hh_l{k}")
            states[k] = torch._VF.gru_cell(x, states[k], w_ih, w_hh, b_ih, b_hh)
            if k < L - 1:
                x = states[k] * layer_mask[k, t]
        tops.append(states[-1])
        weights.append(a)
    return dec.dense(torch.stack(tops, 1)), torch.stack(states), torch.stack(weights, 1)


def keep_mask(shape, p, dtype, generator):
    return (torch.rand(shape, generator=generator, dtype=dtype) >= p).to(dtype) / (1 - p)


# The second shape's backward runs in two blocks of steps (csrc/cpu/loop.h steps_per_block).
@pytest.mark.parametrize("shape", [(3, 7, 5, 5, 3), (8, 4, 80, 192, 3)], ids=shape_id)
def test_given_dropout_masks_match_explicit_loop_with_gradients(shape):
    torch.manual_seed(0)
    (B, T, S, H, L), p = shape, 0.4
    dtype = torch.float64
    dec = R.Seq2SeqAttentionDecoder(VOCAB, EMBED, H, L, p).to(dtype)
    X, enc, hidden, lens = inputs(B, T, S, H, L, dtype, "ragged")
    g = torch.Generator().manual_seed(3)
    attn_mask = keep_mask((S, B, T), p, dtype, g)
    layer_mask = keep_mask((L - 1, S, B, H), p, dtype, g)
    params = backend().decoder_params(dec)
    enc = enc.requires_grad_()
    hidden = hidden.requires_grad_()

    expected = python_decoder_with_masks(dec, X, enc, hidden, lens, attn_mask, layer_mask)
    kp = dec.attention.W_k(enc)
    logits, attention, states, *_ = torch.ops.seq2seq_fast.decoder_forward(
        X, enc, hidden, lens, kp, params, attn_mask, layer_mask, True)
    actual = (logits.transpose(0, 1), states[:, S], attention.transpose(0, 1))
    for name, a, e in zip(("logits", "final hidden state", "attention weights"), actual, expected):
        assert_close(a, e, name, dtype)
    leaves = [enc, hidden, *dec.parameters()]
    outs = [torch.randn_like(e) for e in expected]
    exp_grads = torch.autograd.grad(expected, leaves, outs)
    act_grads = torch.autograd.grad(actual, leaves, outs)
    names = ["enc_outputs", "initial hidden"] + [n for n, _ in dec.named_parameters()]
    for name, a, e in zip(names, act_grads, exp_grads):
        assert_close(a, e, f"grad {name}", dtype)


def test_training_mode_draws_dropout_with_rate_p():
    from seq2seq_fast.backends import cpp_ops as backend_cpp

    torch.manual_seed(0)
    p = 0.3
    dec = R.Seq2SeqAttentionDecoder(VOCAB, EMBED, 32, 3, p).train()
    like = torch.zeros(())
    attn = backend_cpp._attention_mask(dec, 40, 50, 20, like)
    layer = backend_cpp._layer_mask(dec.rnn, 40, 50, like)
    assert attn.shape == (40, 50, 20) and layer.shape == (2, 40, 50, 32)
    for name, mask in (("attention", attn), ("inter-layer", layer)):
        zero = (mask == 0).double().mean().item()
        assert abs(zero - p) < 0.01, f"{name} dropout zeroes {zero:.3f}, expected {p}"
        kept = torch.isclose(mask, torch.tensor(1 / (1 - p)))
        assert torch.all((mask == 0) | kept), f"{name} mask: entries other than 0 and 1/(1-p)"
    dec.eval()
    assert backend_cpp._attention_mask(dec, 4, 5, 2, like) is None
    assert backend_cpp._layer_mask(dec.rnn, 4, 5, like) is None


def test_training_mode_output_averages_to_eval_output_and_varies():
    torch.manual_seed(0)
    B, T, S, H, L = 4, 6, 3, 16, 2
    dec = R.Seq2SeqAttentionDecoder(VOCAB, EMBED, H, L, 0.1)
    X, enc, hidden, lens = inputs(B, T, S, H, L, torch.float32, "ragged")
    with torch.no_grad():
        dec.eval()
        eval_logits = run_cpp(dec, X, enc, hidden, lens)[0]
        dec.train()
        draws = torch.stack([run_cpp(dec, X, enc, hidden, lens)[0] for _ in range(400)])
    assert not torch.equal(draws[0], draws[1]), "training-mode calls must draw fresh masks"
    # Dropout is unbiased to first order: the average is close to the eval output.
    err = (draws.mean(0) - eval_logits).abs().mean() / eval_logits.abs().mean()
    assert err < 0.05, f"mean training output is {err:.3f} (relative) away from the eval output"


# ---- gradcheck, opcheck, compile ----------------------------------------------------------------


def tiny_op_args(dtype=torch.float64, dropout=True, seed=0, requires_grad=True):
    torch.manual_seed(seed)
    B, T, S, H, L = 2, 3, 3, 3, 2
    dec = R.Seq2SeqAttentionDecoder(5, 2, H, L, 0.3).to(dtype)
    X, enc, hidden, lens = inputs(B, T, S, H, L, dtype, "none")
    X = X % 5
    lens = torch.tensor([0, 2])
    kp = torch.randn(B, T, H, dtype=dtype)
    g = torch.Generator().manual_seed(4)
    attn_mask = keep_mask((S, B, T), 0.3, dtype, g) if dropout else None
    layer_mask = keep_mask((L - 1, S, B, H), 0.3, dtype, g) if dropout else None
    params = [p.detach().clone().requires_grad_(requires_grad) for p in dec.parameters()]
    named = dict(zip([n for n, _ in dec.named_parameters()], params))
    w_ih = [named[f"rnn.weight_ih_l{k}"] for k in range(L)]
    w_hh = [named[f"rnn.weight_hh_l{k}"] for k in range(L)]
    b_ih = [named[f"rnn.bias_ih_l{k}"] for k in range(L)]
    b_hh = [named[f"rnn.bias_hh_l{k}"] for k in range(L)]
    tensors = [enc, hidden, kp]
    for t in tensors:
        t.requires_grad_(requires_grad)
    packed = [named["embedding.weight"], named["attention.W_q.weight"], named["attention.w_v.weight"], *w_ih,
              *w_hh, *b_ih, *b_hh, named["dense.weight"], named["dense.bias"]]
    return (X, enc, hidden, lens, kp, packed, attn_mask, layer_mask, requires_grad)


def test_gradcheck_float64_with_dropout_and_masked_rows():
    args = tiny_op_args()
    (X, enc, hidden, lens, kp, params, am, lm, keep) = args
    leaves = [enc, hidden, kp, *params]

    def fn(enc, hidden, kp, *params):
        logits, attention, states, *_ = torch.ops.seq2seq_fast.decoder_forward(
            X, enc, hidden, lens, kp, list(params), am, lm, True)
        return logits, attention, states

    assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-6)


def test_opcheck_decoder_forward():
    args = tiny_op_args()
    torch.library.opcheck(torch.ops.seq2seq_fast.decoder_forward.default, args)
    no_grad_args = tiny_op_args(dropout=False, requires_grad=False)
    torch.library.opcheck(torch.ops.seq2seq_fast.decoder_forward.default, no_grad_args)


def test_opcheck_decoder_backward():
    args = tiny_op_args()
    (X, enc, hidden, lens, kp, params, am, lm, _) = args
    with torch.no_grad():
        logits, attention, states, x_in, layer_inputs, gates = torch.ops.seq2seq_fast.decoder_forward(*args)
    g = torch.Generator().manual_seed(5)
    grads = [torch.randn(t.shape, generator=g, dtype=t.dtype) for t in (logits, attention, states)]
    det = [t.detach() for t in (X, enc)]
    torch.library.opcheck(
        torch.ops.seq2seq_fast.decoder_backward.default,
        (*grads, *det, lens, kp.detach(), [p.detach() for p in params], am, lm, attention, states,
         x_in, layer_inputs, gates),
    )


@pytest.mark.parametrize("requires_grad", [True, False])
def test_decoder_call_returns_decoder_forwards_views(requires_grad):
    # The module's op: decoder_forward and the views d2l's decoder returns, made in C++.
    args = tiny_op_args(requires_grad=requires_grad)
    X, enc, hidden, lens, kp, params, am, lm, _ = args
    logits, attention, states, *_ = torch.ops.seq2seq_fast.decoder_forward(*args)
    expected = (logits.transpose(0, 1), states.select(1, states.shape[1] - 1), attention.transpose(0, 1))
    actual = torch.ops.seq2seq_fast.decoder_call(X, enc, hidden, lens, kp, params, am, lm)
    for name, a, e in zip(("logits", "final state", "attention"), actual, expected):
        assert torch.equal(a, e) and a.stride() == e.stride(), name
        assert a.requires_grad == requires_grad, name
    if requires_grad:
        torch.library.opcheck(torch.ops.seq2seq_fast.decoder_call.default, args[:-1])

        def fn(enc, hidden, kp, *params):
            return torch.ops.seq2seq_fast.decoder_call(X, enc, hidden, lens, kp, list(params), am, lm)

        assert torch.autograd.gradcheck(fn, (enc, hidden, kp, *params), eps=1e-6, atol=1e-6)


def test_torch_compile_fullgraph_forward_and_backward():
    ref, fast = paired(5, 2, torch.float32)
    X, enc, hidden, lens = inputs(3, 7, 5, 5, 2, torch.float32, "ragged")

    params = backend().decoder_params(fast)

    def step(enc, hidden):
        return backend().decoder_apply(X, enc, hidden, lens, fast.attention.W_k(enc), params)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    enc_a, enc_b = enc.clone().requires_grad_(), enc.clone().requires_grad_()
    expected = step(enc_a, hidden)
    actual = compiled(enc_b, hidden)
    for a, e in zip(actual, expected):
        assert_close(a, e, "compiled output", torch.float32)
    expected[0].sum().backward()
    actual[0].sum().backward()
    assert_close(enc_b.grad, enc_a.grad, "compiled grad enc_outputs", torch.float32)


# ---- bad inputs ---------------------------------------------------------------------------------


def test_bad_inputs_raise_named_errors_before_touching_memory():
    _, fast = paired(5, 2, torch.float32)
    X, enc, hidden, lens = inputs(3, 7, 5, 5, 2, torch.float32, "ragged")
    kp = fast.attention.W_k(enc).detach()
    run = backend().decoder_forward
    with pytest.raises(IndexError, match="X holds token id 13"):
        run(fast, torch.full_like(X, VOCAB), enc, hidden, lens, kp)
    with pytest.raises(IndexError, match="X holds token id -1"):
        run(fast, torch.full_like(X, -1), enc, hidden, lens, kp)
    with pytest.raises(TypeError, match="X must hold int64"):
        run(fast, X.int(), enc, hidden, lens, kp)
    with pytest.raises(TypeError, match="hidden_state must have dtype"):
        run(fast, X, enc, hidden.double(), lens, kp)
    with pytest.raises(TypeError, match="enc_outputs must be float32 or float64"):
        run(fast, X, enc.half(), hidden, lens, kp)
    with pytest.raises(ValueError, match="hidden_state must have shape"):
        run(fast, X, enc, hidden[:, :2], lens, kp)
    with pytest.raises(ValueError, match="key_proj must have shape"):
        run(fast, X, enc, hidden, lens, kp[:, :3])
    with pytest.raises(ValueError, match="X must have the state's batch size"):
        run(fast, X[:2], enc, hidden, lens, kp)
    with pytest.raises(ValueError, match="valid_lens must have shape"):
        run(fast, X, enc, hidden, lens[:2], kp)
    with pytest.raises(TypeError, match="valid_lens must be int64"):
        run(fast, X, enc, hidden, lens.float(), kp)
    with pytest.raises(ValueError, match="enc_outputs must have shape"):
        run(fast, X, enc[:, :0], hidden, lens, kp[:, :0])


def test_unsupported_reason():
    from seq2seq_fast.backends import cpp_ops as backend_cpp

    assert backend_cpp.unsupported_reason("cpu", torch.float32, True) is None
    assert backend_cpp.unsupported_reason("cpu", torch.float64, False) is None
    assert "float16" in backend_cpp.unsupported_reason("cpu", torch.float16, False)
    assert backend_cpp.unsupported_reason("meta", torch.float32, False) is not None


def test_panel_gemm_and_blas_paths_agree():
    """Float32 step GEMMs run on the panel kernel on AVX-512 CPUs, else on the BLAS;
    SEQ2SEQ_FAST_PANEL_GEMM=0 forces the BLAS: both give the reference's numbers."""
    import os
    import subprocess
    import sys

    code = (
        "import torch, sys\n"
        "sys.path.insert(0, sys.argv[1])\n"
        "from test_cpp_decoder import paired, inputs, run_cpp, outputs_and_grads\n"
        "ref, fast = paired(33, 2, torch.float32)\n"
        "X, enc, hidden, lens = inputs(8, 7, 5, 33, 2, torch.float32, 'ragged')\n"
        "g = torch.Generator().manual_seed(2)\n"
        "outs = [torch.randn(8, 5, 13, generator=g), torch.randn(2, 8, 33, generator=g), torch.randn(8, 5, 7, generator=g)]\n"
        "o, grads = outputs_and_grads(fast, run_cpp, X, enc, hidden, lens, outs)\n"
        "torch.save((o, grads), sys.argv[2])\n"
    )
    here = os.path.dirname(os.path.abspath(__file__))
    results = []
    for flag in ("1", "0"):
        path = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"seq2seq_fast_panel_{flag}_{os.getpid()}.pt")
        done = subprocess.run([sys.executable, "-c", code, here, path], capture_output=True, text=True, timeout=300,
                              env={**os.environ, "SEQ2SEQ_FAST_PANEL_GEMM": flag})
        assert done.returncode == 0, done.stderr
        results.append(torch.load(path))
        os.remove(path)
    ref, _ = paired(33, 2, torch.float32)
    X, enc, hidden, lens = inputs(8, 7, 5, 33, 2, torch.float32, "ragged")
    g = torch.Generator().manual_seed(2)
    outs = [torch.randn(8, 5, 13, generator=g), torch.randn(2, 8, 33, generator=g), torch.randn(8, 5, 7, generator=g)]
    expected, expected_grads = outputs_and_grads(ref, run_reference, X, enc, hidden, lens, outs)
    for o, grads in results:
        for a, e in zip(o, expected):
            assert_close(a, e, "output", torch.float32)
        for name, grad in expected_grads.items():
            assert_close(grads[name], grad, f"grad {name}", torch.float32)
