"""seq2seq_fast: a drop-in, fast Bahdanau-attention GRU encoder-decoder (d2l's), on CPU and GPU.

Change ``from d2l import torch as d2l`` uses of the chapter's classes to this package: the
classes, signatures and ``state_dict`` keys are d2l's; the decoder's step loop runs on the
fastest backend available (``available_backends()``).
"""
from seq2seq_fast.modules.attention import AdditiveAttention, masked_softmax
from seq2seq_fast.backends.cpp_ops import cpu_cache_bytes, empty_cache
from seq2seq_fast.ops.dispatch import available_backends, unavailable_reason
from seq2seq_fast.decoding.beam import BeamResult, beam_search
from seq2seq_fast.decoding.greedy import DecodeResult, greedy_decode
from seq2seq_fast.modules.loss import MaskedSoftmaxCELoss
from seq2seq_fast.modules.seq2seq import (
    AttentionDecoder,
    Decoder,
    Encoder,
    EncoderDecoder,
    Seq2SeqAttentionDecoder,
    Seq2SeqEncoder,
)
from seq2seq_fast.ops.state import DecoderState

__version__ = "0.1.0"

__all__ = [
    "AdditiveAttention",
    "AttentionDecoder",
    "BeamResult",
    "DecodeResult",
    "Decoder",
    "DecoderState",
    "Encoder",
    "EncoderDecoder",
    "MaskedSoftmaxCELoss",
    "Seq2SeqAttentionDecoder",
    "Seq2SeqEncoder",
    "__version__",
    "available_backends",
    "beam_search",
    "cpu_cache_bytes",
    "empty_cache",
    "greedy_decode",
    "masked_softmax",
    "unavailable_reason",
]
