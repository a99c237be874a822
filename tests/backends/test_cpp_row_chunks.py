"""With the row split on (``set_cpu_row_split``; off by default), the compiled CPU loops split
the batch into chunks of rows, one per thread, claimed by the threads as they come free
(``for_row_chunks`` in csrc/cpu/loop.h, csrc/cpu/chunks.h): with two threads and batches big
enough to split (each chunk gets at least 8 rows and 4 MFLOP; the sizes below give two chunks of
45 rows in every op), outputs, every gradient, dropout and greedy tokens still equal the
reference row for row."""
import pytest
import torch

from seq2seq_fast import reference as R
from seq2seq_fast.backends.extension import extension_error
from test_cpp_decoder import keep_mask, python_decoder_with_masks
from test_cpp_greedy import BOS, EOS, cpp_greedy, mixed_model, sources

pytestmark = pytest.mark.skipif(extension_error() is not None, reason=f"{extension_error()}")

TOLERANCES = {torch.float64: (1e-10, 1e-8), torch.float32: (5e-5, 2e-4)}
B, T, S, H, VOCAB, EMBED = 90, 7, 5, 40, 13, 6


@pytest.fixture(autouse=True)
def two_threads_split_by_rows():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    split_before = torch.ops.seq2seq_fast.set_cpu_row_split(True)
    yield
    torch.ops.seq2seq_fast.set_cpu_row_split(split_before)
    torch.set_num_threads(before)


def backend():
    from seq2seq_fast.backends import cpp_ops as backend_cpp

    return backend_cpp


def assert_close(actual, expected, name, dtype):
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol, msg=lambda m: f"{name}: {m}")


def ragged_lengths(generator):
    lens = torch.randint(0, T + 1, (B,), generator=generator)
    lens[[0, 44, 45, 89]] = torch.tensor([0, T + 2, 0, T])  # both edges of both chunks
    return lens


@pytest.mark.parametrize("L", [2, 3])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_decoder_forward_and_gradients_with_dropout_split_over_rows(L, dtype):
    torch.manual_seed(0)
    p = 0.3
    dec = R.Seq2SeqAttentionDecoder(VOCAB, EMBED, H, L, p).to(dtype)
    g = torch.Generator().manual_seed(1)
    enc = torch.randn(B, T, H, generator=g, dtype=dtype).requires_grad_()
    hidden = torch.randn(L, B, H, generator=g, dtype=dtype).requires_grad_()
    X = torch.randint(0, VOCAB, (B, S), generator=g)
    lens = ragged_lengths(g)
    attn_mask = keep_mask((S, B, T), p, dtype, g)
    layer_mask = keep_mask((L - 1, S, B, H), p, dtype, g)

    expected = python_decoder_with_masks(dec, X, enc, hidden, lens, attn_mask, layer_mask)
    kp = dec.attention.W_k(enc)
    logits, attention, states, *_ = torch.ops.seq2seq_fast.decoder_forward(
        X, enc, hidden, lens, kp, backend().decoder_params(dec), attn_mask, layer_mask, True)
    actual = (logits.transpose(0, 1), states[:, S], attention.transpose(0, 1))
    for name, a, e in zip(("logits", "final hidden state", "attention weights"), actual, expected):
        assert_close(a, e, name, dtype)
    leaves = [enc, hidden, *dec.parameters()]
    outs = [torch.randn_like(e) for e in expected]
    names = ["enc_outputs", "initial hidden"] + [n for n, _ in dec.named_parameters()]
    for name, a, e in zip(names, torch.autograd.grad(actual, leaves, outs), torch.autograd.grad(expected, leaves, outs)):
        assert_close(a, e, f"grad {name}", dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_encoder_forward_and_gradients_with_dropout_split_over_rows(dtype):
    torch.manual_seed(0)
    L, p = 3, 0.3
    encoder = R.Seq2SeqEncoder(VOCAB, EMBED, H, L, p).to(dtype)
    rnn = encoder.rnn
    g = torch.Generator().manual_seed(1)
    X = torch.randint(0, VOCAB, (B, T), generator=g)
    layer_mask = keep_mask((L - 1, T, B, H), p, dtype, g)
    weights = [[getattr(rnn, f"{name}_l{k}") for k in range(L)]
               for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]

    # d2l's GRU layer by layer, with the given masks between layers.
    x = encoder.embedding(X).permute(1, 0, 2)
    finals = []
    for k in range(L):
        h = torch.zeros(B, H, dtype=dtype)
        outs = []
        for t in range(T):
            h = torch._VF.gru_cell(x[t], h, *(w[k] for w in weights))
            outs.append(h)
        finals.append(h)
        output = torch.stack(outs)
        x = output * layer_mask[k] if k < L - 1 else output
    expected = (output, torch.stack(finals))

    params = [encoder.embedding.weight, *(w for group in weights for w in group)]
    states, _, _ = torch.ops.seq2seq_fast.encoder_forward(X, params, layer_mask, True)
    actual = (states[L - 1, 1:], states[:, T])
    for name, a, e in zip(("output", "final state"), actual, expected):
        assert_close(a, e, name, dtype)
    params = list(encoder.parameters())
    outs = [torch.randn_like(e) for e in expected]
    names = [n for n, _ in encoder.named_parameters()]
    for name, a, e in zip(names, torch.autograd.grad(actual, params, outs), torch.autograd.grad(expected, params, outs)):
        assert_close(a, e, f"grad {name}", dtype)


def test_greedy_rows_of_every_chunk_equal_per_sentence_reference():
    src, src_len = sources(B, T)
    max_len = 9
    net, distinct = mixed_model(H, 2, src, src_len, max_len)
    assert distinct >= 2, "rows must end at different steps"
    tokens, lengths, _ = cpp_greedy(net, src, src_len, max_len, return_attention=False)
    with_attention = cpp_greedy(net, src, src_len, max_len, return_attention=True)  # one chunk
    assert torch.equal(tokens, with_attention[0]) and torch.equal(lengths, with_attention[1])
    for b in range(B):
        expected, _ = R.predict_tokens(net, src[b], int(src_len[b]), BOS, EOS, max_len)
        n = len(expected)
        assert int(lengths[b]) == n, f"row {b}: length {int(lengths[b])} != {n}"
        assert tokens[b, :n].tolist() == expected, f"row {b}: tokens differ"
        assert torch.all(tokens[b, n:] == EOS), f"row {b}: not eos-filled past its end"
