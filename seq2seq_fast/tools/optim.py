"""d2l's optimizer, ``torch.optim.Adam``, with its update for small CPU models in one compiled
call (``torch.ops.seq2seq_fast.adam_step_``): torch's step spends most of its time per
parameter in Python and dispatch, not arithmetic. The same class, state and ``state_dict`` as
torch's Adam (checkpoints move between the two); anything the op does not cover (weight decay,
amsgrad, maximize, CUDA, sparse or non-contiguous tensors) runs torch's own step."""
import torch
from torch.optim import optimizer as torch_optimizer

from seq2seq_fast.backends.extension import extension_error


def _observed(optimizer):
    """Whether anything watches ``optimizer``'s steps: a step hook of its own or a global one, or
    a running profiler (torch's wrapper of ``step`` serves them)."""
    return bool(optimizer._optimizer_step_pre_hooks or optimizer._optimizer_step_post_hooks
                or torch_optimizer._global_optimizer_pre_hooks or torch_optimizer._global_optimizer_post_hooks
                or torch.autograd._profiler_enabled())


def _torch_adam_step():
    """``torch.optim.Adam.step`` without the hooks and profiler range that torch's ``Optimizer``
    wraps around a class's ``step`` once one is built (else they would run twice)."""
    step = torch.optim.Adam.step
    return step.__wrapped__ if getattr(step, "hooked", False) else step


class Adam(torch.optim.Adam):
    """``torch.optim.Adam`` whose plain CPU update runs as one compiled call.

    >>> optimizer = Adam(net.parameters(), lr=0.005)
    >>> loss.backward(); optimizer.step()
    """

    def _op_arguments(self):
        """The op's arguments for every group, None when a group's settings need torch's step or
        no parameter has a gradient. Initialises missing state as torch's Adam does."""
        if extension_error() is not None:
            return None
        params, sizes, lr, beta1, beta2, eps = [], [], [], [], [], []
        for group in self.param_groups:
            if (group["weight_decay"] != 0 or group["amsgrad"] or group["maximize"] or group.get("capturable")
                    or group.get("differentiable") or isinstance(group["lr"], torch.Tensor)):
                return None
            with_grads = [p for p in group["params"] if p.grad is not None]
            if with_grads:
                params += with_grads
                sizes.append(len(with_grads))
                lr.append(float(group["lr"]))
                beta1.append(float(group["betas"][0]))
                beta2.append(float(group["betas"][1]))
                eps.append(float(group["eps"]))
        if not params or params[0].device.type != "cpu":  # the op runs on CPU (no error raised per step)
            return None
        states = [self._state(p) for p in params]
        return (params, [p.grad for p in params], [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states],
                [s["step"] for s in states], sizes, lr, beta1, beta2, eps)

    def _state(self, p):
        state = self.state[p]
        if not state:
            state["step"] = torch.tensor(0.0, dtype=torch.float32)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return state

    @torch.no_grad()
    def _update(self, closure=None):
        arguments = None if closure is not None else self._op_arguments()
        if arguments is None:
            return _torch_adam_step()(self, closure)
        try:
            torch.ops.seq2seq_fast.adam_step_(*arguments)
        except (RuntimeError, TypeError, ValueError):
            # The op checks every tensor before it writes any, in C++ (per tensor in Python the
            # checks cost more than the update): one it does not take (another device, dtype or
            # layout, non-contiguous) leaves everything as it was, for torch's own step.
            return _torch_adam_step()(self)
        return None

    _observed_update = torch.optim.Optimizer.profile_hook_step(_update)

    def step(self, closure=None):
        """torch's ``Adam.step``: the step hooks and the profiler range run as torch runs them,
        and only when present (with ``zero_grad``'s, they took 4-9 % of a d2l zh training step)."""
        if _observed(self):
            return self._observed_update(closure)
        return self._update(closure)

    # torch's Optimizer wraps a ``step`` not marked hooked in its hooks and profiler range on
    # every call; this one calls that wrapper itself when anything observes.
    step.hooked = True

    def zero_grad(self, set_to_none=True):
        """torch's ``zero_grad``, without its profiler range when no profiler runs."""
        if not set_to_none or torch.autograd._profiler_enabled():
            return super().zero_grad(set_to_none)
        for group in self.param_groups:
            for p in group["params"]:
                p.grad = None
        return None
