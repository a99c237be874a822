"""The compiled CPU encoder (``cpp`` backend's ``encoder_forward``) against d2l's Seq2SeqEncoder:
outputs, final state, every gradient, inter-layer dropout, gradcheck, opcheck, bad inputs."""
import pytest
import torch

from seq2seq_fast import reference as R
from seq2seq_fast.backends.extension import extension_error

pytestmark = pytest.mark.skipif(extension_error() is not None, reason=f"{extension_error()}")

TOLERANCES = {torch.float64: (1e-10, 1e-8), torch.float32: (3e-5, 1e-4)}
VOCAB, EMBED = 13, 6

# (B, T, H, L)
SHAPES = [(1, 1, 5, 1), (3, 7, 5, 2), (8, 7, 33, 3), (3, 10, 32, 2)]


def backend():
    from seq2seq_fast.backends import cpp_ops as backend_cpp

    return backend_cpp


def assert_close(actual, expected, name, dtype):
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol, msg=lambda m: f"{name}: {m}")


def keep_mask(shape, p, dtype, generator):
    return (torch.rand(shape, generator=generator, dtype=dtype) >= p).to(dtype) / (1 - p)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}-T{}-H{}-L{}".format(*s))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_encoder_outputs_state_and_every_gradient_match_reference(shape, dtype):
    B, T, H, L = shape
    torch.manual_seed(0)
    encoder = R.Seq2SeqEncoder(VOCAB, EMBED, H, L, 0.0).to(dtype)
    X = torch.randint(0, VOCAB, (B, T))
    g = torch.Generator().manual_seed(1)
    grad_out = torch.randn(T, B, H, generator=g, dtype=dtype)
    grad_state = torch.randn(L, B, H, generator=g, dtype=dtype)
    params = list(encoder.parameters())
    names = [n for n, _ in encoder.named_parameters()]

    out_ref, state_ref = encoder(X)
    grads_ref = torch.autograd.grad((out_ref * grad_out).sum() + (state_ref * grad_state).sum(), params)
    out, state = backend().encoder_forward(encoder, X)
    assert out.shape == (T, B, H) and state.shape == (L, B, H)
    assert_close(out, out_ref, "output", dtype)
    assert_close(state, state_ref, "final state", dtype)
    grads = torch.autograd.grad((out * grad_out).sum() + (state * grad_state).sum(), params)
    for name, a, e in zip(names, grads, grads_ref):
        assert_close(a, e, f"grad {name}", dtype)


def test_encoder_eval_no_grad_matches_reference():
    torch.manual_seed(0)
    encoder = R.Seq2SeqEncoder(VOCAB, EMBED, 33, 2, 0.5).eval()
    X = torch.randint(0, VOCAB, (8, 7))
    with torch.no_grad():
        out_ref, state_ref = encoder(X)
        out, state = backend().encoder_forward(encoder, X)
    assert_close(out, out_ref, "output", torch.float32)
    assert_close(state, state_ref, "final state", torch.float32)


def layerwise_reference(encoder, X, layer_mask):
    """The encoder as single-layer GRUs, the inter-layer dropout given as masks."""
    rnn = encoder.rnn
    x = encoder.embedding(X).transpose(0, 1)
    states = []
    for k in range(rnn.num_layers):
        weights = [getattr(rnn, f"{kind}_l{k}") for kind in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]
        h = x.new_zeros(x.shape[1], rnn.hidden_size)
        outs = []
        for t in range(x.shape[0]):
            h = torch._VF.gru_cell(x[t], h, *weights)
            outs.append(h)
        out = torch.stack(outs)
        states.append(h)
        x = out * layer_mask[k] if k < rnn.num_layers - 1 else out
    return x, torch.stack(states)


