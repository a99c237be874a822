"""Beam search: greedy at width 1, the exact best (and the exact ranking) of every hypothesis
at full width, length penalty, n-best ordering, OpenNMT's options and argument checks."""
import itertools
import math

import pytest
import torch
import torch.nn.functional as F

import seq2seq_fast as sf
from seq2seq_fast.decoding.beam import BeamResult, beam_search
from helpers import paired_models

BACKENDS = sf.available_backends("cpu")
# Triton on a CPU runs under its interpreter: too slow for the exhaustive searches.
FAST_BACKENDS = [b for b in BACKENDS if b != "triton" or torch.cuda.is_available()]


def _sharpen(*models, scale=3.0, eos=None, eos_bias=0.0):
    """Larger logits so that hypotheses differ clearly (no near-ties in the rankings)."""
    with torch.no_grad():
        for model in models:
            model.decoder.dense.weight.mul_(scale)
            if eos is not None:
                model.decoder.dense.bias[eos] += eos_bias


def _hypothesis_logprob(model, src, src_len, tokens, bos):
    """Teacher-forced sum of the log-probabilities of ``tokens`` (the ending eos included)."""
    with torch.no_grad():
        enc = model.encoder(src.unsqueeze(0), src_len.reshape(1))
        state = model.decoder.init_state(enc, src_len.reshape(1))
        dec_in = torch.tensor([[bos] + list(tokens[:-1])])
        logits, _ = model.decoder(dec_in, state)
        logp = F.log_softmax(logits[0], dim=-1)
        return float(logp[torch.arange(len(tokens)), torch.tensor(tokens)].sum())


def _all_hypotheses(vocab, eos, max_len):
    """Every output: k non-eos tokens then eos (k < max_len), or max_len non-eos tokens."""
    words = [w for w in range(vocab) if w != eos]
    for k in range(max_len):
        for prefix in itertools.product(words, repeat=k):
            yield list(prefix) + [eos]
    yield from (list(p) for p in itertools.product(words, repeat=max_len))


def _repeats_ngram(tokens, n):
    grams = [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]
    return len(grams) != len(set(grams))


def _exhaustive_ranking(model, src, src_len, *, bos, eos, vocab, max_len, alpha, min_len=0, ngram=0):
    ranked = []
    for hyp in _all_hypotheses(vocab, eos, max_len):
        ended = hyp[-1] == eos
        length = len(hyp) - 1 if ended else len(hyp)
        if ended and length < min_len:
            continue
        if ngram and _repeats_ngram(hyp, ngram):
            continue
        score = _hypothesis_logprob(model, src, src_len, hyp, bos) / ((5 + len(hyp)) / 6) ** alpha
        ranked.append((score, hyp[:length], length))
    ranked.sort(key=lambda item: -item[0])
    return ranked


@pytest.mark.parametrize("backend,dtype", [
    pytest.param(b, d, id=f"{b}-{str(d)[6:]}")
    for b in BACKENDS for d in (torch.float64, torch.float32) if b in FAST_BACKENDS or d == torch.float32])
def test_beam_one_equals_greedy(backend, dtype):
    vocab, bos, eos, max_len = 12, 1, 2, 9
    _, model = paired_models(vocab, 6, 10, 2, dtype=dtype, backend=backend, seed=7)
    model.eval()
    _sharpen(model, scale=1.0, eos=eos, eos_bias=0.5)
    torch.manual_seed(1)
    src = torch.randint(3, vocab, (7, 6))
    lens = torch.tensor([6, 1, 3, 0, 6, 4, 2])
    greedy = sf.greedy_decode(model, src, lens, bos=bos, eos=eos, max_len=max_len)
    beam = beam_search(model, src, lens, bos=bos, eos=eos, max_len=max_len, beam_size=1)
    assert isinstance(beam, BeamResult)
    assert beam.tokens.dtype == torch.int64 and beam.tokens.shape[:2] == (7, 1)
    assert len(set(greedy.lengths.tolist())) > 1, "rows end at different steps"
    assert torch.equal(beam.tokens[:, 0], greedy.tokens), "tokens"
    assert torch.equal(beam.lengths[:, 0], greedy.lengths), "lengths"
    for b in range(7):
        n = int(greedy.lengths[b])
        hyp = greedy.tokens[b, : n + 1].tolist() if n < max_len else greedy.tokens[b].tolist()
        expected = _hypothesis_logprob(model, src[b], lens[b], hyp, bos)
        assert math.isclose(float(beam.scores[b, 0]), expected, rel_tol=1e-5, abs_tol=1e-5), f"score row {b}"


