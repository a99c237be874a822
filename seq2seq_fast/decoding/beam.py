"""Batched beam search over an encoder-decoder: every live beam of every sentence advances in
one decoder call per step, and a sentence's beams share its projected attention keys."""
import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

from seq2seq_fast.ops import validation
from seq2seq_fast.decoding.greedy import check_decode_args
from seq2seq_fast.ops.state import reindex_state


class BeamResult(NamedTuple):
    tokens: torch.Tensor  # int64 (B, n_best, steps <= max_len), eos past each hypothesis's end
    lengths: torch.Tensor  # int64 (B, n_best), tokens before the ending eos
    scores: torch.Tensor  # (B, n_best), length-penalised sums of log-probabilities, best first


def length_penalty_factor(length, alpha):
    """GNMT's ``((5 + length) / 6) ** alpha``; ``length`` counts the ending eos."""
    return ((5.0 + length) / 6.0) ** alpha


def _check_args(beam_size, length_penalty, n_best, min_len, block_ngram_repeat, max_len):
    beam_size = validation.check_int(beam_size, "beam_size", minimum=1)
    n_best = validation.check_int(n_best, "n_best", minimum=1)
    if n_best > beam_size:
        raise ValueError(f"n_best must be <= beam_size ({beam_size}), got {n_best}")
    min_len = validation.check_int(min_len, "min_len", minimum=0)
    if min_len > max_len:
        raise ValueError(f"min_len must be <= max_len ({max_len}), got {min_len}")
    block_ngram_repeat = validation.check_int(block_ngram_repeat, "block_ngram_repeat", minimum=0)
    if isinstance(length_penalty, bool) or not isinstance(length_penalty, (int, float)):
        raise TypeError(f"length_penalty must be a float, got {type(length_penalty).__name__}")
    if not math.isfinite(length_penalty):
        raise ValueError(f"length_penalty must be finite, got {length_penalty}")
    return beam_size, float(length_penalty), n_best, min_len, block_ngram_repeat


def _blocked_ngrams(prefix_tokens, n, vocab):
    """Bool (N, vocab): tokens that would repeat an n-gram already in each row of
    ``prefix_tokens`` (N, t) if appended to it."""
    rows, t = prefix_tokens.shape
    blocked = torch.zeros(rows, vocab, dtype=torch.int32, device=prefix_tokens.device)
    if t < n:
        return blocked.bool()
    grams = prefix_tokens.unfold(1, n, 1)  # (N, t - n + 1, n)
    tail = prefix_tokens[:, t - n + 1:]  # the last n - 1 tokens, (N, n - 1)
    matches = (grams[:, :, : n - 1] == tail.unsqueeze(1)).all(dim=2)
    blocked.scatter_add_(1, grams[:, :, n - 1], matches.to(torch.int32))
    return blocked > 0


def beam_search(model, src, src_valid_len, *, bos, eos, max_len, beam_size=4, length_penalty=0.0,
                n_best=1, min_len=0, block_ngram_repeat=0):
    """Beam search of a batch of source sentences.

    ``model`` is an ``EncoderDecoder`` (ours or d2l's); ``src`` int64 (B, T) padded ids and
    ``src_valid_len`` (B,) their lengths. Each step extends every live beam by every token and
    ranks a sentence's candidates by summed log-probability: those ending in ``eos`` among the
    ``beam_size`` best are finished, and the ``beam_size`` best not ending in ``eos`` stay alive
    (fairseq's rule). A sentence stops once it has ``beam_size`` finished hypotheses; at
    ``max_len`` its ``beam_size`` best candidates are finished as they are. ``beam_size=1`` is
    greedy decoding; a beam as wide as the number of possible outputs ranks them all exactly.

    A hypothesis's score is the sum of the log-probabilities of its tokens, the ending ``eos``
    included, divided by ``((5 + length) / 6) ** length_penalty`` with the ``eos`` counted in the
    length (GNMT); an unfinished hypothesis at ``max_len`` has length ``max_len``. ``min_len``
    forbids ``eos`` before that many tokens; ``block_ngram_repeat=n > 0`` forbids a hypothesis to
    repeat any n-gram of its own (OpenNMT-py's options). Decodes in the model's current mode.

    Returns ``BeamResult(tokens int64 (B, n_best, steps <= max_len) eos-filled past each end,
    lengths int64 (B, n_best) not counting eos, scores (B, n_best))``, best first; a sentence
    with fewer than ``n_best`` hypotheses has spare entries of score -inf, length 0.

    >>> out = beam_search(net.eval(), src, src_len, bos=1, eos=2, max_len=10, beam_size=4)
    >>> out.tokens[:, 0], out.scores[:, 0]   # the best translation of each sentence
    """
    vocab = check_decode_args(model, src, bos, eos, max_len)
    K, alpha, n_best, min_len, ngram = _check_args(
        beam_size, length_penalty, n_best, min_len, block_ngram_repeat, max_len)
    with torch.no_grad():
        state = model.decoder.init_state(model.encoder(src, src_valid_len), src_valid_len)
        return _search(model.decoder, state, src.shape[0], src.device, vocab, bos, eos, max_len,
                       K, alpha, n_best, min_len, ngram)


