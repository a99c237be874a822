"""The ``torch`` backend: the decoder's step loop restructured over ATen ops.

Compared with d2l's loop, per call: the key projection ``W_k · enc`` is done once (and cached
across incremental calls by ``state.projected_keys``), the embedding part of layer 0's input
GEMM runs for all steps at once, ``dense`` runs once over all steps; per step: ``W_q`` and the
top layer's ``W_hh`` share one GEMM on the previous top state, and the GRU gates take three
element-wise ops. Autograd is PyTorch's.
"""
import torch
import torch.nn.functional as F

NAME = "torch"
# Whether this backend's ops check their own arguments (else ops.functional checks them first).
CHECKS_INPUTS = False

_HALF = (torch.float16, torch.bfloat16)
# d2l's fill value for masked scores.
MASK_VALUE = -1e6


def unsupported_reason(device_type, dtype, grad_mode):
    return None


def key_mask(valid_lens, num_keys):
    """Bool mask of the keys to hide, (B, T) or (B, Q, T), from int64 ``valid_lens`` (B,) or
    (B, Q); None if there are no lengths."""
    if valid_lens is None:
        return None
    positions = torch.arange(num_keys, device=valid_lens.device)
    return positions >= valid_lens.unsqueeze(-1)


def masked_softmax_scores(scores, mask):
    """d2l's masked softmax: hidden keys get the score -1e6 (a fully hidden row is uniform).

    Half-precision scores are filled and normalised in float32, where -1e6 does not overflow.
    """
    work = scores.float() if scores.dtype in _HALF else scores
    if mask is not None:
        if mask.dim() < work.dim():  # one length per batch row, shared by its queries
            mask = mask.unsqueeze(-2)
        work = work.masked_fill(mask, MASK_VALUE)
    return torch.softmax(work, dim=-1).to(scores.dtype)


def attend_torch(q_proj, key_proj, values, w_v, valid_lens, dropout_p, training, mask=None):
    """One additive-attention query per batch row.

    q_proj (B, H), key_proj (B, T, H), values (B, T, Dv), w_v (H,), valid_lens None or int64 (B,).
    Returns (context (B, Dv) from the dropped-out weights, weights (B, T) before dropout).
    ``mask`` may pass ``key_mask(valid_lens, T)`` precomputed by a loop that calls this per step.
    """
    if mask is None:
        mask = key_mask(valid_lens, key_proj.shape[1])
    scores = torch.tanh(key_proj + q_proj.unsqueeze(1)) @ w_v
    weights = masked_softmax_scores(scores, mask)
    dropped = F.dropout(weights, dropout_p, training) if dropout_p > 0 else weights
    context = torch.bmm(dropped.unsqueeze(1), values).squeeze(1)
    return context, weights


def attention_forward(attention, queries, keys, values, valid_lens):
    """d2l's AdditiveAttention forward: (context (B, Q, Dv), weights (B, Q, T))."""
    q_proj, k_proj = attention.W_q(queries), attention.W_k(keys)
    w_v = attention.w_v.weight.reshape(-1)
    scores = torch.tanh(q_proj.unsqueeze(2) + k_proj.unsqueeze(1)) @ w_v
    weights = masked_softmax_scores(scores, key_mask(valid_lens, keys.shape[1]))
    p = attention.dropout.p
    dropped = F.dropout(weights, p, attention.training) if p > 0 else weights
    return torch.bmm(dropped, values), weights


