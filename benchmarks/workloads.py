"""The benchmarked workloads, built once per (config, implementation) with inputs made up front.

Implementations: ``reference`` (d2l's modules, eager), ``reference+compile`` (the same under
``torch.compile``, what a user would try first), each backend of seq2seq_fast by name, and
``<backend>+graph``: that backend's decoder with ``capture_cuda_graph=True`` (CUDA inference).
With ``autocast`` (a dtype) a workload runs under ``torch.autocast`` in it on the inputs' device;
the training step as torch's AMP recipe does: forward and loss under autocast, backward outside.
"""
import contextlib
from collections import Counter

import torch

import seq2seq_fast as sf
from floor import Gemm, backward_gemms
from seq2seq_fast import reference as R

BOS, EOS = 1, 2

IMPLS = ("reference", "reference+compile", "torch", "cpp", "triton", "cpp+graph", "triton+graph")


def reference_model(cfg, device, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    encoder = R.Seq2SeqEncoder(cfg.vocab, cfg.embed, cfg.hidden, cfg.layers, cfg.dropout)
    decoder = R.Seq2SeqAttentionDecoder(cfg.vocab, cfg.embed, cfg.hidden, cfg.layers, cfg.dropout)
    model = R.EncoderDecoder(encoder, decoder)
    model.apply(R.xavier_init_weights)
    return model.to(device=device, dtype=dtype)


def fast_model(reference, cfg, backend):
    """Our model with the reference's weights, running on ``backend``."""
    encoder = sf.Seq2SeqEncoder(cfg.vocab, cfg.embed, cfg.hidden, cfg.layers, cfg.dropout, backend=backend)
    decoder = sf.Seq2SeqAttentionDecoder(cfg.vocab, cfg.embed, cfg.hidden, cfg.layers, cfg.dropout, backend=backend)
    model = sf.EncoderDecoder(encoder, decoder)
    param = next(reference.parameters())
    model.to(device=param.device, dtype=param.dtype)
    model.load_state_dict(reference.state_dict())
    return model


def make_model(impl, reference, cfg):
    if impl == "reference":
        return reference
    if impl == "reference+compile":
        # Dynamo caches per code object, shared by every compiled copy of d2l's modules: start
        # afresh so earlier configurations do not use up its recompile limit.
        torch._dynamo.reset()
        # Compile the two halves so the decoder can also be called alone, step by step.
        param = next(reference.parameters())
        model = reference_model(cfg, param.device, param.dtype)
        model.load_state_dict(reference.state_dict())
        model.encoder, model.decoder = torch.compile(model.encoder), torch.compile(model.decoder)
        return model
    backend, _, graph = impl.partition("+")
    model = fast_model(reference, cfg, backend)
    model.decoder.capture_cuda_graph = graph == "graph"
    return model


def inputs(cfg, device, dtype=torch.float32, seed=1):
    g = torch.Generator().manual_seed(seed)
    B, T, S, H, L, V = cfg.batch, cfg.src_steps, cfg.tgt_steps, cfg.hidden, cfg.layers, cfg.vocab
    data = dict(
        src=torch.randint(3, V, (B, T), generator=g),
        src_len=torch.randint(1, T + 1, (B,), generator=g),
        tgt=torch.randint(3, V, (B, S), generator=g),
        tgt_len=torch.randint(1, S + 1, (B,), generator=g),
        enc_outputs=torch.randn(T, B, H, generator=g, dtype=dtype),
        hidden=torch.randn(L, B, H, generator=g, dtype=dtype),
    )
    return {k: v.to(device) for k, v in data.items()}


def precision(data, autocast):
    """The context a workload's calls run in: ``torch.autocast`` in dtype ``autocast`` on the
    inputs' device, or none (None)."""
    if autocast is None:
        return contextlib.nullcontext()
    return torch.autocast(data["src"].device.type, dtype=autocast)


def decoder_forward(model, cfg, data, autocast=None):
    """The decoder alone, eval mode, no grad, teacher-forced over all target steps."""
    model.eval()
    decoder = model.decoder
    state = list(decoder.init_state((data["enc_outputs"], data["hidden"]), data["src_len"]))
    context = precision(data, autocast)

    def run():
        with torch.no_grad(), context:
            # A fresh plain list: no key projection carried over from the previous call.
            return decoder(data["tgt"], list(state))[0]

    return run


def train_step(model, cfg, data, loss, autocast=None):
    """Encoder + decoder forward in training mode, d2l's masked loss, backward; under
    ``autocast`` the forward and the loss, not the backward (bfloat16 needs no loss scaling)."""
    model.train()
    bos = torch.full((cfg.batch, 1), BOS, dtype=torch.long, device=data["tgt"].device)
    dec_input = torch.cat([bos, data["tgt"][:, :-1]], dim=1)
    params = [p for p in model.parameters()]
    context = precision(data, autocast)

    def run():
        for p in params:
            p.grad = None
        with context:
            Y_hat, _ = model(data["src"], dec_input, data["src_len"])
            total = loss(Y_hat, data["tgt"], data["tgt_len"]).sum()
        total.backward()

    return run


def reference_greedy(model, cfg, data, autocast=None):
    """The reference decoder run on the whole batch one step at a time until every row has
    produced eos (or ``tgt_steps`` steps)."""
    model.eval()
    decoder, encoder = model.decoder, model.encoder
    context = precision(data, autocast)

    def run():
        with torch.no_grad(), context:
            state = decoder.init_state(encoder(data["src"], data["src_len"]), data["src_len"])
            token = torch.full((cfg.batch, 1), BOS, dtype=torch.long, device=data["src"].device)
            finished = torch.zeros(cfg.batch, dtype=torch.bool, device=token.device)
            out = []
            for _ in range(cfg.tgt_steps):
                Y, state = decoder(token, state)
                token = Y.argmax(dim=2)
                out.append(token)
                finished |= token[:, 0] == EOS
                if bool(finished.all()):
                    break
            return torch.cat(out, dim=1)

    return run


def greedy(model, cfg, data, autocast=None):
    model.eval()
    context = precision(data, autocast)

    def run():
        with context:
            return sf.greedy_decode(model, data["src"], data["src_len"], bos=BOS, eos=EOS, max_len=cfg.tgt_steps)

    return run


def build(workload, impl, reference, cfg, data, autocast=None):
    """A zero-argument callable running ``workload`` with implementation ``impl``, under
    ``torch.autocast`` in dtype ``autocast`` where given."""
    model = make_model(impl, reference, cfg)
    is_reference = impl.startswith("reference")
    if workload == "decoder_forward":
        return decoder_forward(model, cfg, data, autocast)
    if workload == "train_step":
        loss = R.MaskedSoftmaxCELoss() if is_reference else sf.MaskedSoftmaxCELoss()
        return train_step(model, cfg, data, loss, autocast)
    if workload == "greedy_decode":
        return (reference_greedy if is_reference else greedy)(model, cfg, data, autocast)
    raise ValueError(f"unknown workload {workload!r}")


def _per_step(rows, n, k, times=1):
    """A GEMM run ``times`` per step for the step's ``rows`` (M), grouped by M."""
    return [Gemm(m, n, k, count=c * times) for m, c in sorted(Counter(rows).items())]


def _embedding_gates(tokens, cfg, n):
    """Embedding vectors by a weight: one row per token, or a table of the vocabulary's rows
    when that is smaller (the ``cpp`` backend's table)."""
    return Gemm(min(tokens, cfg.vocab), n, cfg.embed)


def encoder_gemms(cfg):
    """The encoder's GRU, layer by layer: each layer's input gates for all steps at once
    (M = T·B), its hidden gates step by step (M = B)."""
    B, T, H = cfg.batch, cfg.src_steps, cfg.hidden
    gemms = [_embedding_gates(T * B, cfg, 3 * H)]
    gemms += [Gemm(T * B, 3 * H, H)] * (cfg.layers - 1)
    return gemms + _per_step([B] * T, 3 * H, H, times=cfg.layers)


def decoder_gemms(cfg, rows, teacher_forced=True):
    """The decoder's GEMMs with the key projection hoisted out of the step loop; ``rows[t]`` is
    the number of batch rows step t computes. Per step: the query projection W_q together with
    the top layer's W_hh (same input, N = H + 3H), the other 2L - 1 gate GEMMs of the GRU, the
    attention score (tanh features by w_v, M = rows·T) and context (weights by values, batched
    over rows). The dense layer runs once over all steps when the targets are given, else step
    by step (its argmax is the next input)."""
    T, H, V = cfg.src_steps, cfg.hidden, cfg.vocab
    tokens = sum(rows)
    gemms = [Gemm(cfg.batch * T, H, H), _embedding_gates(tokens, cfg, 3 * H)]
    gemms += _per_step(rows, 4 * H, H) + _per_step(rows, 3 * H, H, times=2 * cfg.layers - 1)
    for m, c in sorted(Counter(rows).items()):
        gemms += [Gemm(m * T, 1, H, count=c), Gemm(1, H, T, count=c, batch=m)]
    return gemms + ([Gemm(tokens, V, H)] if teacher_forced else _per_step(rows, V, H))


def workload_gemms(workload, cfg, greedy_rows=None):
    """GEMMs of ``workload``: ``greedy_rows`` are the rows each greedy step computes (default:
    the whole batch for ``tgt_steps`` steps; see :func:`greedy_rows`)."""
    full = [cfg.batch] * cfg.tgt_steps
    if workload == "decoder_forward":
        return decoder_gemms(cfg, full)
    if workload == "train_step":
        forward = encoder_gemms(cfg) + decoder_gemms(cfg, full)
        return forward + backward_gemms(forward)
    if workload == "greedy_decode":
        return encoder_gemms(cfg) + decoder_gemms(cfg, greedy_rows or full, teacher_forced=False)
    raise ValueError(f"unknown workload {workload!r}")


def greedy_rows(tokens, eos=EOS):
    """Rows each step of a greedy decoding must compute, from its output ``tokens`` (B, steps):
    a row is done after the step that produced its eos."""
    ended = torch.cumsum(tokens == eos, dim=1) > 0
    done_before = torch.cat([torch.zeros_like(ended[:, :1]), ended[:, :-1]], dim=1)
    return (~done_before).sum(dim=0).tolist()


def workload_bytes(workload, cfg, reference, autocast=None):
    """Bytes ``workload`` must touch at least once: the weights (read; in training also their
    gradients written), the inputs read and the logits written (none in greedy decoding), each
    in the parameters' dtype but the logits under ``autocast``, which come in its dtype."""
    size = next(reference.parameters()).element_size()
    weights = sum(p.numel() for p in reference.parameters()) * size
    B, T, S, H, L, V = cfg.batch, cfg.src_steps, cfg.tgt_steps, cfg.hidden, cfg.layers, cfg.vocab
    logits = S * B * V * (size if autocast is None else torch.empty((), dtype=autocast).element_size())
    if workload == "decoder_forward":
        return weights + (T * B * H + L * B * H) * size + logits
    if workload == "train_step":
        return 2 * weights + logits
    return weights
