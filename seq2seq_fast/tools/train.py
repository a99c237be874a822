"""Training with d2l's ``train_seq2seq`` math: Xavier initialisation, Adam, the masked softmax
cross-entropy summed over the batch, gradient clipping to global norm 1, teacher forcing with
``<bos>`` prepended to the shifted target. Adds a progress bar, tokens/s, checkpoints that
resume exactly where they stopped, and ``DistributedDataParallel``.
"""
import contextlib
import math
import sys
import time
from typing import NamedTuple

import torch
from torch import nn

from seq2seq_fast.backends import cpp_ops
from seq2seq_fast.modules.loss import MaskedSoftmaxCELoss
from seq2seq_fast.modules.seq2seq import EncoderDecoder
from seq2seq_fast.ops import functional, validation
from seq2seq_fast.tools.checkpoints import load_checkpoint, save_checkpoint
from seq2seq_fast.tools.data import tensor_loader_batches
from seq2seq_fast.tools.extras import optional_import
from seq2seq_fast.tools.optim import Adam
from seq2seq_fast.tools.plots import Animator


def xavier_init_weights(m):
    """d2l's initialisation in ``train_seq2seq``: Xavier-uniform on every ``nn.Linear`` weight and
    every ``nn.GRU`` weight matrix (biases keep PyTorch's defaults), applied with ``net.apply``
    in module order, so the same seed draws the same weights as d2l."""
    if type(m) == nn.Linear:  # noqa: E721  (d2l tests the exact type: subclasses are left alone)
        nn.init.xavier_uniform_(m.weight)
    if type(m) == nn.GRU:  # noqa: E721
        for name in m._flat_weights_names:
            if "weight" in name:
                nn.init.xavier_uniform_(m._parameters[name])


def grad_clipping(net, theta):
    """d2l's ``grad_clipping(net, theta)``: scale the gradients of ``net`` (an ``nn.Module``, or
    d2l's scratch model with a ``params`` list) by ``theta / norm`` when their global norm exceeds
    ``theta``, in one call with no host read of the norm (``functional.clip_grad_norm_``).
    Parameters without a gradient are skipped (d2l's raises). Returns the norm (0-dim tensor).

    >>> l.sum().backward(); grad_clipping(net, 1); optimizer.step()
    """
    if isinstance(net, nn.Module):
        grads = [p.grad for p in net.parameters() if p.requires_grad and p.grad is not None]
    elif hasattr(net, "params"):
        grads = [p.grad for p in net.params if p.grad is not None]
    else:
        raise TypeError(f"net must be an nn.Module or have a params list, got {type(net).__name__}")
    return functional.clip_grad_norm_(grads, theta)


def adam(params, lr):
    """d2l's ``torch.optim.Adam(net.parameters(), lr=lr)``: on CPU the package's ``Adam`` (one
    compiled update for all the parameters), elsewhere torch's fused Adam where this torch has
    one for the device and dtypes (the for-loop form otherwise). The same update rule, defaults
    and state either way."""
    params = list(params)
    if all(p.device.type == "cpu" for p in params):
        return Adam(params, lr=lr)
    try:
        return torch.optim.Adam(params, lr=lr, fused=True)
    except (RuntimeError, ValueError):  # no fused kernel for this device or dtype
        return torch.optim.Adam(params, lr=lr)


# Models up to this many parameters train on the calling thread alone (CPU).
SMALL_MODEL_PARAMETERS = 1 << 20


def _step_threads(module, device):
    """The thread scope of a training step: on CPU, for a small model, the whole step on the
    calling thread (``cpp_ops.step_on_caller``: a busy machine would otherwise hold up each of
    torch's thread teams, and the compiled ops' pieces are too small to pay for waking another)."""
    small = sum(p.numel() for p in module.parameters()) <= SMALL_MODEL_PARAMETERS
    if device.type == "cpu" and small:
        return cpp_ops.step_on_caller
    return contextlib.nullcontext


class EpochRecord(NamedTuple):
    """One finished epoch of ``Seq2SeqTrainer.fit``: d2l's two printed figures."""
    epoch: int  # epochs finished so far (1 for the first)
    loss: float  # loss per target token over the epoch's batches (of this fit call)
    tokens_per_s: float


def _unwrap(net):
    return net.module if isinstance(net, nn.parallel.DistributedDataParallel) else net


