"""The floor: one lower bound on a workload's time, the same definition for every table.

    floor = max( time of the workload's GEMMs run by torch.matmul,  time to copy its bytes )

* GEMMs: each GEMM of the workload (``Gemm``: M, N, K, batch, repetitions) run by
  ``torch.matmul`` on operands of exactly its shape, as often as the workload runs it, less the
  calls' fixed cost (Python and dispatch, not arithmetic: the same calls on 1x1x1 operands,
  timed right before). A per-step GEMM has M = B rows and runs once per step; one batched over
  the steps has M = S·B and runs once. With p > 1 CPU threads the faster of two ways counts:
  the BLAS's own threading, or the rows split evenly over the threads, each share at one
  thread (what the ``cpp`` backend does). Under autocast the GEMMs run in bfloat16 and in
  float32, and the faster counts (an implementation may keep GEMMs too small for bfloat16 to
  pay in float32, as the ``cpp`` backend does).
* bytes: what the workload must touch at least once (weights read, activations read and
  written) copied once (half read, half written), less a 1-element copy's time.

All of it runs as members of the group it bounds, in the same interleaved rounds as the
implementations (``rows.time_group``), and each time counts at its fastest call: the
machine's speed drifts (on a shared VM by a factor of 1.5 within minutes), and a bound timed at
another moment than the rows, or through a neighbour's burst, is no bound.
Only GEMMs count as arithmetic (elementwise work, softmax and the loss are left out), each in
the cheapest form the algorithm allows, so every implementation needs at least this long.
"""
import math
import time
from dataclasses import dataclass

import torch

from timing import synchronize


@dataclass(frozen=True)
class Gemm:
    """``count`` products of (batch, m, k) by (batch, k, n); the right operand (a weight, or the
    encoder's outputs in attention) is the same in each of the ``count`` repetitions."""
    m: int
    n: int
    k: int
    count: int = 1
    batch: int = 1

    @property
    def flops(self):
        return 2 * self.m * self.n * self.k * self.batch * self.count


def backward_gemms(gemms):
    """The GEMMs of the gradients of ``gemms``: the left operand's gradient per repetition
    (M, K, N), the right operand's once, summed over all repetitions (K, N, M·count)."""
    out = []
    for g in gemms:
        out.append(Gemm(g.m, g.k, g.n, g.count, g.batch))
        out.append(Gemm(g.k, g.n, g.m * g.count, 1, g.batch))
    return out


@dataclass(frozen=True)
class Floor:
    seconds: float
    gemm_seconds: float
    bytes_seconds: float
    flops: int
    nbytes: int

    @property
    def bound(self):
        return "GEMMs" if self.gemm_seconds >= self.bytes_seconds else "bytes"


def _operands(rows, n, k, batch, device, dtype):
    a = torch.randn(batch, rows, k, device=device).to(dtype)
    b = torch.randn(batch, k, n, device=device).to(dtype)
    if batch == 1:
        a, b = a[0], b[0]
    return a, b, torch.matmul(a, b)


def _run(calls):
    for (a, b, out), count in calls:
        for _ in range(count):
            torch.matmul(a, b, out=out)


def _one_thread(fn):
    def run():
        previous = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            fn()
        finally:
            torch.set_num_threads(previous)
    return run


class FloorWork:
    """The floor's own work for one group: ``callables()`` to time with the implementations
    (each call also records the time of its work and, right before it, of the same calls on
    trivial operands), ``result()`` the :class:`Floor`: each at its fastest, the difference."""

    GEMMS, SPLIT, BYTES = "floor: GEMMs", "floor: GEMMs, rows split over threads", "floor: bytes"

    def __init__(self, gemms, nbytes, device, dtype=torch.float32, cap=256 << 20):
        """``dtype``: the GEMMs' dtype, or a tuple of dtypes each timed (the fastest counts)."""
        self.gemms, self.nbytes, self.device = list(gemms), nbytes, device
        self.threads = torch.get_num_threads() if torch.device(device).type == "cpu" else 1
        self.seconds = {}  # callable name -> ([fixed cost, one per call], [work, one per call])
        self._fns = {}
        dtypes = dtype if isinstance(dtype, tuple) else (dtype,)
        for d in dtypes:
            suffix = "" if len(dtypes) == 1 else f" ({str(d).replace('torch.', '')})"
            self._add_gemms(d, suffix)
        self._copy_size = min(max(8, nbytes), cap)
        src = torch.randn(self._copy_size // 8, device=device)
        dst, one = torch.empty_like(src), torch.zeros(1, device=device)
        self._fns[self.BYTES] = self._timed(self.BYTES, lambda: one.copy_(one), lambda: dst.copy_(src))

    def _add_gemms(self, dtype, suffix):
        """The GEMMs' callables in ``dtype``: the BLAS's threading, and with several threads the
        rows split over them; named GEMMS and SPLIT plus ``suffix``."""
        device, operands = self.device, {}

        def calls(shape_of):
            out = []
            for g in self.gemms:
                shape, repeat = shape_of(g)
                if shape not in operands:
                    operands[shape] = _operands(*shape, device, dtype)
                out.append((operands[shape], g.count * repeat))
            return out

        ones = {batched: _operands(1, 1, 1, 2 if batched else 1, device, dtype) for batched in (False, True)}

        def trivial(work):
            return [(ones[a.dim() == 3], count) for (a, _, _), count in work]

        p = self.threads

        def share(g):  # rows split over p threads: the batch of a batched GEMM, else M
            if g.batch > 1:
                return (g.m, g.n, g.k, math.ceil(g.batch / p)), p
            return (math.ceil(g.m / p), g.n, g.k, 1), p

        gemm_calls = calls(lambda g: ((g.m, g.n, g.k, g.batch), 1))
        gemm_trivial = trivial(gemm_calls)
        name = self.GEMMS + suffix
        self._fns[name] = self._timed(name, lambda: _run(gemm_trivial), lambda: _run(gemm_calls))
        if p > 1:
            split_calls = calls(share)
            split_trivial = trivial(split_calls)
            name = self.SPLIT + suffix
            self._fns[name] = _one_thread(self._timed(name, lambda: _run(split_trivial), lambda: _run(split_calls)))
    def _timed(self, name, overhead, work):
        """A callable running ``overhead`` then ``work``, recording the time of each."""
        self.seconds[name] = ([], [])

        def run():
            synchronize(self.device)
            start = time.perf_counter()
            overhead()
            synchronize(self.device)
            middle = time.perf_counter()
            work()
            synchronize(self.device)
            self.seconds[name][0].append(middle - start)
            self.seconds[name][1].append(time.perf_counter() - middle)
        return run

    def callables(self):
        return dict(self._fns)

    def result(self, seconds=None):
        """The :class:`Floor` from ``seconds`` ({callable name: ([fixed cost], [work]), one per
        call}; default: what the callables recorded): the fastest work less the fastest fixed cost."""
        fastest = {name: max(0.0, min(work) - min(fixed)) for name, (fixed, work) in (seconds or self.seconds).items()}
        bytes_s = fastest.pop(self.BYTES) * self.nbytes / self._copy_size
        # Every GEMMs variant (dtype, threading) is a way to run them all: the fastest counts.
        gemm_s = min(t / self.threads if name.startswith(self.SPLIT) else t for name, t in fastest.items())
        return Floor(max(gemm_s, bytes_s), gemm_s, bytes_s, sum(g.flops for g in self.gemms), self.nbytes)
