"""One decoder forward captured in a CUDA graph and replayed, for inference at fixed shapes.

A decoder step loop launches many small kernels; for a fixed batch, source length, target length
and dtype, ``torch.cuda.CUDAGraph`` records them once and replays them with a single launch.
Works with any backend whose forward makes no host synchronisation while the stream is captured
(``triton`` and ``cpp``; the input checks skip their value checks during capture).
"""
import torch

from seq2seq_fast.ops import functional, validation
from seq2seq_fast.ops.dispatch import wants_grad
from seq2seq_fast.ops.state import DecoderState

# Graphs a decoder keeps (one per distinct key); a new key past this drops the oldest.
MAX_GRAPHS = 8


def graph_replay(decoder, X, state):
    """``decoder(X, state)`` replayed from a CUDA graph captured for its shapes on first use
    (``capture_cuda_graph=True``), or None when the call cannot be replayed: not on CUDA, a
    gradient needed, or inside torch.compile or another capture."""
    enc_outputs = state[0] if isinstance(state, (list, tuple)) and len(state) == 3 else None
    if not (
        isinstance(enc_outputs, torch.Tensor) and enc_outputs.is_cuda and isinstance(X, torch.Tensor)
        and not torch.compiler.is_compiling() and not torch.cuda.is_current_stream_capturing()
        and not wants_grad(enc_outputs, state[1], module=decoder)
    ):
        return None
    enc_outputs, hidden, valid_lens = functional.unpack_state(state)
    lens = validation.normalize_lengths(valid_lens, "enc_valid_lens (state[2])")
    functional.check_decoder_inputs(decoder, X, enc_outputs, hidden, lens)
    graph = cached_graph(decoder._graphs, graph_key(decoder, X, enc_outputs, valid_lens),
                         lambda: CUDAGraphDecoder(decoder, X, list(state), validate=False))
    Y, new_state = graph(X, list(state))
    decoder._attention_weights = graph.attention_weights
    return Y, new_state


def graph_key(decoder, X, enc_outputs, valid_lens):
    """What a capture of ``decoder(X, [enc_outputs, ., valid_lens])`` depends on: the shapes and
    dtypes of every input (a graph copies new inputs into static buffers that keep the captured
    dtype: int32 ids or lengths must not replay a graph captured with int64 ones), the device,
    the mode, and the parameters' addresses (moved or replaced parameters make it stale)."""
    return (tuple(X.shape), X.dtype, tuple(enc_outputs.shape), enc_outputs.dtype, enc_outputs.device,
            None if valid_lens is None else (tuple(valid_lens.shape), valid_lens.dtype), decoder.training,
            tuple(p.data_ptr() for p in decoder.parameters()))


def cached_graph(graphs, key, capture):
    """``graphs[key]``, captured by ``capture()`` on first use; past MAX_GRAPHS entries the
    oldest is dropped (each graph holds device memory)."""
    graph = graphs.get(key)
    if graph is None:
        if len(graphs) >= MAX_GRAPHS:
            del graphs[next(iter(graphs))]
        graph = graphs[key] = capture()
    return graph