def test_given_layer_masks_match_layerwise_reference_with_gradients():
    torch.manual_seed(0)
    B, T, H, L, p = 3, 5, 5, 3, 0.4
    dtype = torch.float64
    encoder = R.Seq2SeqEncoder(VOCAB, EMBED, H, L, p).to(dtype)
    X = torch.randint(0, VOCAB, (B, T))
    mask = keep_mask((L - 1, T, B, H), p, dtype, torch.Generator().manual_seed(2))
    states, layer_inputs, gates = torch.ops.seq2seq_fast.encoder_forward(
        X, backend().encoder_params(encoder), mask, True)
    out, state = states[L - 1, 1:], states[:, T]
    out_ref, state_ref = layerwise_reference(encoder, X, mask)
    assert_close(out, out_ref, "output", dtype)
    assert_close(state, state_ref, "final state", dtype)
    zero = (layer_inputs == 0).double().mean().item()
    assert abs(zero - (mask == 0).double().mean().item()) < 1e-12, "dropped inputs follow the mask"
    params = list(encoder.parameters())
    g_out, g_state = torch.randn_like(out), torch.randn_like(state)
    grads = torch.autograd.grad((out * g_out).sum() + (state * g_state).sum(), params)
    grads_ref = torch.autograd.grad((out_ref * g_out).sum() + (state_ref * g_state).sum(), params)
    for (name, _), a, e in zip(encoder.named_parameters(), grads, grads_ref):
        assert_close(a, e, f"grad {name}", dtype)


def test_training_mode_draws_layer_dropout():
    torch.manual_seed(0)
    encoder = R.Seq2SeqEncoder(VOCAB, EMBED, 16, 2, 0.3).train()
    X = torch.randint(0, VOCAB, (4, 6))
    with torch.no_grad():
        a = backend().encoder_forward(encoder, X)[0]
        b = backend().encoder_forward(encoder, X)[0]
        encoder.eval()
        c = backend().encoder_forward(encoder, X)[0]
        d = backend().encoder_forward(encoder, X)[0]
    assert not torch.equal(a, b), "training mode draws fresh masks per call"
    assert torch.equal(c, d), "eval mode is deterministic"


def tiny_args(requires_grad=True, dropout=True):
    torch.manual_seed(0)
    B, T, H, L = 2, 3, 3, 2
    encoder = R.Seq2SeqEncoder(5, 2, H, L, 0.3).double()
    X = torch.randint(0, 5, (B, T))
    params = [p.detach().clone().requires_grad_(requires_grad) for p in backend().encoder_params(encoder)]
    mask = keep_mask((L - 1, T, B, H), 0.3, torch.float64, torch.Generator().manual_seed(3)) if dropout else None
    return X, params, mask, requires_grad


def test_gradcheck_float64_with_dropout():
    X, params, mask, _ = tiny_args()

    def fn(*params):
        return torch.ops.seq2seq_fast.encoder_forward(X, list(params), mask, True)[0]

    assert torch.autograd.gradcheck(fn, params, eps=1e-6, atol=1e-6)


def test_opcheck_encoder_ops():
    args = tiny_args()
    torch.library.opcheck(torch.ops.seq2seq_fast.encoder_forward.default, args)
    torch.library.opcheck(torch.ops.seq2seq_fast.encoder_forward.default, tiny_args(False, False))
    X, params, mask, _ = args
    with torch.no_grad():
        states, layer_inputs, gates = torch.ops.seq2seq_fast.encoder_forward(*args)
    grad = torch.randn(states.shape, dtype=states.dtype, generator=torch.Generator().manual_seed(4))
    torch.library.opcheck(
        torch.ops.seq2seq_fast.encoder_backward.default,
        (grad, X, [p.detach() for p in params], mask, states, layer_inputs, gates),
    )


def test_encoder_bad_inputs():
    encoder = R.Seq2SeqEncoder(VOCAB, EMBED, 5, 2, 0.0)
    X = torch.randint(0, VOCAB, (3, 4))
    run = backend().encoder_forward
    with pytest.raises(IndexError, match="X holds token id 13"):
        run(encoder, torch.full_like(X, VOCAB))
    with pytest.raises(TypeError, match="X must hold int64"):
        run(encoder, X.float())
    with pytest.raises(ValueError, match="X must have shape"):
        run(encoder, X[0])
    with pytest.raises(TypeError, match="embedding must be float32 or float64"):
        run(encoder.half(), X)
