"""d2l's ``MaskedSoftmaxCELoss`` (one fused op on CPU, ATen's cross-entropy elsewhere) and the
``sequence_mask`` that d2l defines beside it."""
import torch
from torch import nn

from seq2seq_fast.ops import functional


def sequence_mask(X, valid_len, value=0):
    """d2l's ``sequence_mask``: set the entries of every row i of ``X`` (rows, cols, ...) at
    positions ``j >= valid_len[i]`` to ``value``, in place; returns ``X``.

    >>> sequence_mask(torch.tensor([[1, 2, 3], [4, 5, 6]]), torch.tensor([1, 2]))
    tensor([[1, 0, 0],
            [4, 5, 0]])
    """
    if not isinstance(X, torch.Tensor) or X.dim() < 2:
        raise TypeError(f"X must be a tensor of at least 2 dimensions (rows, cols), got "
                        f"{tuple(X.shape) if isinstance(X, torch.Tensor) else type(X).__name__}")
    if not isinstance(valid_len, torch.Tensor) or valid_len.shape != X.shape[:1]:
        raise ValueError(f"valid_len must be a tensor of shape ({X.shape[0]},), got "
                         f"{tuple(valid_len.shape) if isinstance(valid_len, torch.Tensor) else type(valid_len).__name__}")
    mask = torch.arange(X.size(1), device=X.device)[None, :] < valid_len.to(X.device)[:, None]
    X[~mask] = value
    return X


class MaskedSoftmaxCELoss(nn.CrossEntropyLoss):
    """Softmax cross-entropy per sequence, averaged over all S steps with the steps past
    ``valid_len`` weighted 0, as d2l: ``forward(pred (B, S, V), label (B, S), valid_len (B,))``
    returns (B,).

    >>> MaskedSoftmaxCELoss()(torch.ones(3, 4, 10), torch.ones((3, 4), dtype=torch.long), torch.tensor([4, 2, 0]))
    tensor([2.3026, 1.1513, 0.0000])
    """

    def forward(self, pred, label, valid_len):
        return functional.masked_ce_loss(self, pred, label, valid_len)
