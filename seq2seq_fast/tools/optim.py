"""d2l's optimizer, ``torch.optim.Adam``, with its update for small CPU models in one compiled
call (``torch.ops.seq2seq_fast.adam_step_``): torch's step spends most of its time per
parameter in Python and dispatch, not arithmetic. The same class, state and ``state_dict`` as
torch's Adam (checkpoints move between the two); anything the op does not cover (weight decay,
amsgrad, maximize, CUDA, sparse or non-contiguous tensors) runs torch's own step."""
import torch

from seq2seq_fast.backends.extension import extension_error

_FLOATS = (torch.float32, torch.float64)


class Adam(torch.optim.Adam):
    """``torch.optim.Adam`` whose plain CPU update runs as one compiled call.

    >>> optimizer = Adam(net.parameters(), lr=0.005)
    >>> loss.backward(); optimizer.step()
    """

    def _compiled_lists(self):
        """Per group ``(params, grads, exp_avgs, exp_avg_sqs, steps)`` for the op, or None when
        any group needs torch's step. Initialises missing state as torch's Adam does."""
        if extension_error() is not None:
            return None
        lists, dtype = [], None
        for group in self.param_groups:
            if (group["weight_decay"] != 0 or group["amsgrad"] or group["maximize"] or group.get("capturable")
                    or group.get("differentiable") or isinstance(group["lr"], torch.Tensor)):
                return None
            params = [p for p in group["params"] if p.grad is not None]
            for p in params:
                dtype = dtype or p.dtype
                if (p.device.type != "cpu" or p.dtype != dtype or p.dtype not in _FLOATS or p.grad.is_sparse
                        or not p.is_contiguous() or not p.grad.is_contiguous() or p.grad.dtype != dtype):
                    return None
            lists.append((group, params))
        out = []
        for group, params in lists:
            states = []
            for p in params:
                state = self.state[p]
                if not state:
                    state["step"] = torch.tensor(0.0, dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                elif not state["exp_avg"].is_contiguous() or state["step"].device.type != "cpu":
                    return None
                states.append(state)
            out.append((group, params, states))
        return out

    @torch.no_grad()
    def step(self, closure=None):
        groups = None if closure is not None else self._compiled_lists()
        if groups is None:
            return super().step(closure)
        for group, params, states in groups:
            if params:
                beta1, beta2 = group["betas"]
                torch.ops.seq2seq_fast.adam_step_(
                    params, [p.grad for p in params], [s["exp_avg"] for s in states],
                    [s["exp_avg_sq"] for s in states], [s["step"] for s in states],
                    float(group["lr"]), float(beta1), float(beta2), float(group["eps"]))
        return None
