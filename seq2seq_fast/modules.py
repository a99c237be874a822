"""Drop-in replacements of d2l's encoder-decoder classes: same names, constructor signatures,
submodules and ``state_dict`` keys, so weights load both ways; the work goes to a backend."""
import torch
import torch.nn.functional as F
from torch import nn

from seq2seq_fast import backend_cpp
from seq2seq_fast import validation as V
from seq2seq_fast.attention import AdditiveAttention
from seq2seq_fast.backends import check_backend_name, select_backend, wants_grad
from seq2seq_fast.state import DecoderState, projected_keys


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
        embedding = self._modules["embedding"]  # = self.embedding, without nn.Module.__getattr__
        V.check_tokens(X, "X", embedding.num_embeddings)
        weight = embedding.weight
        V.check_same_device("embedding.weight", weight, "X", X)
        backend = select_backend(self.backend, "encoder_forward", weight, wants_grad(module=self))
        return backend.encoder_forward(self, X)


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
        V.check_floating(outputs, "enc_outputs[0]", ndim=3)
        return DecoderState([outputs.permute(1, 0, 2), hidden_state, enc_valid_lens])

    def check_state(self, state, batch=None):
        """Validated ``(enc_outputs, hidden, valid_lens as int64 (B,) or None)`` of ``state``."""
        if not isinstance(state, (list, tuple)) or len(state) != 3:
            raise TypeError(
                "state must be [enc_outputs, hidden_state, enc_valid_lens] as init_state returns, "
                f"got {type(state).__name__}" + (f" of length {len(state)}" if isinstance(state, (list, tuple)) else "")
            )
        enc_outputs, hidden, valid_lens = state
        # Submodules straight from _modules: self.rnn goes through nn.Module.__getattr__ (0.8 µs).
        rnn = self._modules["rnn"]
        H, L = rnn.hidden_size, rnn.num_layers
        V.check_floating(enc_outputs, "enc_outputs (state[0])", ndim=3)
        V.check_floating(hidden, "hidden_state (state[1])", ndim=3)
        B, T, He = enc_outputs.shape
        if He != H or T == 0 or B == 0:
            raise ValueError(
                f"enc_outputs (state[0]) must have shape (B >= 1, T >= 1, {H}), got {tuple(enc_outputs.shape)}"
            )
        if hidden.shape != (L, B, H):
            raise ValueError(
                f"hidden_state (state[1]) must have shape (num_layers={L}, B={B}, {H}), got {tuple(hidden.shape)}"
            )
        if batch is not None and batch != B:
            raise ValueError(f"X must have the state's batch size {B}, got {batch} rows")
        weight = self._modules["dense"].weight
        for name, tensor in (("enc_outputs (state[0])", enc_outputs), ("hidden_state (state[1])", hidden)):
            V.check_same_device("the decoder's parameters", weight, name, tensor)
            if tensor.dtype != weight.dtype:
                raise TypeError(f"{name} must have the parameters' dtype {weight.dtype}, got {tensor.dtype}")
        lens = V.normalize_valid_lens(valid_lens, "enc_valid_lens (state[2])", B, queries=1)
        if lens is not None:
            V.check_same_device("enc_outputs (state[0])", enc_outputs, "enc_valid_lens (state[2])", lens)
            if lens.dim() != 1:
                lens = lens.reshape(B)
        return enc_outputs, hidden, lens

    def prepare(self, X, state):
        """Checks one call and picks its backend: ``(backend, values, hidden, valid_lens, key_proj,
        cache)``, where ``values`` is ``state[0]`` laid out contiguously as (B, T, H) (what the
        backends read) and ``key_proj = W_k(values)``."""
        submodules = self._modules  # self.embedding etc. without nn.Module.__getattr__
        V.check_tokens(X, "X", submodules["embedding"].num_embeddings)
        enc_outputs, hidden, lens = self.check_state(state, batch=X.shape[0])
        V.check_same_device("enc_outputs (state[0])", enc_outputs, "X", X)
        needs_grad = wants_grad(enc_outputs, hidden, module=self)
        backend = select_backend(self.backend, "decoder_forward", enc_outputs, needs_grad)
        values, key_proj, cache = projected_keys(state, enc_outputs, submodules["attention"]._modules["W_k"])
        return backend, values, hidden, lens, key_proj, cache

    def forward(self, X, state):
        if self.capture_cuda_graph and self._graphable(X, state):
            return self._replay(X, state)
        return self.forward_eager(X, state)

    def _graphable(self, X, state):
        enc_outputs = state[0] if isinstance(state, (list, tuple)) and len(state) == 3 else None
        return (
            isinstance(enc_outputs, torch.Tensor) and enc_outputs.is_cuda and isinstance(X, torch.Tensor)
            and not torch.compiler.is_compiling() and not torch.cuda.is_current_stream_capturing()
            and not wants_grad(enc_outputs, state[1], module=self)
        )

    def _replay(self, X, state):
        """The call replayed from a CUDA graph captured for its shapes (captured on first use)."""
        from seq2seq_fast.cuda_graph import CUDAGraphDecoder

        V.check_tokens(X, "X", self.embedding.num_embeddings)
        enc_outputs, hidden, valid_lens = self.check_state(state, batch=X.shape[0])
        # Parameters moved or replaced (e.g. by .to()) make a captured graph stale: their
        # addresses are part of the key.
        key = (tuple(X.shape), tuple(enc_outputs.shape), enc_outputs.dtype, enc_outputs.device,
               None if valid_lens is None else tuple(state[2].shape), self.training,
               tuple(p.data_ptr() for p in self.parameters()))
        graph = self._graphs.get(key)
        if graph is None:
            graph = self._graphs[key] = CUDAGraphDecoder(self, X, list(state), validate=False)
        Y, new_state = graph(X, list(state))
        self._attention_weights = graph.attention_weights
        return Y, new_state

    def forward_eager(self, X, state):
        """``forward`` without CUDA-graph replay (what a captured graph records)."""
        backend, values, hidden, lens, key_proj, cache = self.prepare(X, state)
        Y, hidden_n, attention = backend.decoder_forward(self, X, values, hidden, lens, key_proj)
        # d2l's list of S views (B, 1, T) is built on first read of attention_weights (most
        # calls never read it), except when the weights need a gradient: their views must be
        # made in this call's grad mode. One attribute: nn.Module.__setattr__ costs 1.4 µs.
        self._attention_weights = list(attention.unsqueeze(2).unbind(1)) if attention.requires_grad else attention
        return Y, DecoderState([state[0], hidden_n, state[2]], cache)

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
        return {**state, "_attention_weights": [], "_graphs": {}}  # graphs hold device memory