class _Progress:
    """tqdm when installed and wanted (its loss and tokens/s refreshed every ``log_every``
    steps), else a line every ``log_every`` steps (or nothing)."""

    def __init__(self, total, initial, enabled, log_every):
        self.bar = None
        self.enabled, self.log_every = enabled, log_every
        if enabled:
            instead = f"progress is printed every {log_every} steps" if log_every else "no progress is shown"
            tqdm = optional_import("tqdm.auto", instead)
            if tqdm is not None:
                self.bar = tqdm.tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, mininterval=1.0)

    def advance(self):
        if self.bar is not None:
            self.bar.update(1)

    def update(self, step, loss, tokens_per_s):
        """Every ``log_every`` steps: the figures, read from the device once."""
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tokens_per_s:,.0f}", refresh=False)
        elif self.enabled:
            print(f"step {step}: loss {loss:.3f}, {tokens_per_s:.1f} tokens/sec", file=sys.stderr)

    def close(self):
        if self.bar is not None:
            self.bar.close()


class Seq2SeqTrainer:
    """d2l's ``train_seq2seq`` loop as an object that can stop, save and resume.

    ``net`` is an ``EncoderDecoder`` (ours or d2l's), or one wrapped in
    ``DistributedDataParallel``; ``bos`` the target ``<bos>`` id. ``init_weights`` applies
    d2l's Xavier initialisation (skip it to continue from loaded weights). Under DDP every
    process reads the same batches and, with ``shard_batches``, trains on rows ``rank::world_size``
    of each; it backpropagates ``world_size * loss.sum()`` of its shard, so DDP's gradient
    averaging yields the gradient of ``loss.sum()`` over the joined batch, and every update is the
    one a single process makes on the whole batch.
    ``checkpoint_meta`` (model sizes, vocabularies, ...) is written into every checkpoint.

    >>> trainer = Seq2SeqTrainer(net, bos=tgt_vocab["<bos>"], lr=0.005)
    >>> trainer.fit(train_iter, num_epochs=250, checkpoint_path="run.pt")
    """

    def __init__(self, net, *, bos, lr, device=None, clip_theta=1.0, init_weights=True, checkpoint_meta=None,
                 shard_batches=True):
        if not isinstance(net, nn.Module):
            raise TypeError(f"net must be an nn.Module (an EncoderDecoder), got {type(net).__name__}")
        self.bos = validation.check_int(bos, "bos", minimum=0)
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0:
            raise ValueError(f"lr must be a positive float, got {lr!r}")
        if not clip_theta > 0:
            raise ValueError(f"clip_theta must be positive, got {clip_theta!r}")
        self.net = net
        self.module = _unwrap(net)
        if device is None:
            device = next(self.module.parameters()).device
        self.device = torch.device(device)
        self.ddp = isinstance(net, nn.parallel.DistributedDataParallel)
        self.world_size = torch.distributed.get_world_size() if self.ddp else 1
        self.rank = torch.distributed.get_rank() if self.ddp else 0
        if init_weights:
            self.module.apply(xavier_init_weights)
            if self.ddp:  # DDP copied rank 0's weights when wrapping; copy the new ones again
                for tensor in self.module.state_dict().values():
                    torch.distributed.broadcast(tensor, src=0)
        self.module.to(self.device)
        self.optimizer = adam(self.module.parameters(), lr)
        # What the optimizer updates, the tensors clipped each step (a list: no module walk per step).
        self._parameters = [p for group in self.optimizer.param_groups for p in group["params"]]
        self._threads = _step_threads(self.module, self.device)
        self.loss = MaskedSoftmaxCELoss()
        self.clip_theta = clip_theta
        self.checkpoint_meta = dict(checkpoint_meta or {})
        self.shard_batches = shard_batches
        self.step = 0  # optimizer steps taken
        self.epoch = 0  # current epoch
        self.batch_in_epoch = 0  # batches of the current epoch already used
        self.history = []  # an EpochRecord per epoch finished by fit in this process

    def train_step(self, batch):
        """One update on ``(X, X_valid_len, Y, Y_valid_len)``; returns the detached
        ``(loss summed over the batch, number of target tokens)``; under DDP those of this
        process's shard."""
        if self.world_size > 1 and self.shard_batches:
            if batch[0].shape[0] < self.world_size:
                raise ValueError(
                    f"batch must have at least world_size={self.world_size} rows to shard, got {batch[0].shape[0]}")
            batch = [x[self.rank::self.world_size] for x in batch]
        X, X_valid_len, Y, Y_valid_len = [x.to(self.device) for x in batch]
        with self._threads():
            return self._update(X, X_valid_len, Y, Y_valid_len)

    def _update(self, X, X_valid_len, Y, Y_valid_len):
        if not self.net.training:  # d2l sets train mode once; a callback may have set eval (predict_seq2seq)
            self.net.train()
        self.optimizer.zero_grad()
        bos = torch.full((Y.shape[0], 1), self.bos, dtype=Y.dtype, device=self.device)
        dec_input = torch.cat([bos, Y[:, :-1]], 1)
        fusable = isinstance(self.module, EncoderDecoder) and type(self.module).forward is EncoderDecoder.forward
        if fusable and not self.ddp:
            # On the cpp backend the output layer and the loss fused (no (B, S, V) logits), and
            # the whole step run by the compiled ops without autograd's graph.
            l = self.module.masked_ce_loss_backward(X, dec_input, Y, Y_valid_len, X_valid_len)
        else:
            Y_hat, _ = self.net(X, dec_input, X_valid_len)
            l = self.loss(Y_hat, Y, Y_valid_len)
            (l.sum() * self.world_size if self.world_size > 1 else l.sum()).backward()
        functional.clip_grad_norm_([p.grad for p in self._parameters if p.requires_grad and p.grad is not None],
                                   self.clip_theta)
        self.optimizer.step()
        self.step += 1
        return l.detach().sum(), Y_valid_len.sum()

    def _batches(self, data):
        """Batches from the current position on; a ``BatchIterator`` resumes mid-epoch, and d2l's
        ``DataLoader`` over tensors gives its batches gathered whole (``tensor_loader_batches``)."""
        if hasattr(data, "batches"):
            return data.batches(self.epoch, self.batch_in_epoch)
        fast = tensor_loader_batches(data)
        return iter(data) if fast is None else fast

    def fit(self, data, *, num_epochs=None, max_steps=None, checkpoint_path=None, checkpoint_every=None,
            progress=True, log_every=50, callback=None, epoch_callback=None):
        """Train until ``num_epochs`` epochs or ``max_steps`` steps in all (counting steps taken
        before a resume). Saves to ``checkpoint_path`` every ``checkpoint_every`` steps and at the
        end (rank 0 only). ``callback(trainer, loss_per_token)`` runs after each step; returning
        True stops. Each finished epoch appends an ``EpochRecord`` to ``history`` and then calls
        ``epoch_callback(trainer)``. Returns ``{"loss": loss per token, "tokens_per_s", "steps",
        "seconds"}`` of this call (d2l's two printed figures, over the whole call)."""
        if num_epochs is None and max_steps is None:
            raise ValueError("num_epochs or max_steps must be given")
        counts = (("num_epochs", num_epochs), ("max_steps", max_steps), ("checkpoint_every", checkpoint_every))
        for name, value in counts:
            if value is not None:
                validation.check_int(value, name, minimum=0)
        steps_per_epoch = len(data) if hasattr(data, "__len__") else None
        total = max_steps
        if num_epochs is not None and steps_per_epoch is not None:
            total = min(total or math.inf, num_epochs * steps_per_epoch)
        bar = _Progress(total if total != math.inf else None, self.step, progress and self.rank == 0, log_every)
        loss_sum = torch.zeros((), device=self.device)
        tokens = torch.zeros((), dtype=torch.int64, device=self.device)
        start, steps, stop = time.perf_counter(), 0, False
        # Where the current epoch began: time, and the loss and tokens summed before it.
        since = {"time": start, "loss": 0.0, "tokens": 0}

        def end_epoch():
            self.epoch, self.batch_in_epoch = self.epoch + 1, 0
            loss_total, token_total = float(loss_sum), int(tokens)
            n = token_total - since["tokens"]
            seconds = max(time.perf_counter() - since["time"], 1e-9)
            self.history.append(EpochRecord(self.epoch, (loss_total - since["loss"]) / max(n, 1), n / seconds))
            if epoch_callback is not None:
                epoch_callback(self)
            since.update(time=time.perf_counter(), loss=loss_total, tokens=token_total)

        try:
            while not stop:
                if (num_epochs is not None and self.epoch >= num_epochs) or (
                        max_steps is not None and self.step >= max_steps):
                    break
                fresh_epoch, ran = self.batch_in_epoch == 0, 0
                for batch in self._batches(data):
                    l, n = self.train_step(batch)
                    self.batch_in_epoch += 1
                    loss_sum += l
                    tokens += n
                    steps += 1
                    ran += 1
                    if self.batch_in_epoch == steps_per_epoch:
                        end_epoch()
                    bar.advance()
                    if log_every and self.step % log_every == 0:  # the only reads of the sums
                        per_token = float(loss_sum) / max(int(tokens), 1)
                        bar.update(self.step, per_token, int(tokens) / max(time.perf_counter() - start, 1e-9))
                    if callback is not None and callback(self, float(l) / max(int(n), 1)):
                        stop = True
                    if checkpoint_path and checkpoint_every and self.step % checkpoint_every == 0:
                        self.save(checkpoint_path)
                    if stop or (max_steps is not None and self.step >= max_steps):
                        stop = True
                        break
                else:
                    if fresh_epoch and ran == 0:
                        raise ValueError("data yielded no batch")
                    if self.batch_in_epoch:  # the end of an iterable without a length
                        end_epoch()
        finally:
            bar.close()
        if checkpoint_path:
            self.save(checkpoint_path)
        seconds = time.perf_counter() - start
        n_tokens = int(tokens)
        return {"loss": float(loss_sum) / max(n_tokens, 1), "tokens_per_s": n_tokens / max(seconds, 1e-9),
                "steps": steps, "seconds": seconds}

    def __repr__(self):
        return f"Seq2SeqTrainer(step={self.step}, epoch={self.epoch}, device={self.device})"

    def state_dict(self):
        """Everything a resume needs: weights, optimizer, position and the RNG states."""
        state = {
            "model": self.module.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "step": self.step,
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "rng": torch.get_rng_state(),
        }
        if self.device.type == "cuda":
            state["cuda_rng"] = torch.cuda.get_rng_state(self.device)
        return state

    def load_state_dict(self, state):
        self.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step, self.epoch, self.batch_in_epoch = state["step"], state["epoch"], state["batch_in_epoch"]
        torch.set_rng_state(state["rng"].cpu())
        if "cuda_rng" in state and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda_rng"].cpu(), self.device)

    def save(self, path):
        """Write a checkpoint (rank 0 only under DDP) with ``checkpoint_meta`` beside the state."""
        if self.rank == 0:
            save_checkpoint(path, dict(self.checkpoint_meta, **self.state_dict()))

    def resume(self, path):
        """Continue from a checkpoint written by ``save``: the next steps are those the saving run
        would have taken."""
        self.load_state_dict(load_checkpoint(path, map_location=self.device))
        return self


