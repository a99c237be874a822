"""seq2seq_fast: a drop-in, fast Bahdanau-attention GRU encoder-decoder (d2l's), on CPU and GPU.

Change ``from d2l import torch as d2l`` to ``import seq2seq_fast as d2l`` in the chapter's code:
the classes, signatures and ``state_dict`` keys are d2l's; the decoder's step loop runs on the
fastest backend available (``available_backends()``). The chapter's functions (d2l 0.17.6's data
pipeline, ``train_seq2seq``, ``predict_seq2seq``, ``bleu``, ``show_heatmaps``, ``Animator``,
``Timer``, ``Accumulator``, ``try_gpu``) are here too, implemented by ``seq2seq_fast.tools``.
"""
from seq2seq_fast.modules.attention import AdditiveAttention, masked_softmax
from seq2seq_fast.backends.memory import cpu_cache_bytes, empty_cache
from seq2seq_fast.ops.dispatch import available_backends, unavailable_reason
from seq2seq_fast.decoding.beam import BeamResult, beam_search
from seq2seq_fast.decoding.greedy import DecodeResult, greedy_decode
from seq2seq_fast.modules.loss import MaskedSoftmaxCELoss, sequence_mask
from seq2seq_fast.modules.seq2seq import (
    AttentionDecoder,
    Decoder,
    Encoder,
    EncoderDecoder,
    Seq2SeqAttentionDecoder,
    Seq2SeqEncoder,
)
from seq2seq_fast.ops.state import DecoderState
from seq2seq_fast.tools.data import (
    Vocab,
    bleu,
    build_array_nmt,
    load_array,
    load_data_nmt,
    preprocess_nmt,
    read_data_nmt,
    tokenize_nmt,
    truncate_pad,
)
from seq2seq_fast.tools.helpers import Accumulator, Timer, try_gpu
from seq2seq_fast.tools.plots import Animator, show_heatmaps
from seq2seq_fast.tools.train import grad_clipping, train_seq2seq, xavier_init_weights
from seq2seq_fast.tools.translation import predict_seq2seq, predict_seq2seq_batch

__version__ = "0.1.0"

__all__ = [
    "Accumulator",
    "AdditiveAttention",
    "Animator",
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
    "Timer",
    "Vocab",
    "__version__",
    "available_backends",
    "beam_search",
    "bleu",
    "build_array_nmt",
    "cpu_cache_bytes",
    "empty_cache",
    "grad_clipping",
    "greedy_decode",
    "load_array",
    "load_data_nmt",
    "masked_softmax",
    "predict_seq2seq",
    "predict_seq2seq_batch",
    "preprocess_nmt",
    "read_data_nmt",
    "sequence_mask",
    "show_heatmaps",
    "tokenize_nmt",
    "train_seq2seq",
    "truncate_pad",
    "try_gpu",
    "unavailable_reason",
    "xavier_init_weights",
]