class CUDAGraphDecoder:
    """``decoder(X, state)`` captured for the shapes of ``example_X`` and ``example_state``.

    ``example_X`` int64 (B, S) token ids and ``example_state`` = ``[enc_outputs (B, T, H),
    hidden_state (L, B, H), enc_valid_lens (None or (B,))]`` (what ``decoder.init_state``
    returns), all on one CUDA device. Each call copies its inputs into the graph's static buffers
    and replays the graph; it runs under ``torch.no_grad()`` (no autograd: inference only), with
    the decoder's current weights (updated in place, they are seen by the next replay) and mode
    (dropout in training mode draws fresh masks at each replay). ``warmup`` eager calls on a side
    stream precede the capture (cuBLAS and Triton initialise there). With ``validate`` (default)
    each call checks the token ids (one host sync); without it, ids out of range are undefined
    behaviour. Outputs are fresh tensors unless ``copy_outputs=False``, in which case they are
    the static buffers that the next call overwrites.

    >>> graph = CUDAGraphDecoder(decoder, X, state)      # doctest: +SKIP
    >>> Y, new_state = graph(X2, state2)                  # same shapes as X and state
    >>> torch.testing.assert_close(Y, decoder(X2, state2)[0])
    """

    def __init__(self, decoder, example_X, example_state, *, warmup=2, validate=True, copy_outputs=True):
        enc_outputs, hidden, valid_lens = self._unpack(example_state)
        validation.check_tokens(example_X, "example_X", decoder.embedding.num_embeddings)
        if not (example_X.is_cuda and enc_outputs.is_cuda and hidden.is_cuda):
            raise ValueError(
                "CUDAGraphDecoder needs CUDA tensors, got example_X on "
                f"{example_X.device}, enc_outputs on {enc_outputs.device}, hidden_state on {hidden.device}"
            )
        validation.check_int(warmup, "warmup", minimum=1)
        self.decoder = decoder
        self.validate = bool(validate)
        self.copy_outputs = bool(copy_outputs)
        self._X = example_X.detach().clone()
        self._enc = enc_outputs.detach().clone()
        self._hidden = hidden.detach().clone()
        self._lens = None if valid_lens is None else valid_lens.detach().clone()
        static_state = [self._enc, self._hidden, self._lens]

        # Record the eager forward: a decoder built with capture_cuda_graph=True would otherwise
        # try to replay from inside its own capture.
        run = getattr(decoder, "forward_eager", decoder)
        side = torch.cuda.Stream(device=self._X.device)
        side.wait_stream(torch.cuda.current_stream(self._X.device))
        with torch.no_grad(), torch.cuda.stream(side):
            for _ in range(warmup):
                run(self._X, static_state)
        torch.cuda.current_stream(self._X.device).wait_stream(side)

        self.graph = torch.cuda.CUDAGraph()
        with torch.no_grad(), torch.cuda.graph(self.graph):
            Y, state = run(self._X, static_state)
        self._Y = Y
        self._hidden_out = state[1]
        self._attention = list(decoder.attention_weights)

    @staticmethod
    def _unpack(state):
        if not isinstance(state, (list, tuple)) or len(state) != 3:
            raise TypeError(
                "state must be [enc_outputs, hidden_state, enc_valid_lens] as decoder.init_state returns, "
                f"got {type(state).__name__}"
            )
        enc_outputs, hidden, valid_lens = state
        validation.check_floating(enc_outputs, "enc_outputs (state[0])", ndim=3)
        validation.check_floating(hidden, "hidden_state (state[1])", ndim=3)
        if valid_lens is not None:
            validation.check_tensor(valid_lens, "enc_valid_lens (state[2])")
        return enc_outputs, hidden, valid_lens

    def _load(self, name, static, value):
        if value is None or static is None:
            if value is not static:
                raise ValueError(
                    f"{name} must be {'None' if static is None else 'a tensor'} as in the captured call, "
                    f"got {'None' if value is None else type(value).__name__}"
                )
            return
        if value.shape != static.shape or value.dtype != static.dtype or value.device != static.device:
            raise ValueError(
                f"{name} must match the captured call: shape {tuple(static.shape)}, dtype {static.dtype}, "
                f"device {static.device}; got shape {tuple(value.shape)}, dtype {value.dtype}, device {value.device}"
            )
        static.copy_(value)

    def __call__(self, X, state):
        """``decoder(X, state)`` by replay: (logits (B, S, V), new state), as the decoder returns."""
        enc_outputs, hidden, valid_lens = self._unpack(state)
        if self.validate:
            validation.check_tokens(X, "X", self.decoder.embedding.num_embeddings)
        self._load("X", self._X, X)
        self._load("enc_outputs (state[0])", self._enc, enc_outputs)
        self._load("hidden_state (state[1])", self._hidden, hidden)
        self._load("enc_valid_lens (state[2])", self._lens, valid_lens)
        self.graph.replay()
        Y, hidden_out = self._Y, self._hidden_out
        if self.copy_outputs:
            Y, hidden_out = Y.clone(), hidden_out.clone()
        return Y, DecoderState([enc_outputs, hidden_out, valid_lens])

    @property
    def attention_weights(self):
        """The last replay's attention weights: S tensors (B, 1, T) (copies unless copy_outputs=False)."""
        if self.copy_outputs:
            return [a.clone() for a in self._attention]
        return list(self._attention)
