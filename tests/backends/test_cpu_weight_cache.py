"""The CPU ops' packed weights kept across calls (csrc/cpu/weight_cache.cpp): reused while the
weights hold the same bytes, re-derived after any change - an optimizer step, a write through
``.data``, a new tensor at a freed one's address - and dropped by ``empty_cache``."""
import pytest
import torch

import seq2seq_fast as sf
from seq2seq_fast.backends import cpp_ops
from seq2seq_fast.backends.extension import extension_error

pytestmark = pytest.mark.skipif(extension_error() is not None, reason=f"{extension_error()}")

V, E, H, L, B, T = 23, 8, 16, 2, 5, 7


def decoder_and_inputs(seed):
    torch.manual_seed(seed)
    decoder = sf.Seq2SeqAttentionDecoder(V, E, H, L, backend="cpp").eval()
    enc = torch.randn(T, B, H), torch.randn(L, B, H)
    lens = torch.tensor([7, 3, 0, 9, 1])
    return decoder, enc, lens


def one_step(decoder, enc, lens, X):
    with torch.no_grad():
        Y, _ = decoder(X, decoder.init_state(enc, lens))
    return Y


def torch_step(decoder, enc, lens, X):
    """The same call on the torch backend (nothing cached): the expected answer."""
    decoder.backend = "torch"
    try:
        return one_step(decoder, enc, lens, X)
    finally:
        decoder.backend = "cpp"


@pytest.mark.parametrize("steps", [1, 4])  # one step: vocabulary table kept too (V > B tokens)
def test_every_kind_of_weight_change_is_seen(steps):
    decoder, enc, lens = decoder_and_inputs(0)
    X = torch.randint(0, V, (B, steps))
    one_step(decoder, enc, lens, X)  # fills the cache
    changes = [
        lambda: decoder.attention.W_q.weight.data.mul_(-1.5),             # .data: no version bump
        lambda: decoder.rnn.weight_hh_l1.data.add_(0.25),                 # the block stacked under W_q
        lambda: decoder.rnn.weight_ih_l0.data[:, H:].mul_(2.0),           # the embedding-gate block
        lambda: decoder.embedding.weight.data[3].fill_(0.5),              # one row of the table's source
        lambda: decoder.dense.weight.data.mul_(0.5),
        lambda: decoder.rnn.weight_hh_l0.data.copy_(torch.randn(3 * H, H)),
    ]
    for change in changes:
        change()
        torch.testing.assert_close(one_step(decoder, enc, lens, X), torch_step(decoder, enc, lens, X))


def test_a_new_model_at_a_freed_models_addresses_gets_its_own_weights():
    X = torch.randint(0, V, (B, 1))
    for seed in range(4):  # each model freed before the next: its memory is likely reused
        decoder, enc, lens = decoder_and_inputs(seed)
        torch.testing.assert_close(one_step(decoder, enc, lens, X), torch_step(decoder, enc, lens, X))
        del decoder


def test_training_steps_and_repeated_calls_agree_with_torch():
    decoder, enc, lens = decoder_and_inputs(1)
    decoder.train()
    X = torch.randint(0, V, (B, 3))
    optimizer = torch.optim.SGD(decoder.parameters(), lr=0.5)
    for _ in range(3):
        Y, _ = decoder(X, decoder.init_state(enc, lens))
        optimizer.zero_grad()
        Y.square().mean().backward()
        optimizer.step()
        decoder.eval()
        for _ in range(2):  # the second call answers from the cache
            torch.testing.assert_close(one_step(decoder, enc, lens, X), torch_step(decoder, enc, lens, X))
        decoder.train()


def test_packed_weights_are_counted_and_released():
    decoder, enc, lens = decoder_and_inputs(2)
    X = torch.randint(0, V, (B, 1))
    sf.empty_cache()
    assert sf.cpu_cache_bytes() == 0
    expected = one_step(decoder, enc, lens, X)
    held = sf.cpu_cache_bytes()
    assert held > 0  # the packed weights (the outputs are still alive)
    assert sf.empty_cache() == held and sf.cpu_cache_bytes() == 0
    torch.testing.assert_close(one_step(decoder, enc, lens, X), expected, rtol=0, atol=0)


def test_greedy_and_encoder_see_changes_too():
    decoder, enc, lens = decoder_and_inputs(3)
    encoder = sf.Seq2SeqEncoder(V, E, H, L, backend="cpp").eval()
    X = torch.randint(0, V, (B, T))
    for _ in range(2):
        with torch.no_grad():
            fast = encoder(X)
            encoder.backend = "torch"
            slow = encoder(X)
            encoder.backend = "cpp"
        torch.testing.assert_close(fast, slow)
        encoder.rnn.weight_hh_l1.data.mul_(-1.0)
    bos, eos = 1, 2
    for _ in range(2):
        with torch.no_grad():
            state = decoder.init_state(enc, lens)
            tokens, lengths, _ = cpp_ops.greedy_loop(decoder, state[0].contiguous(), state[1], lens,
                                                     decoder.attention.W_k(state[0].contiguous()), bos=bos, eos=eos,
                                                     max_len=6, return_attention=False)
            X_t = torch.full((B, 1), bos)
            s = state
            expected = []
            for _ in range(6):
                decoder.backend = "torch"
                Y, s = decoder(X_t, s)
                decoder.backend = "cpp"
                X_t = Y.argmax(2)
                expected.append(X_t)
        expected = torch.cat(expected, 1)
        for row, n in enumerate(lengths.tolist()):  # up to and with each row's eos
            n = min(n + 1, tokens.shape[1])
            assert torch.equal(tokens[row, :n], expected[row, :n])
        decoder.dense.weight.data.mul_(-1.0)
