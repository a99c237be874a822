"""Drop-in replacements of d2l's encoder-decoder classes: same names, constructor signatures,
submodules and ``state_dict`` keys, so weights load both ways; the work goes to a backend."""
import torch
from torch import nn

from seq2seq_fast.modules.attention import AdditiveAttention
from seq2seq_fast.modules.cuda_graph import graph_replay
from seq2seq_fast.modules.loss import MaskedSoftmaxCELoss
from seq2seq_fast.ops import call_plan, functional, validation
from seq2seq_fast.ops.dispatch import check_backend_name
from seq2seq_fast.ops.state import DecoderState


_LOSS = MaskedSoftmaxCELoss()  # stateless: the loss of EncoderDecoder.masked_ce_loss


class Encoder(nn.Module):
    """The base encoder interface of the encoder-decoder architecture."""

    def forward(self, X, *args):
        raise NotImplementedError


class Decoder(nn.Module):
    """The base decoder interface of the encoder-decoder architecture."""

    def init_state(self, enc_outputs, *args):
        raise NotImplementedError

    def forward(self, X, state):
        raise NotImplementedError


class AttentionDecoder(Decoder):
    """The base interface of decoders with attention."""

    @property
    def attention_weights(self):
        raise NotImplementedError


class EncoderDecoder(nn.Module):
    """The encoder-decoder: ``forward(enc_X, dec_X, *args)`` encodes, initialises the decoder
    state with ``*args`` (the source valid lengths) and decodes ``dec_X``."""

    def __init__(self, encoder, decoder, **kwargs):
        super().__init__(**kwargs)
        self.encoder = encoder
        self.decoder = decoder

    def forward(self, enc_X, dec_X, *args):
        enc_outputs = self.encoder(enc_X, *args)
        dec_state = self.decoder.init_state(enc_outputs, *args)
        return self.decoder(dec_X, dec_state)

    def masked_ce_loss(self, enc_X, dec_X, label, valid_len, *args):
        """d2l's ``MaskedSoftmaxCELoss()(self(enc_X, dec_X, *args)[0], label, valid_len)``, the
        loss (B,) of a training step; with this package's decoder on the cpp backend its output
        layer and the loss run fused, without the (B, S, V) logits (what ``Seq2SeqTrainer`` uses).

        >>> net.masked_ce_loss(X, dec_input, Y, Y_valid_len, X_valid_len).sum().backward()
        """
        enc_outputs = self.encoder(enc_X, *args)
        dec_state = self.decoder.init_state(enc_outputs, *args)
        if isinstance(self.decoder, Seq2SeqAttentionDecoder):
            return functional.decoder_masked_ce_loss(self.decoder, dec_X, dec_state, label, valid_len, _LOSS)
        return _LOSS(self.decoder(dec_X, dec_state)[0], label, valid_len)

    def masked_ce_loss_backward(self, enc_X, dec_X, label, valid_len, *args):
        """``l = self.masked_ce_loss(enc_X, dec_X, label, valid_len, *args); l.sum().backward()``:
        the gradients accumulated into the parameters' ``.grad``; returns ``l`` detached. With this
        package's encoder and decoder on the cpp backend the compiled ops run the whole step,
        forward and backward, without autograd's graph (``functional.masked_ce_loss_grads``: the
        same numbers; a d2l zh step 12-17 % shorter). What ``Seq2SeqTrainer`` runs.

        >>> optimizer.zero_grad(); net.masked_ce_loss_backward(X, dec_input, Y, Y_valid_len, X_valid_len)
        """
        fused = None
        if len(args) <= 1 and self._runs_own_step():
            fused = functional.masked_ce_loss_grads(self, self.encoder, self.decoder, enc_X, dec_X, label, valid_len,
                                                    args[0] if args else None)
        if fused is None:
            loss = self.masked_ce_loss(enc_X, dec_X, label, valid_len, *args)
            loss.sum().backward()
            return loss.detach()
        loss, grads = fused
        for parameter, grad in grads:
            if parameter.grad is None:
                parameter.grad = grad
            else:
                parameter.grad.add_(grad)
        return loss

    def _runs_own_step(self):
        """Whether ``masked_ce_loss`` would run this package's encoder and decoder as they are."""
        encoder, decoder = type(self.encoder), type(self.decoder)
        return (type(self).forward is EncoderDecoder.forward
                and type(self).masked_ce_loss is EncoderDecoder.masked_ce_loss
                and issubclass(encoder, Seq2SeqEncoder) and encoder.forward is Seq2SeqEncoder.forward
                and issubclass(decoder, Seq2SeqAttentionDecoder)
                and decoder.forward is Seq2SeqAttentionDecoder.forward
                and decoder.init_state is Seq2SeqAttentionDecoder.init_state)