@pytest.mark.parametrize("alpha", [0.0, 1.0, -0.5])
@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_full_width_beam_ranks_every_hypothesis_exactly(backend, alpha):
    vocab, bos, eos, max_len = 4, 0, 3, 3
    _, model = paired_models(vocab, 3, 5, 1, backend=backend, seed=3)
    model.eval()
    _sharpen(model, scale=2.0)
    src = torch.tensor([[1, 2, 0], [2, 2, 1]])
    lens = torch.tensor([3, 1])
    total = sum(1 for _ in _all_hypotheses(vocab, eos, max_len))  # 1 + 3 + 9 + 27 = 40
    out = beam_search(model, src, lens, bos=bos, eos=eos, max_len=max_len, beam_size=total,
                      n_best=total, length_penalty=alpha)
    for b in range(2):
        expected = _exhaustive_ranking(model, src[b], lens[b], bos=bos, eos=eos, vocab=vocab,
                                       max_len=max_len, alpha=alpha)
        assert len(expected) == total
        scores = [score for score, _, _ in expected]
        torch.testing.assert_close(out.scores[b], torch.tensor(scores, dtype=out.scores.dtype), msg=f"row {b} scores")
        for j, (_, hyp, length) in enumerate(expected):
            assert int(out.lengths[b, j]) == length, f"row {b} hypothesis {j} length"
            assert out.tokens[b, j, :length].tolist() == hyp, f"row {b} hypothesis {j}"
            assert (out.tokens[b, j, length:] == eos).all()


@pytest.mark.parametrize("min_len,ngram", [(2, 0), (0, 1), (1, 2)])
def test_full_width_beam_with_min_len_and_ngram_blocking(min_len, ngram):
    vocab, bos, eos, max_len = 4, 0, 3, 3
    _, model = paired_models(vocab, 3, 5, 1, seed=5)
    model.eval()
    _sharpen(model, scale=2.0)
    src, lens = torch.tensor([[1, 2, 1]]), torch.tensor([2])
    expected = _exhaustive_ranking(model, src[0], lens[0], bos=bos, eos=eos, vocab=vocab, max_len=max_len,
                                   alpha=0.0, min_len=min_len, ngram=ngram)
    out = beam_search(model, src, lens, bos=bos, eos=eos, max_len=max_len, beam_size=40, n_best=40,
                      min_len=min_len, block_ngram_repeat=ngram)
    found = len(expected)
    assert found < 40
    torch.testing.assert_close(out.scores[0, :found], torch.tensor([s for s, _, _ in expected], dtype=out.scores.dtype))
    assert [out.tokens[0, j, : int(out.lengths[0, j])].tolist() for j in range(found)] == [h for _, h, _ in expected]
    assert torch.isneginf(out.scores[0, found:]).all(), "spare hypotheses score -inf"
    assert (out.lengths[0, found:] == 0).all() and (out.tokens[0, found:] == eos).all()


def test_min_len_and_ngram_blocking_hold_on_a_narrow_beam():
    vocab, bos, eos = 9, 0, 8
    _, model = paired_models(vocab, 4, 8, 2, seed=11)
    model.eval()
    _sharpen(model, scale=4.0, eos=eos, eos_bias=3.0)
    torch.manual_seed(0)
    src, lens = torch.randint(1, vocab, (5, 6)), torch.tensor([6, 2, 4, 1, 5])
    out = beam_search(model, src, lens, bos=bos, eos=eos, max_len=12, beam_size=3, n_best=3,
                      min_len=4, block_ngram_repeat=2)
    assert (out.lengths >= 4).all()
    for b, j in itertools.product(range(5), range(3)):
        hyp = out.tokens[b, j, : int(out.lengths[b, j])].tolist()
        assert not _repeats_ngram(hyp, 2), f"row {b} hypothesis {j} repeats a bigram: {hyp}"


@pytest.mark.parametrize("alpha", [0.0, 0.6, 2.0])
def test_n_best_sorted_and_scores_are_penalised_logprobs(alpha):
    vocab, bos, eos, max_len = 10, 1, 2, 8
    _, model = paired_models(vocab, 5, 8, 2, seed=2)
    model.eval()
    _sharpen(model, scale=2.0, eos=eos, eos_bias=1.0)
    torch.manual_seed(4)
    src, lens = torch.randint(3, vocab, (4, 5)), torch.tensor([5, 3, 1, 4])
    out = beam_search(model, src, lens, bos=bos, eos=eos, max_len=max_len, beam_size=5, n_best=4,
                      length_penalty=alpha)
    assert out.scores.shape == (4, 4) and out.lengths.shape == (4, 4)
    assert (out.scores[:, :-1] >= out.scores[:, 1:]).all(), "best first"
    for b, j in itertools.product(range(4), range(4)):
        n = int(out.lengths[b, j])
        hyp = out.tokens[b, j, : n + 1].tolist() if n < max_len else out.tokens[b, j, :n].tolist()
        assert eos not in hyp[:n]
        expected = _hypothesis_logprob(model, src[b], lens[b], hyp, bos) / ((5 + len(hyp)) / 6) ** alpha
        assert math.isclose(float(out.scores[b, j]), expected, rel_tol=1e-9, abs_tol=1e-9), f"row {b} hyp {j}"
    hyps = {tuple(out.tokens[0, j, : int(out.lengths[0, j])].tolist()) for j in range(4)}
    assert len(hyps) == 4, "n-best hypotheses are distinct"