def _search(decoder, state, batch, device, vocab, bos, eos, max_len, K, alpha, n_best, min_len, ngram):
    # The first step runs on one beam per sentence (all beams would hold the same <bos>); the
    # state it returns carries the sentence's projected keys, which reindex_state then gathers
    # for the beams.
    active = torch.arange(batch, device=device)  # global ids of the sentences still searched
    beams = 1  # live beams per active sentence (rows of the decoder batch: len(active) * beams)
    alive_tokens = torch.empty(batch, 0, dtype=torch.long, device=device)
    alive_scores = None
    token = torch.full((batch, 1), bos, dtype=torch.long, device=device)
    pool_scores = pool_tokens = pool_lengths = None  # the best K finished per sentence
    for t in range(1, max_len + 1):
        logits, state = decoder(token, state)
        logp = F.log_softmax(logits[:, -1], dim=-1)  # (A * beams, vocab)
        if pool_scores is None:
            pool_scores = torch.full((batch, K), -math.inf, dtype=logp.dtype, device=device)
            pool_tokens = torch.full((batch, K, max_len), eos, dtype=torch.long, device=device)
            pool_lengths = torch.zeros(batch, K, dtype=torch.long, device=device)
            alive_scores = torch.zeros(batch, 1, dtype=logp.dtype, device=device)
        if t - 1 < min_len:
            logp[:, eos] = -math.inf
        if ngram:
            logp = logp.masked_fill(_blocked_ngrams(alive_tokens, ngram, vocab), -math.inf)
        A = active.numel()
        cand = (alive_scores.reshape(-1, 1) + logp).reshape(A, beams * vocab)
        take = min(2 * K, beams * vocab)
        top_scores, top_index = cand.topk(take, dim=1)
        top_beam, top_token = top_index // vocab, top_index % vocab
        last = t == max_len

        # Finish: the eos candidates among the K best (every one of the K best at max_len).
        k = min(K, take)
        finish = torch.isfinite(top_scores[:, :k])
        if not last:
            finish &= top_token[:, :k] == eos
        prev_rows = (torch.arange(A, device=device).unsqueeze(1) * beams + top_beam[:, :k]).reshape(-1)
        seqs = torch.cat([alive_tokens[prev_rows], top_token[:, :k].reshape(-1, 1)], dim=1).reshape(A, k, t)
        ended = top_token[:, :k] == eos
        seqs = torch.cat([seqs, seqs.new_full((A, k, max_len - t), eos)], dim=2)
        new_scores = torch.where(finish, top_scores[:, :k] / length_penalty_factor(t, alpha), -math.inf)
        new_lengths = torch.where(ended, t - 1, t)
        merged_scores, pick = torch.cat([pool_scores[active], new_scores], dim=1).topk(K, dim=1)
        pool_scores[active] = merged_scores
        pool_lengths[active] = torch.cat([pool_lengths[active], new_lengths], dim=1).gather(1, pick)
        merged = torch.cat([pool_tokens[active], seqs], dim=1)
        pool_tokens[active] = merged.gather(1, pick.unsqueeze(2).expand(-1, -1, max_len))
        if last:
            break

        # Stay alive: the K best candidates that do not end in eos (spares score -inf).
        order = torch.argsort((top_token == eos).to(torch.int8), dim=1, stable=True)[:, :K]
        next_scores = top_scores.gather(1, order)
        next_token = top_token.gather(1, order)
        next_scores = next_scores.masked_fill(next_token == eos, -math.inf)
        next_beam = top_beam.gather(1, order)
        done = (torch.isfinite(pool_scores[active]).sum(dim=1) >= K) | ~torch.isfinite(next_scores).any(dim=1)
        keep = (~done).nonzero().squeeze(1)
        if keep.numel() == 0:
            break
        rows = (keep.unsqueeze(1) * beams + next_beam[keep]).reshape(-1)
        beams = order.shape[1]
        state = reindex_state(state, rows)
        token = next_token[keep].reshape(-1, 1)
        alive_tokens = torch.cat([alive_tokens[rows], token], dim=1)
        alive_scores = next_scores[keep]
        active = active[keep]

    scores = pool_scores[:, :n_best]
    lengths = pool_lengths[:, :n_best].masked_fill(~torch.isfinite(scores), 0)
    tokens = pool_tokens[:, :n_best].masked_fill(~torch.isfinite(scores).unsqueeze(2), eos)
    steps = min(int(lengths.max()) + 1, max_len)
    return BeamResult(tokens[:, :, :steps].contiguous(), lengths, scores)