_POSITIONS = {}  # (steps, device) -> arange(steps), made once rather than on every loss call


def _positions(steps, device):
    """``torch.arange(steps, device=device)`` (int64), cached except while torch.compile traces or
    a CUDA graph is captured (a captured arange holds its values only once the graph replays)."""
    if torch.compiler.is_compiling() or (device.type == "cuda" and torch.cuda.is_current_stream_capturing()):
        return torch.arange(steps, device=device)
    key = (steps, device)
    positions = _POSITIONS.get(key)
    if positions is None:
        if len(_POSITIONS) >= 64:  # many distinct lengths: keep the cache small
            _POSITIONS.clear()
        positions = _POSITIONS[key] = torch.arange(steps, device=device)
    return positions


class MaskedSoftmaxCELoss(nn.CrossEntropyLoss):
    """Softmax cross-entropy per sequence, averaged over all S steps with the steps past
    ``valid_len`` weighted 0, as d2l: ``forward(pred (B, S, V), label (B, S), valid_len (B,))``
    returns (B,).

    >>> MaskedSoftmaxCELoss()(torch.ones(3, 4, 10), torch.ones((3, 4), dtype=torch.long), torch.tensor([4, 2, 0]))
    tensor([2.3026, 1.1513, 0.0000])
    """

    def forward(self, pred, label, valid_len):
        V.check_floating(pred, "pred", ndim=3)
        B, S, vocab = pred.shape
        V.check_tokens(label, "label", vocab)
        if tuple(label.shape) != (B, S):
            raise ValueError(f"label must have shape (B, S) = {(B, S)}, got {tuple(label.shape)}")
        lens = V.normalize_valid_lens(valid_len, "valid_len", B)
        V.check_same_device("pred", pred, "label", label)
        V.check_same_device("pred", pred, "valid_len", lens)
        if backend_cpp.loss_unsupported_reason(pred, self) is None:  # one fused pass on CPU
            return backend_cpp.masked_ce_loss(pred, label.long(), lens)
        kept = _positions(S, pred.device) < lens.unsqueeze(1)
        # Softmax over contiguous rows of V (d2l's (B, V, S) layout strides every row): take
        # the rows in the order pred is stored, step-major when it is a view of (S, B, V).
        step_major = not pred.is_contiguous() and pred.transpose(0, 1).is_contiguous()
        rows = pred.transpose(0, 1) if step_major else pred
        targets = label.t() if step_major else label
        loss = F.cross_entropy(
            rows.reshape(-1, vocab), targets.reshape(-1), weight=self.weight, reduction="none",
            ignore_index=self.ignore_index, label_smoothing=self.label_smoothing,
        ).view(targets.shape)
        if step_major:
            loss = loss.t()
        return (loss * kept).mean(dim=1)
