"""Drop-in ``masked_softmax`` and ``AdditiveAttention`` with d2l's semantics and parameter names."""
from torch import nn

from seq2seq_fast.ops import functional
from seq2seq_fast.ops.dispatch import check_backend_name


def masked_softmax(X, valid_lens):
    """Softmax over the last axis of ``X`` (B, Q, T), hiding keys ``j >= valid_len``.

    ``valid_lens`` is None (plain softmax), (B,) (one length per batch row, for every query) or
    (B, Q) (one per query). Hidden keys get the score -1e6 as in d2l, so a row with length 0
    is uniform. Unlike d2l's version it does not write into ``X``.

    >>> X = torch.rand(2, 2, 4)
    >>> masked_softmax(X, torch.tensor([2, 3]))[0, 0, 2:]
    tensor([0., 0.])
    """
    return functional.masked_softmax(X, valid_lens)


class AdditiveAttention(nn.Module):
    """Additive (Bahdanau) attention, d2l's module with a choice of backend.

    Parameters ``W_k`` (key_size -> num_hiddens), ``W_q`` (query_size -> num_hiddens) and
    ``w_v`` (num_hiddens -> 1), all bias-free ``nn.Linear``, and ``dropout`` on the weights.
    ``forward(queries (B, Q, Dq), keys (B, T, Dk), values (B, T, Dv), valid_lens)`` returns the
    context (B, Q, Dv) and keeps the weights (B, Q, T) in ``attention_weights``.

    >>> attn = AdditiveAttention(2, 20, 8, dropout=0.1).eval()
    >>> attn(torch.rand(2, 1, 20), torch.ones(2, 10, 2), torch.rand(2, 10, 4), torch.tensor([2, 6])).shape
    torch.Size([2, 1, 4])
    """

    def __init__(self, key_size, query_size, num_hiddens, dropout, *, backend="auto", **kwargs):
        super().__init__(**kwargs)
        check_backend_name(backend)
        self.backend = backend
        self.W_k = nn.Linear(key_size, num_hiddens, bias=False)
        self.W_q = nn.Linear(query_size, num_hiddens, bias=False)
        self.w_v = nn.Linear(num_hiddens, 1, bias=False)
        self.dropout = nn.Dropout(dropout)

    def forward(self, queries, keys, values, valid_lens):
        context, self.attention_weights = functional.attention_forward(self, queries, keys, values, valid_lens)
        return context

    def __getstate__(self):
        # Drop the last call's weights: they may hang on an autograd graph (see the decoder).
        state = super().__getstate__()
        return {k: v for k, v in state.items() if k != "attention_weights"}
