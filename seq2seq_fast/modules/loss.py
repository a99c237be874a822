"""d2l's ``MaskedSoftmaxCELoss``: one fused op on CPU, ATen's cross-entropy elsewhere."""
from torch import nn

from seq2seq_fast.ops import functional


class MaskedSoftmaxCELoss(nn.CrossEntropyLoss):
    """Softmax cross-entropy per sequence, averaged over all S steps with the steps past
    ``valid_len`` weighted 0, as d2l: ``forward(pred (B, S, V), label (B, S), valid_len (B,))``
    returns (B,).

    >>> MaskedSoftmaxCELoss()(torch.ones(3, 4, 10), torch.ones((3, 4), dtype=torch.long), torch.tensor([4, 2, 0]))
    tensor([2.3026, 1.1513, 0.0000])
    """

    def forward(self, pred, label, valid_len):
        return functional.masked_ce_loss(self, pred, label, valid_len)
