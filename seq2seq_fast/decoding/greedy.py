"""Batched greedy decoding: every row advances together until all have produced ``eos``."""
from typing import NamedTuple, Optional

import torch

from seq2seq_fast.backends.torch_ops import finish_rows
from seq2seq_fast.ops import functional, validation
from seq2seq_fast.modules.seq2seq import Seq2SeqAttentionDecoder


class DecodeResult(NamedTuple):
    tokens: torch.Tensor  # int64 (B, steps run), eos past each row's end
    lengths: torch.Tensor  # int64 (B,), tokens before the first eos
    attention: Optional[torch.Tensor]  # (B, steps run, T) or None


def check_decode_args(model, src, bos, eos, max_len):
    """Shared checks of the decoding entry points; returns the target vocabulary size."""
    for part in ("encoder", "decoder"):
        if not hasattr(model, part):
            raise TypeError(f"model must be an EncoderDecoder with .encoder and .decoder, got {type(model).__name__}")
    vocab = model.decoder.dense.out_features
    for name, value in (("bos", bos), ("eos", eos)):
        value = validation.check_int(value, name, minimum=0)
        if value >= vocab:
            raise IndexError(f"{name} must be a token id in [0, {vocab}), got {value}")
    validation.check_int(max_len, "max_len", minimum=1)
    validation.check_tensor(src, "src")
    return vocab



def _argmax_loop(step, batch, device, *, bos, eos, max_len, return_attention):
    """Greedy decoding with ``step(tokens (B, 1)) -> (logits (B, 1, V), weights (B, 1, T))``."""
    token = torch.full((batch, 1), bos, dtype=torch.long, device=device)
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    tokens, weights = [], []
    for _ in range(max_len):
        logits, attention = step(token)
        token = logits.argmax(dim=2)
        tokens.append(token)
        if return_attention:
            weights.append(attention)
        finished |= token.squeeze(1) == eos
        if bool(finished.all()):
            break
    result, lengths = finish_rows(torch.cat(tokens, dim=1), eos)
    return DecodeResult(result, lengths, torch.cat(weights, dim=1) if return_attention else None)


def greedy_decode(model, src, src_valid_len, *, bos, eos, max_len, return_attention=False):
    """Greedy decoding of a batch of source sentences.

    ``model`` is an ``EncoderDecoder`` (ours, or d2l's with the same call contracts); ``src``
    int64 (B, T) padded ids, ``src_valid_len`` (B,). Every row starts from ``bos`` and feeds
    back its argmax; the loop stops once every row has produced ``eos`` or after ``max_len``
    steps. Row b equals d2l's ``predict_seq2seq`` on that sentence alone. Decodes in the
    model's current mode (call ``model.eval()`` first, as d2l's ``predict_seq2seq`` does).

    Returns ``DecodeResult(tokens (B, steps) int64 with eos past each row's end,
    lengths (B,) not counting eos, attention (B, steps, T) or None)``.

    >>> out = greedy_decode(net.eval(), src, src_len, bos=1, eos=2, max_len=10)
    >>> out.tokens.shape, out.lengths
    """
    check_decode_args(model, src, bos, eos, max_len)
    kwargs = dict(bos=bos, eos=eos, max_len=max_len, return_attention=return_attention)
    encoder, decoder = model.encoder, model.decoder
    with torch.no_grad():
        state = decoder.init_state(encoder(src, src_valid_len), src_valid_len)
        batch, device = src.shape[0], src.device
        if not isinstance(decoder, Seq2SeqAttentionDecoder):
            return _argmax_loop(_public_step(decoder, state), batch, device, **kwargs)
        token = torch.full((batch, 1), bos, dtype=torch.long, device=device)
        backend, enc, hidden, lens, key_proj, _ = functional.prepare_decoder_call(decoder, token, state)
        loop = getattr(backend, "greedy_loop", None)
        if loop is not None:
            return DecodeResult(*loop(decoder, enc, hidden, lens, key_proj, **kwargs))
        return _argmax_loop(_backend_step(backend, decoder, enc, hidden, lens, key_proj), batch, device, **kwargs)


def _backend_step(backend, decoder, enc_outputs, hidden, valid_lens, key_proj):
    """One step of our decoder through its backend, inputs checked once for the whole loop."""
    carried = [hidden]

    def step(token):
        logits, carried[0], attention = backend.decoder_forward(
            decoder, token, enc_outputs, carried[0], valid_lens, key_proj)
        return logits, attention

    return step


def _public_step(decoder, state):
    """One step of any d2l-style attention decoder through its public ``forward``."""
    carried = [state]

    def step(token):
        logits, carried[0] = decoder(token, carried[0])
        return logits, decoder.attention_weights[0]

    return step