class Seq2SeqEncoder(Encoder):
    """d2l's GRU encoder: ``forward(X (B, T) ids) -> (outputs (T, B, H), state (L, B, H))``.

    >>> enc = Seq2SeqEncoder(10, 8, 16, num_layers=2).eval()
    >>> [t.shape for t in enc(torch.zeros(4, 7, dtype=torch.long))]
    [torch.Size([7, 4, 16]), torch.Size([2, 4, 16])]
    """

    def __init__(self, vocab_size, embed_size, num_hiddens, num_layers, dropout=0, *,
                 backend="auto", **kwargs):
        super().__init__(**kwargs)
        check_backend_name(backend)
        self.backend = backend
        self.embedding = nn.Embedding(vocab_size, embed_size)
        self.rnn = nn.GRU(embed_size, num_hiddens, num_layers, dropout=dropout)

    def forward(self, X, *args):
        return functional.encoder_forward(self, X)

class Seq2SeqAttentionDecoder(AttentionDecoder):
    """d2l's GRU decoder with Bahdanau attention, run by a fast backend.

    ``init_state(enc_outputs, enc_valid_lens)`` takes the encoder's ``(outputs (T, B, H),
    state (L, B, H))``; ``forward(X (B, S) ids, state) -> (logits (B, S, vocab), state)`` with
    ``state`` unpacking as ``[enc_outputs (B, T, H), hidden_state (L, B, H), enc_valid_lens]``;
    ``attention_weights`` is a list of S tensors (B, 1, T). ``backend`` is ``"auto"`` (the
    fastest that can run each call), ``"torch"``, ``"triton"`` or ``"cpp"``.
    ``capture_cuda_graph=True`` replays inference calls on CUDA (no gradient needed) from a CUDA
    graph captured once per input shape, removing the launch overhead of the step loop.

    >>> dec = Seq2SeqAttentionDecoder(10, 8, 16, num_layers=2).eval()
    >>> state = dec.init_state((torch.rand(7, 4, 16), torch.rand(2, 4, 16)), torch.tensor([7, 3, 0, 9]))
    >>> dec(torch.zeros(4, 5, dtype=torch.long), state)[0].shape
    torch.Size([4, 5, 10])
    """

    def __init__(self, vocab_size, embed_size, num_hiddens, num_layers, dropout=0, *,
                 backend="auto", capture_cuda_graph=False, **kwargs):
        super().__init__(**kwargs)
        check_backend_name(backend)
        self.backend = backend
        self.capture_cuda_graph = bool(capture_cuda_graph)
        self._graphs = {}
        self.attention = AdditiveAttention(num_hiddens, num_hiddens, num_hiddens, dropout, backend=backend)
        self.embedding = nn.Embedding(vocab_size, embed_size)
        self.rnn = nn.GRU(embed_size + num_hiddens, num_hiddens, num_layers, dropout=dropout)
        self.dense = nn.Linear(num_hiddens, vocab_size)
        self._attention_weights = []  # d2l's list, or the last call's (B, S, T) it is built from

    def init_state(self, enc_outputs, enc_valid_lens, *args):
        if not isinstance(enc_outputs, (tuple, list)) or len(enc_outputs) != 2:
            raise TypeError(
                "enc_outputs must be the encoder's (outputs (T, B, H), state (L, B, H)), "
                f"got {type(enc_outputs).__name__}"
            )
        outputs, hidden_state = enc_outputs
        validation.check_floating(outputs, "enc_outputs[0]", ndim=3)
        return DecoderState([outputs.permute(1, 0, 2), hidden_state, enc_valid_lens])

    # Step-by-step decoding repeats one kind of call: the last call's plan runs the next ones in
    # one function, without nn.Module.__call__'s frames and the long path's (ops/call_plan.py).
    __call__ = call_plan.planned_call
    _call_plan = None  # the plan of the next calls like the last one, or None

    def forward(self, X, state):
        if self.capture_cuda_graph:
            replayed = graph_replay(self, X, state)
            if replayed is not None:
                return replayed
        # A plan skips forward: only for a class that keeps this forward and the planned __call__.
        cls = type(self)
        plannable = cls.forward is Seq2SeqAttentionDecoder.forward and cls.__call__ is call_plan.planned_call
        return functional.decoder_forward(self, X, state, plan=plannable)

    def forward_eager(self, X, state):
        """``forward`` without CUDA-graph replay (what a captured graph records)."""
        return functional.decoder_forward(self, X, state)

    @property
    def attention_weights(self):
        """The last call's attention weights, d2l's list of S tensors (B, 1, T)."""
        weights = self._attention_weights
        if isinstance(weights, torch.Tensor):
            weights = self._attention_weights = list(weights.unsqueeze(2).unbind(1))
        return weights

    def __getstate__(self):
        # The last call's attention weights may belong to an autograd graph, which cannot be
        # copied or pickled; they are a by-product of a call, not part of the module.
        state = super().__getstate__()
        # Graphs hold device memory; a plan holds the submodules it was made for, not a copy's.
        return {**state, "_attention_weights": [], "_graphs": {}, "_call_plan": None}