def train_seq2seq(net, data_iter, lr, num_epochs, tgt_vocab, device, *, animator=None, progress=True,
                  **fit_kwargs):
    """d2l's ``train_seq2seq(net, data_iter, lr, num_epochs, tgt_vocab, device)``: Xavier
    initialisation, Adam, ``MaskedSoftmaxCELoss``, teacher forcing with ``<bos>`` prepended,
    clipping to norm 1 (``Seq2SeqTrainer``), the loss per token plotted every 10 epochs, and at the
    end d2l's line ``loss L, N tokens/sec on DEVICE`` of the last epoch.

    The plot is ``animator`` or d2l's ``Animator(xlabel="epoch", ylabel="loss", xlim=[10,
    num_epochs])``: shown in a notebook, written to a PNG elsewhere. ``progress`` shows a bar
    (tqdm) or a line every 50 steps with tokens/s; other keywords go to ``Seq2SeqTrainer.fit``.
    Returns the trainer: ``trainer.history`` holds every epoch's loss (d2l returns None).

    >>> train_seq2seq(net, train_iter, 0.005, 250, tgt_vocab, try_gpu())
    loss 0.020, 4871.3 tokens/sec on cpu
    """
    validation.check_int(num_epochs, "num_epochs", minimum=1)
    if not hasattr(tgt_vocab, "__getitem__"):
        raise TypeError(f"tgt_vocab must be a Vocab, got {type(tgt_vocab).__name__}")
    trainer = Seq2SeqTrainer(net, bos=tgt_vocab["<bos>"], lr=lr, device=device)
    if animator is None:
        animator = Animator(xlabel="epoch", ylabel="loss", xlim=[10, num_epochs])

    def plot(trainer):
        record = trainer.history[-1]
        if record.epoch % 10 == 0:
            animator.add(record.epoch, (record.loss,))

    result = trainer.fit(data_iter, num_epochs=num_epochs, epoch_callback=plot, progress=progress, **fit_kwargs)
    loss, tokens_per_s = trainer.history[-1][1:] if trainer.history else (result["loss"], result["tokens_per_s"])
    print(f"loss {loss:.3f}, {tokens_per_s:.1f} tokens/sec on {str(device)}")
    return trainer
