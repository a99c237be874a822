"""The benchmarked workloads, built once per (config, implementation) with inputs made up front.

Implementations: ``reference`` (d2l's modules, eager), ``reference+compile`` (the same under
``torch.compile``, what a user would try first), each backend of seq2seq_fast by name, and
``<backend>+graph``: that backend's decoder with ``capture_cuda_graph=True`` (CUDA inference).
"""
import torch

import seq2seq_fast as sf
from seq2seq_fast import reference as R

BOS, EOS = 1, 2


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


def decoder_forward(model, cfg, data):
    """The decoder alone, eval mode, no grad, teacher-forced over all target steps."""
    model.eval()
    decoder = model.decoder
    state = list(decoder.init_state((data["enc_outputs"], data["hidden"]), data["src_len"]))

    def run():
        with torch.no_grad():
            # A fresh plain list: no key projection carried over from the previous call.
            return decoder(data["tgt"], list(state))[0]

    return run


def train_step(model, cfg, data, loss):
    """Encoder + decoder forward in training mode, d2l's masked loss, backward."""
    model.train()
    bos = torch.full((cfg.batch, 1), BOS, dtype=torch.long, device=data["tgt"].device)
    dec_input = torch.cat([bos, data["tgt"][:, :-1]], dim=1)
    params = [p for p in model.parameters()]

    def run():
        for p in params:
            p.grad = None
        Y_hat, _ = model(data["src"], dec_input, data["src_len"])
        loss(Y_hat, data["tgt"], data["tgt_len"]).sum().backward()

    return run


def reference_greedy(model, cfg, data):
    """The reference decoder run on the whole batch one step at a time until every row has
    produced eos (or ``tgt_steps`` steps)."""
    model.eval()
    decoder, encoder = model.decoder, model.encoder

    def run():
        with torch.no_grad():
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


def greedy(model, cfg, data):
    model.eval()

    def run():
        return sf.greedy_decode(model, data["src"], data["src_len"], bos=BOS, eos=EOS, max_len=cfg.tgt_steps)

    return run


def build(workload, impl, reference, cfg, data):
    """A zero-argument callable running ``workload`` with implementation ``impl``."""
    model = make_model(impl, reference, cfg)
    is_reference = impl.startswith("reference")
    if workload == "decoder_forward":
        return decoder_forward(model, cfg, data)
    if workload == "train_step":
        loss = R.MaskedSoftmaxCELoss() if is_reference else sf.MaskedSoftmaxCELoss()
        return train_step(model, cfg, data, loss)
    if workload == "greedy_decode":
        return (reference_greedy if is_reference else greedy)(model, cfg, data)
    raise ValueError(f"unknown workload {workload!r}")


def _gru_flops(batch, steps, in_size, hidden, layers):
    total = 0
    for layer in range(layers):
        total += 3 * hidden * ((in_size if layer == 0 else hidden) + hidden)
    return 2 * steps * batch * total


def decoder_flops(cfg, steps):
    """FLOPs of the hoisted algorithm: key projection once, then per step W_q, the GRU, the
    score and context, and dense."""
    B, T, H, V = cfg.batch, cfg.src_steps, cfg.hidden, cfg.vocab
    per_step = H * H + 2 * T * H + H * V
    return 2 * (B * T * H * H + steps * B * per_step) + _gru_flops(B, steps, cfg.embed + H, H, cfg.layers)


def encoder_flops(cfg):
    return _gru_flops(cfg.batch, cfg.src_steps, cfg.embed, cfg.hidden, cfg.layers)


def workload_flops(workload, cfg):
    if workload == "decoder_forward":
        return decoder_flops(cfg, cfg.tgt_steps)
    if workload == "train_step":  # backward costs about twice the forward
        return 3 * (encoder_flops(cfg) + decoder_flops(cfg, cfg.tgt_steps))
    return encoder_flops(cfg) + decoder_flops(cfg, cfg.tgt_steps)


def weight_bytes(reference):
    return sum(p.numel() * p.element_size() for p in reference.parameters())