def gru_layers(rnn):
    """[(w_ih, w_hh, b_ih, b_hh)] per layer of an ``nn.GRU`` (biases may be None)."""
    return [
        tuple(getattr(rnn, f"{kind}_l{k}", None) for kind in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"))
        for k in range(rnn.num_layers)
    ]


def gru_cell(gi, gh, h):
    """One GRU update from input and hidden gate pre-activations (B, 3H), gate order r, z, n."""
    H = h.shape[-1]
    gi_rz, gi_n = gi.split((2 * H, H), dim=1)
    gh_rz, gh_n = gh.split((2 * H, H), dim=1)
    r, z = torch.sigmoid(gi_rz + gh_rz).chunk(2, dim=1)
    return torch.lerp(torch.tanh(torch.addcmul(gi_n, r, gh_n)), h, z)


class StepWeights:
    """The decoder's weights regrouped for the restructured step, once per call.

    ``w_top`` stacks W_q over the top layer's W_hh (both read the previous top state, so one
    GEMM serves both); ``w_ctx0`` is the context part of layer 0's input weight; the embedding
    part is applied outside the loop (``embedded_gates``).
    """

    def __init__(self, decoder):
        rnn = decoder.rnn
        self.H = H = rnn.hidden_size
        self.layers = gru_layers(rnn)
        self.rnn_dropout = rnn.dropout
        self.attn_dropout = decoder.attention.dropout.p
        self.training = decoder.training
        self.w_v = decoder.attention.w_v.weight.reshape(-1)
        w_ih0, _, b_ih0, _ = self.layers[0]
        self.w_ctx0, self.w_emb0, self.b_ih0 = w_ih0[:, :H], w_ih0[:, H:], b_ih0
        _, w_hh_top, _, b_hh_top = self.layers[-1]
        self.w_top = torch.cat([decoder.attention.W_q.weight, w_hh_top])
        self.b_top = None if b_hh_top is None else torch.cat([b_hh_top.new_zeros(H), b_hh_top])

    def embedded_gates(self, embedding, X):
        """Layer 0's input gates from the embedding, for all of X (B, S) at once: (S, B, 3H).

        When the vocabulary is smaller than the number of tokens, project the whole embedding
        table once and gather rows instead of projecting every token.
        """
        if embedding.num_embeddings < X.numel():
            table = F.linear(embedding.weight, self.w_emb0, self.b_ih0)
            return table[X.t()]
        return F.linear(embedding(X).transpose(0, 1), self.w_emb0, self.b_ih0)

    def step(self, states, gates_emb, key_proj, values, valid_lens, attend):
        """One decoder step: updates ``states`` (list of (B, H), one per layer) in place and
        returns the step's attention weights (B, T)."""
        H, L = self.H, len(self.layers)
        q_proj, gh_top = F.linear(states[-1], self.w_top, self.b_top).split((H, 3 * H), dim=1)
        context, weights = attend(q_proj, key_proj, values, self.w_v, valid_lens, self.attn_dropout, self.training)
        layer_input = None
        for k, (w_ih, w_hh, b_ih, b_hh) in enumerate(self.layers):
            if k == 0:
                gi = torch.addmm(gates_emb, context, self.w_ctx0.t())
            else:
                gi = F.linear(layer_input, w_ih, b_ih)
            gh = gh_top if k == L - 1 else F.linear(states[k], w_hh, b_hh)
            states[k] = gru_cell(gi, gh, states[k])
            if k < L - 1:
                layer_input = states[k]
                if self.training and self.rnn_dropout > 0:
                    layer_input = F.dropout(layer_input, self.rnn_dropout, True)
        return weights


def decoder_loop(decoder, X, enc_outputs, hidden, valid_lens, key_proj, attend):
    """Teacher-forced decoder steps with ``attend`` as the attention of one step.

    X int64 (B, S); enc_outputs (B, T, H); hidden (L, B, H); valid_lens None or int64 (B,);
    key_proj (B, T, H) = W_k(enc_outputs). ``attend(q_proj, key_proj, values, w_v, valid_lens,
    dropout_p, training)`` returns (context (B, H), weights (B, T)).
    Returns (logits (B, S, V), final hidden (L, B, H), attention weights (B, S, T)).
    """
    B, S = X.shape
    if S == 0:
        H, T = hidden.shape[-1], enc_outputs.shape[1]
        return decoder.dense(enc_outputs.new_zeros(B, 0, H)), hidden, enc_outputs.new_zeros(B, 0, T)
    weights = StepWeights(decoder)
    gates_emb = weights.embedded_gates(decoder.embedding, X)
    states = list(hidden.unbind(0))
    tops, attention = [], []
    for t in range(S):
        attention.append(weights.step(states, gates_emb[t], key_proj, enc_outputs, valid_lens, attend))
        tops.append(states[-1])
    logits = decoder.dense(torch.stack(tops, dim=1))
    return logits, torch.stack(states), torch.stack(attention, dim=1)


def _attend_with_mask(mask):
    def attend(q_proj, key_proj, values, w_v, valid_lens, dropout_p, training):
        return attend_torch(q_proj, key_proj, values, w_v, valid_lens, dropout_p, training, mask=mask)

    return attend


def decoder_forward(decoder, X, enc_outputs, hidden, valid_lens, key_proj):
    """The ``torch`` backend of ``Seq2SeqAttentionDecoder.forward`` (see ``decoder_loop``)."""
    mask = key_mask(valid_lens, enc_outputs.shape[1])
    return decoder_loop(decoder, X, enc_outputs, hidden, valid_lens, key_proj, _attend_with_mask(mask))


def greedy_loop(decoder, enc_outputs, hidden, valid_lens, key_proj, *, bos, eos, max_len, return_attention):
    """Greedy decoding with the step of ``decoder_loop``, the weights regrouped once for all
    steps and layer 0's embedding gates looked up from a projected table."""
    B = enc_outputs.shape[0]
    weights = StepWeights(decoder)
    table = F.linear(decoder.embedding.weight, weights.w_emb0, weights.b_ih0)  # (V, 3H)
    attend = _attend_with_mask(key_mask(valid_lens, enc_outputs.shape[1]))
    states = list(hidden.unbind(0))
    token = torch.full((B,), bos, dtype=torch.long, device=enc_outputs.device)
    finished = torch.zeros(B, dtype=torch.bool, device=enc_outputs.device)
    tokens, attention = [], []
    for _ in range(max_len):
        step_weights = weights.step(states, table[token], key_proj, enc_outputs, valid_lens, attend)
        token = decoder.dense(states[-1]).argmax(dim=1)
        tokens.append(token)
        if return_attention:
            attention.append(step_weights)
        finished |= token == eos
        if bool(finished.all()):
            break
    result, lengths = finish_rows(torch.stack(tokens, dim=1), eos)
    return result, lengths, torch.stack(attention, dim=1) if return_attention else None


def encoder_forward(encoder, X):
    """d2l's encoder: embedding, then ``nn.GRU`` over (T, B, E) (cuDNN / MKL do this well)."""
    return encoder.rnn(encoder.embedding(X).transpose(0, 1))

def finish_rows(tokens, eos):
    """``tokens`` (B, steps) with eos after each row's first eos, and the lengths before it."""
    is_eos = tokens == eos
    ended = is_eos.cumsum(dim=1) > 0
    steps = tokens.shape[1]
    lengths = torch.where(is_eos.any(dim=1), is_eos.int().argmax(dim=1), torch.full_like(tokens[:, 0], steps))
    return tokens.masked_fill(ended, eos), lengths.to(torch.int64)


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


def masked_ce_loss(options, pred, label, valid_len):
    """d2l's masked softmax cross-entropy (B,) by ATen's ``cross_entropy``, with the class weights,
    label smoothing and ignored class of ``options`` (the ``nn.CrossEntropyLoss`` module):
    pred (B, S, V), label (B, S), valid_len int64 (B,)."""
    B, S, vocab = pred.shape
    kept = _positions(S, pred.device) < valid_len.unsqueeze(1)
    # Softmax over contiguous rows of V (d2l's (B, V, S) layout strides every row): take
    # the rows in the order pred is stored, step-major when it is a view of (S, B, V).
    step_major = not pred.is_contiguous() and pred.transpose(0, 1).is_contiguous()
    rows = pred.transpose(0, 1) if step_major else pred
    targets = label.t() if step_major else label
    per_step = F.cross_entropy(
        rows.reshape(-1, vocab), targets.reshape(-1), weight=options.weight, reduction="none",
        ignore_index=options.ignore_index, label_smoothing=options.label_smoothing,
    ).view(targets.shape)
    if step_major:
        per_step = per_step.t()
    return (per_step * kept).mean(dim=1)


def clip_grad_norm_(grads, theta):
    """d2l's gradient clipping with torch's multi-tensor kernels (one launch per device and dtype
    on CUDA), the test ``norm > theta`` made on the device: no host read. Returns the norm
    (0-dim, on ``grads[0]``'s device, in the widest of their dtypes)."""
    groups = {}
    for g in grads:
        groups.setdefault((g.device, g.dtype), []).append(g)
    device = grads[0].device
    dtype = torch.promote_types(*{g.dtype for g in grads}) if len(groups) > 1 else grads[0].dtype
    squares = [torch.stack(torch._foreach_norm(group)).to(device, dtype).square().sum() for group in groups.values()]
    norm = torch.stack(squares).sum().sqrt()
    factor = torch.where(norm > theta, theta / norm, torch.ones((), dtype=dtype, device=device))
    for (group_device, group_dtype), group in groups.items():
        torch._foreach_mul_(group, factor.to(group_device, group_dtype))
    return norm
