"""The CPU ops' own threads (csrc/cpu/chunks.h): results that do not depend on the thread count
or on torch's own, the ``set_cpu_threads`` op, the trainer's scope that keeps a small model's step on
the calling thread, a forked child that still computes after its parent used the threads, and
workers that poll for the next call without hanging or changing a result."""
import os
import subprocess
import sys
import time

import pytest
import torch

from seq2seq_fast.backends import cpp_ops
from seq2seq_fast.backends.extension import extension_error
from seq2seq_fast.tools.train import SMALL_MODEL_PARAMETERS, Seq2SeqTrainer
from helpers import child_env, paired_models

pytestmark = pytest.mark.skipif(extension_error() is not None, reason=f"{extension_error()}")


@pytest.fixture
def threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)
    torch.ops.seq2seq_fast.set_cpu_threads(0)


def step_results(model, batch):
    """Logits and every gradient of one forward + backward, dropout on (its masks drawn from a fixed seed)."""
    torch.manual_seed(3)
    model.train()
    model.zero_grad(set_to_none=True)
    X, X_len, Y = batch
    logits, _ = model(X, Y, X_len)
    (logits * torch.linspace(-1, 1, logits.shape[-1], dtype=logits.dtype)).sum().backward()
    return [logits.detach()] + [p.grad.clone() for p in model.parameters()]


def batch(B=96, T=7, S=6, vocab=23, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, vocab, (B, T), generator=g), torch.randint(0, T + 2, (B,), generator=g),
            torch.randint(0, vocab, (B, S), generator=g))


def test_results_do_not_depend_on_the_threads(threads):
    _, model = paired_models(23, 8, 40, 2, dropout=0.2, dtype=torch.float64, backend="cpp")
    data = batch()
    torch.set_num_threads(1)
    want = step_results(model, data)
    for torch_threads, op_threads in ((2, 0), (3, 0), (1, 2), (1, 4)):
        torch.set_num_threads(torch_threads)
        torch.ops.seq2seq_fast.set_cpu_threads(op_threads)
        for got, expected in zip(step_results(model, data), want):
            torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def test_set_cpu_threads_returns_the_previous_count_and_checks_its_argument(threads):
    assert torch.ops.seq2seq_fast.set_cpu_threads(3) == 0
    assert torch.ops.seq2seq_fast.set_cpu_threads(0) == 3
    for bad in (-1, 5000):
        with pytest.raises(ValueError, match="threads must be in"):
            torch.ops.seq2seq_fast.set_cpu_threads(bad)


def test_the_trainer_scope_keeps_the_step_on_the_caller_and_restores_the_counts(threads):
    for torch_threads, op_threads in ((2, 0), (1, 3)):
        torch.set_num_threads(torch_threads)
        torch.ops.seq2seq_fast.set_cpu_threads(op_threads)
        with cpp_ops.step_on_caller():
            assert torch.get_num_threads() == 1
            assert torch.ops.seq2seq_fast.set_cpu_threads(1) == 1, "the ops' pieces on the caller too"
        assert torch.get_num_threads() == torch_threads
        assert torch.ops.seq2seq_fast.set_cpu_threads(0) == op_threads


def test_a_small_models_trainer_step_runs_in_the_scope(threads, monkeypatch):
    _, model = paired_models(23, 8, 16, 2, dtype=torch.float32, backend="cpp")
    assert sum(p.numel() for p in model.parameters()) <= SMALL_MODEL_PARAMETERS
    seen = []
    torch.set_num_threads(2)
    trainer = Seq2SeqTrainer(model, bos=1, lr=0.01)
    monkeypatch.setattr(trainer.optimizer, "step", lambda *a, **k: seen.append(
        (torch.get_num_threads(), torch.ops.seq2seq_fast.set_cpu_threads(1))))
    X, X_len, Y = batch(B=8)
    trainer.train_step((X, X_len, Y, torch.full((8,), 4)))
    assert seen == [(1, 1)] and torch.get_num_threads() == 2


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_forked_child_computes_after_the_parent_used_the_threads(threads):
    _, model = paired_models(23, 8, 40, 2, dtype=torch.float64, backend="cpp")
    data = batch()
    torch.set_num_threads(2)
    want = step_results(model, data)
    pid = os.fork()
    if pid == 0:  # the child: exit code 0 only if the step runs and agrees
        # As DataLoader's workers do: torch's OpenMP teams do not survive a fork (libgomp), this
        # package's threads must (2 of them, whatever torch's count).
        torch.set_num_threads(1)
        torch.ops.seq2seq_fast.set_cpu_threads(2)
        ok = all(torch.equal(a, b) for a, b in zip(step_results(model, data), want))
        os._exit(0 if ok else 3)
    deadline = 120
    start = time.time()
    while time.time() - start < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            assert os.waitstatus_to_exitcode(status) == 0
            return
        time.sleep(0.05)
    os.kill(pid, 9)
    pytest.fail("the forked child hung")


# A child that runs a model whose step loop splits over the ops' threads (not a small model's:
# its GEMMs go to the BLAS, whose OpenMP team takes turns with the pool) and a one-step loop with
# torch's own threaded work between the calls, on more threads than cores, and prints the largest
# difference from the one-thread run's results (the BLAS may sum in another order on more threads).
POLLING_CHILD = """
import torch
from helpers import paired_models

_, model = paired_models(37, 16, 256, 2, dtype=torch.float64, backend="cpp")
g = torch.Generator().manual_seed(0)
X = torch.randint(0, 37, (64, 9), generator=g)
X_len = torch.randint(0, 11, (64,), generator=g)
Y = torch.randint(0, 37, (64, 5), generator=g)

def results():
    model.eval()
    with torch.no_grad():
        enc_outputs, hidden = model.encoder(X)
        state = model.decoder.init_state((enc_outputs, hidden), X_len)
        out = [model.decoder(Y, state)[0]]
        for t in range(5):  # one step per call, torch's threads between (as a caller's argmax)
            logits, state = model.decoder(Y[:, t:t + 1], state)
            out.append(logits @ torch.ones(37, 64, dtype=logits.dtype))
    return out

torch.set_num_threads(1)
want = results()
worst = 0.0
for torch_threads, op_threads in ((2, 0), (4, 0), (1, 4), (2, 3)):
    torch.set_num_threads(torch_threads)
    torch.ops.seq2seq_fast.set_cpu_threads(op_threads)
    for _ in range(5):
        worst = max([worst] + [(a - b).abs().max().item() for a, b in zip(results(), want)])
print(worst)
"""


@pytest.mark.parametrize("poll_us", ["0", "1000"])
def test_polling_workers_neither_hang_nor_change_results(poll_us):
    # 1000 us: the workers poll through every gap of the loop, so a lost wake-up or a worker that
    # joins a finished call would show as a hang (timeout) or a wrong result; 0: they sleep at once.
    tests_dir = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    run = subprocess.run([sys.executable, "-c", POLLING_CHILD], env=dict(child_env(tests_dir), SEQ2SEQ_FAST_POLL_US=poll_us),
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert float(run.stdout) < 1e-12
