"""Batched greedy decoding equals d2l's predict_seq2seq run on each sentence alone."""
import pytest
import torch

import seq2seq_fast as sf
from seq2seq_fast import reference as R
from helpers import paired_models

BACKENDS = sf.available_backends("cpu")


def _per_sentence(ref_model, src, lens, bos, eos, max_len):
    return [R.predict_tokens(ref_model, src[b], int(lens[b]), bos, eos, max_len)[0] for b in range(src.shape[0])]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_greedy_equals_per_sentence_reference(backend, dtype):
    vocab, bos, eos, max_len = 12, 1, 2, 9
    ref_model, fast_model = paired_models(vocab, 6, 10, 2, dtype=dtype, backend=backend, seed=7)
    ref_model.eval(), fast_model.eval()
    # Make eos likely so rows end at different steps.
    with torch.no_grad():
        ref_model.decoder.dense.bias[eos] += 1.5
        fast_model.decoder.dense.bias[eos] += 1.5
    torch.manual_seed(1)
    src = torch.randint(3, vocab, (7, 6))
    lens = torch.tensor([6, 1, 3, 0, 6, 4, 2])
    out = sf.greedy_decode(fast_model, src, lens, bos=bos, eos=eos, max_len=max_len, return_attention=True)
    expected = _per_sentence(ref_model, src, lens, bos, eos, max_len)
    steps = out.tokens.shape[1]
    assert steps == max(min(len(e) + 1, max_len) for e in expected), "stops once every row ended"
    for b, tokens in enumerate(expected):
        n = int(out.lengths[b])
        assert out.tokens[b, :n].tolist() == tokens, f"row {b}"
        assert (out.tokens[b, n:] == eos).all(), f"row {b} is filled with eos past its end"
    assert out.attention.shape == (7, steps, 6)
    assert torch.allclose(out.attention.sum(-1), torch.ones(7, steps, dtype=dtype))


@pytest.mark.parametrize("backend", BACKENDS)
def test_greedy_attention_matches_reference_steps(backend):
    ref_model, fast_model = paired_models(9, 4, 8, 1, backend=backend, seed=2)
    ref_model.eval(), fast_model.eval()
    src, lens = torch.randint(0, 9, (1, 5)), torch.tensor([3])
    out = sf.greedy_decode(fast_model, src, lens, bos=0, eos=8, max_len=4, return_attention=True)
    _, weights = R.predict_tokens(ref_model, src[0], 3, 0, 8, 4)
    expected = torch.cat(weights, dim=1)  # (1, steps, T)
    torch.testing.assert_close(out.attention, expected[:, : out.attention.shape[1]])


def test_greedy_runs_to_max_len_without_eos():
    _, fast_model = paired_models(9, 4, 8, 1)
    fast_model.eval()
    with torch.no_grad():
        fast_model.decoder.dense.bias[8] -= 100.0  # eos never wins
    out = sf.greedy_decode(fast_model, torch.randint(0, 9, (3, 5)), torch.tensor([5, 2, 1]), bos=0, eos=8, max_len=6)
    assert out.tokens.shape == (3, 6)
    assert out.lengths.tolist() == [6, 6, 6]
    assert out.attention is None


def test_greedy_with_reference_model():
    ref_model, fast_model = paired_models(9, 4, 8, 2, seed=4)
    ref_model.eval(), fast_model.eval()
    src, lens = torch.randint(0, 9, (4, 5)), torch.tensor([5, 2, 1, 4])
    a = sf.greedy_decode(ref_model, src, lens, bos=0, eos=3, max_len=7, return_attention=True)
    b = sf.greedy_decode(fast_model, src, lens, bos=0, eos=3, max_len=7, return_attention=True)
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.lengths, b.lengths)
    torch.testing.assert_close(a.attention, b.attention)


@pytest.mark.parametrize(
    "kwargs,error",
    [
        (dict(bos=0, eos=99, max_len=3), IndexError),
        (dict(bos=-1, eos=2, max_len=3), ValueError),
        (dict(bos=0, eos=2, max_len=0), ValueError),
        (dict(bos=0.5, eos=2, max_len=3), TypeError),
    ],
)
def test_greedy_rejects_bad_arguments(kwargs, error):
    _, fast_model = paired_models(9, 4, 8, 1)
    with pytest.raises(error):
        sf.greedy_decode(fast_model, torch.zeros(2, 3, dtype=torch.long), torch.tensor([3, 3]), **kwargs)
