"""Batched greedy decoding in C++ (``cpp`` backend's ``greedy_loop``) against d2l's per-sentence
``predict_seq2seq`` loop over the reference modules; threads; fake shapes; bad arguments."""
import threading

import pytest
import torch

from seq2seq_fast import reference as R
from seq2seq_fast.backends.extension import extension_error

pytestmark = pytest.mark.skipif(extension_error() is not None, reason=f"{extension_error()}")

VOCAB, EMBED, BOS, EOS = 17, 8, 1, 2


def backend():
    from seq2seq_fast.backends import cpp_ops as backend_cpp

    return backend_cpp


def model(H, L, eos_bias, dtype=torch.float32, seed=0, sharp=False):
    """A reference model; ``sharp``: d2l's Xavier init with larger embedding and output weights,
    so that the argmax depends on the source and rows end at different steps."""
    torch.manual_seed(seed)
    p = 0.2 if L > 1 else 0.0
    encoder = R.Seq2SeqEncoder(VOCAB, EMBED, H, L, p)
    decoder = R.Seq2SeqAttentionDecoder(VOCAB, EMBED, H, L, p)
    net = R.EncoderDecoder(encoder, decoder).to(dtype).eval()
    with torch.no_grad():
        if sharp:
            net.apply(R.xavier_init_weights)
            decoder.dense.weight.mul_(4)
            decoder.embedding.weight.mul_(3)
        decoder.dense.bias[EOS] += eos_bias
    return net


def mixed_model(H, L, src, src_len, max_len):
    """The sharp model whose eos bias (from a fixed grid) gives the most distinct row lengths."""
    best, best_count = None, -1
    for bias in [0.25 * i for i in range(9)]:
        net = model(H, L, bias, sharp=True)
        count = len(set(cpp_greedy(net, src, src_len, max_len)[1].tolist()))
        if count > best_count:
            best, best_count = net, count
    return best, best_count


def cpp_greedy(net, src, src_len, max_len, return_attention=True):
    with torch.no_grad():
        out, state = backend().encoder_forward(net.encoder, src)
        values = out.permute(1, 0, 2)
        key_proj = net.decoder.attention.W_k(values)
        return backend().greedy_loop(net.decoder, values, state, src_len, key_proj, bos=BOS, eos=EOS,
                                     max_len=max_len, return_attention=return_attention)


def sources(B, T, seed=1):
    g = torch.Generator().manual_seed(seed)
    src = torch.randint(3, VOCAB, (B, T), generator=g)
    src_len = torch.randint(1, T + 1, (B,), generator=g)
    src_len[0] = T
    return src, src_len


@pytest.mark.parametrize("eos_bias", [-100.0, 0.0, "mixed", 100.0], ids=["never-eos", "random", "mixed", "eos-first"])
@pytest.mark.parametrize("shape", [(1, 1, 5, 1), (3, 7, 33, 2), (8, 6, 32, 3)],
                         ids=lambda s: "B{}-T{}-H{}-L{}".format(*s))
def test_tokens_and_attention_equal_per_sentence_reference(shape, eos_bias):
    B, T, H, L = shape
    src, src_len = sources(B, T)
    max_len = 9
    if eos_bias == "mixed":
        net, distinct = mixed_model(H, L, src, src_len, max_len)
        assert B < 3 or distinct >= 2, "the mixed case must end rows at different steps"
    else:
        net = model(H, L, eos_bias)
    tokens, lengths, attention = cpp_greedy(net, src, src_len, max_len)
    steps = tokens.shape[1]
    assert tokens.dtype == torch.int64 and lengths.dtype == torch.int64
    assert attention.shape == (B, steps, T)
    longest = 0
    for b in range(B):
        expected, weights = R.predict_tokens(net, src[b], int(src_len[b]), BOS, EOS, max_len)
        n = len(expected)
        longest = max(longest, len(weights))
        assert int(lengths[b]) == n, f"row {b}: length {int(lengths[b])} != {n}"
        assert tokens[b, :n].tolist() == expected, f"row {b}: tokens differ"
        assert torch.all(tokens[b, n:] == EOS), f"row {b}: not eos-filled past its end"
        expected_attention = torch.cat(weights, dim=1)[0]  # (steps run for this row, T)
        torch.testing.assert_close(attention[b, : len(weights)], expected_attention, atol=3e-5, rtol=1e-4)
    assert steps == longest, "the loop stops once every row produced eos (or at max_len)"


def test_without_attention_returns_none_and_same_tokens():
    net = model(16, 2, 0.6)
    src, src_len = sources(5, 6)
    with_attention = cpp_greedy(net, src, src_len, 7, True)
    without = cpp_greedy(net, src, src_len, 7, False)
    assert without[2] is None
    assert torch.equal(with_attention[0], without[0]) and torch.equal(with_attention[1], without[1])


def test_two_threads_decoding_at_once_equal_one_thread():
    net = model(32, 2, 0.3)
    inputs = [sources(16, 8, seed=s) for s in (1, 2)]
    expected = [cpp_greedy(net, src, length, 10) for src, length in inputs]
    results = [None, None]
    barrier = threading.Barrier(2)

    def work(i):
        barrier.wait()
        for _ in range(20):
            results[i] = cpp_greedy(net, *inputs[i], 10)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for exp, got in zip(expected, results):
        for e, g in zip(exp, got):
            assert torch.equal(e, g)


def test_greedy_op_fake_and_schema():
    net = model(5, 2, 0.0)
    src, src_len = sources(3, 4)
    with torch.no_grad():
        out, state = backend().encoder_forward(net.encoder, src)
        values = out.permute(1, 0, 2).contiguous()
        kp = net.decoder.attention.W_k(values)
    params = backend().decoder_params(net.decoder)
    params = [p.detach() for p in params]
    args = (values, state.detach(), src_len, kp, params, None, None, BOS, EOS, 6, True)
    torch.library.opcheck(torch.ops.seq2seq_fast.greedy_decode.default, args,
                          test_utils=("test_schema", "test_faketensor"))


def test_bad_arguments():
    net = model(5, 2, 0.0)
    src, src_len = sources(3, 4)
    with torch.no_grad():
        out, state = backend().encoder_forward(net.encoder, src)
        values = out.permute(1, 0, 2)
        kp = net.decoder.attention.W_k(values)
    loop = backend().greedy_loop
    with pytest.raises(IndexError, match="bos must be a token id"):
        loop(net.decoder, values, state, src_len, kp, bos=VOCAB, eos=EOS, max_len=3, return_attention=False)
    with pytest.raises(IndexError, match="eos must be a token id"):
        loop(net.decoder, values, state, src_len, kp, bos=BOS, eos=-1, max_len=3, return_attention=False)
    with pytest.raises(ValueError, match="max_len must be >= 1"):
        loop(net.decoder, values, state, src_len, kp, bos=BOS, eos=EOS, max_len=0, return_attention=False)
    with pytest.raises(ValueError, match="hidden_state must have shape"):
        loop(net.decoder, values, state[:1], src_len, kp, bos=BOS, eos=EOS, max_len=3, return_attention=False)
    with pytest.raises(TypeError, match="valid_lens must be int64"):
        loop(net.decoder, values, state, src_len.float(), kp, bos=BOS, eos=EOS, max_len=3, return_attention=False)