def test_length_penalty_favours_longer_hypotheses():
    vocab, bos, eos, max_len = 10, 1, 2, 10
    _, model = paired_models(vocab, 5, 8, 2, seed=6)
    model.eval()
    torch.manual_seed(5)
    src, lens = torch.randint(3, vocab, (16, 5)), torch.full((16,), 5)
    kw = dict(bos=bos, eos=eos, max_len=max_len, beam_size=6)
    short = beam_search(model, src, lens, length_penalty=0.0, **kw)
    long = beam_search(model, src, lens, length_penalty=3.0, **kw)
    assert (long.lengths >= short.lengths).all()
    assert (long.lengths > short.lengths).any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_batched_search_equals_each_sentence_alone(backend):
    vocab, bos, eos = 11, 1, 2
    _, model = paired_models(vocab, 5, 8, 2, dtype=torch.float64, backend=backend, seed=9)
    model.eval()
    _sharpen(model, scale=2.0, eos=eos, eos_bias=1.0)
    torch.manual_seed(2)
    src, lens = torch.randint(3, vocab, (6, 7)), torch.tensor([7, 1, 5, 0, 3, 7])
    kw = dict(bos=bos, eos=eos, max_len=10, beam_size=3, n_best=2, length_penalty=0.5)
    batch = beam_search(model, src, lens, **kw)
    for b in range(6):
        alone = beam_search(model, src[b:b + 1], lens[b:b + 1], **kw)
        torch.testing.assert_close(batch.scores[b], alone.scores[0], msg=f"row {b} scores")
        assert torch.equal(batch.lengths[b], alone.lengths[0]), f"row {b} lengths"
        steps = alone.tokens.shape[2]
        assert torch.equal(batch.tokens[b, :, :steps], alone.tokens[0]), f"row {b} tokens"
        assert (batch.tokens[b, :, steps:] == eos).all()


def test_reference_model_gives_the_same_beams():
    ref, fast = paired_models(9, 4, 8, 2, seed=4)
    ref.eval(), fast.eval()
    _sharpen(ref, fast, eos=3, eos_bias=1.0)
    src, lens = torch.randint(0, 9, (4, 5)), torch.tensor([5, 2, 1, 4])
    kw = dict(bos=0, eos=3, max_len=7, beam_size=4, n_best=2)
    a, b = beam_search(ref, src, lens, **kw), beam_search(fast, src, lens, **kw)
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.lengths, b.lengths)
    torch.testing.assert_close(a.scores, b.scores)


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_decoder_call_per_step_and_one_key_projection(backend):
    _, model = paired_models(9, 4, 8, 2, backend=backend, seed=4)
    model.eval()
    calls, projections = [], []
    model.decoder.register_forward_hook(lambda m, args, out: calls.append(args[0].shape))
    model.decoder.attention.W_k.register_forward_hook(lambda m, args, out: projections.append(args[0].shape))
    src, lens = torch.randint(0, 9, (3, 5)), torch.tensor([5, 2, 1])
    with torch.no_grad():
        model.decoder.dense.bias[3] -= 100.0  # no eos: every step runs
    beam_search(model, src, lens, bos=0, eos=3, max_len=6, beam_size=4)
    assert len(calls) == 6
    assert calls[0] == (3, 1) and all(shape == (12, 1) for shape in calls[1:]), calls
    assert projections == [torch.Size([3, 5, 8])], "keys projected once per sentence, shared by its beams"


@pytest.mark.parametrize(
    "kwargs,error,name",
    [
        (dict(beam_size=0), ValueError, "beam_size"),
        (dict(beam_size=2.0), TypeError, "beam_size"),
        (dict(n_best=3, beam_size=2), ValueError, "n_best"),
        (dict(n_best=0), ValueError, "n_best"),
        (dict(min_len=-1), ValueError, "min_len"),
        (dict(min_len=9), ValueError, "min_len"),
        (dict(block_ngram_repeat=-2), ValueError, "block_ngram_repeat"),
        (dict(length_penalty="1"), TypeError, "length_penalty"),
        (dict(length_penalty=float("nan")), ValueError, "length_penalty"),
        (dict(max_len=0), ValueError, "max_len"),
        (dict(eos=9), IndexError, "eos"),
    ],
)
def test_beam_rejects_bad_arguments(kwargs, error, name):
    _, model = paired_models(9, 4, 8, 1)
    args = dict(bos=0, eos=2, max_len=5)
    args.update(kwargs)
    with pytest.raises(error, match=name):
        beam_search(model, torch.zeros(2, 3, dtype=torch.long), torch.tensor([3, 3]), **args)
