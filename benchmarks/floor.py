"""The floor: one lower bound on a workload's time, the same definition for every table.

    floor = max( time of the workload's GEMMs run by torch.matmul,  time to copy its bytes )

* GEMMs: each GEMM of the workload (``Gemm``: M, N, K, batch, repetitions) run by
  ``torch.matmul`` on operands of exactly its shape, as often as the workload runs it, less the
  fixed cost of each call (Python and dispatch, not arithmetic: a 1x1x1 call's time). A per-step
  GEMM has M = B rows and runs once per step; one batched over the steps has M = S·B and runs
  once. With p > 1 CPU threads the faster of two ways counts: the BLAS's own threading, or the
  rows split evenly over the threads, each share at one thread (what the ``cpp`` backend does).
* bytes: what the workload must touch at least once (weights read, activations read and
  written) copied once (half read, half written), less a 1-element copy's fixed cost.

Both are timed as members of the group they bound, in the same interleaved rounds as the
implementations (``rows.time_group``): the machine's speed drifts (on a shared VM by a factor
of 1.5 within minutes), and a bound measured at another moment than the rows is no bound.
Only GEMMs count as arithmetic (elementwise work, softmax and the loss are left out), each in
the cheapest form the algorithm allows, so every implementation needs at least this long.
"""
import math
from dataclasses import dataclass

import torch

from timing import per_call


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


_FIXED = {}  # (kind, device, dtype, threads) -> seconds of a trivial call of that kind


def _fixed_cost(kind, fn, device, dtype, threads):
    """Seconds of the trivial call ``fn`` at ``threads`` threads, measured once per process:
    what a call of that kind costs besides its work."""
    key = (kind, str(device), dtype, threads)
    if key not in _FIXED:
        previous = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            _FIXED[key] = per_call(fn, device, min_time=0.02)
        finally:
            torch.set_num_threads(previous)
    return _FIXED[key]


def _operands(rows, n, k, batch, device, dtype):
    a = torch.randn(batch, rows, k, device=device).to(dtype)
    b = torch.randn(batch, k, n, device=device).to(dtype)
    if batch == 1:
        a, b = a[0], b[0]
    return a, b, torch.matmul(a, b)


class FloorWork:
    """The floor's own work for one group: ``callables()`` to time with the implementations,
    ``result(times)`` the :class:`Floor` from their median seconds."""

    GEMMS, SPLIT, BYTES = "floor: GEMMs", "floor: GEMMs, rows split over threads", "floor: bytes"

    def __init__(self, gemms, nbytes, device, dtype=torch.float32, cap=256 << 20):
        self.gemms, self.nbytes, self.device, self.dtype = list(gemms), nbytes, device, dtype
        self.threads = torch.get_num_threads() if torch.device(device).type == "cpu" else 1
        operands = {}

        def calls(shape_of):
            out = []
            for g in self.gemms:
                shape, repeat = shape_of(g)
                if shape not in operands:
                    operands[shape] = _operands(*shape, device, dtype)
                out.append((operands[shape], g.count * repeat))
            return out

        self._calls = calls(lambda g: ((g.m, g.n, g.k, g.batch), 1))
        # Rows split over p threads, each share at one thread: the batch of a batched GEMM, else M.
        p = self.threads

        def share(g):
            if g.batch > 1:
                return (g.m, g.n, g.k, math.ceil(g.batch / p)), p
            return (math.ceil(g.m / p), g.n, g.k, 1), p

        self._split = [] if p == 1 else calls(share)
        self._copy_size = min(max(8, nbytes), cap)
        self._src = torch.randn(self._copy_size // 8, device=device)
        self._dst = torch.empty_like(self._src)

    @staticmethod
    def _run(calls):
        for (a, b, out), count in calls:
            for _ in range(count):
                torch.matmul(a, b, out=out)

    def _run_split(self):
        previous = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            self._run(self._split)
        finally:
            torch.set_num_threads(previous)

    def callables(self):
        fns = {self.GEMMS: lambda: self._run(self._calls), self.BYTES: lambda: self._dst.copy_(self._src)}
        if self._split:
            fns[self.SPLIT] = self._run_split
        return fns

    def _call_cost(self, batched, threads):
        a, b, out = _operands(1, 1, 1, 2 if batched else 1, self.device, self.dtype)
        return _fixed_cost(("matmul", batched), lambda: torch.matmul(a, b, out=out), self.device, self.dtype, threads)

    def _gemm_seconds(self, seconds, calls, threads):
        """``seconds`` of ``calls`` less each call's fixed cost."""
        fixed = sum(count * self._call_cost(a.dim() == 3, threads) for (a, _, _), count in calls)
        return max(0.0, seconds - fixed)

    def result(self, times):
        gemm_s = self._gemm_seconds(times[self.GEMMS], self._calls, self.threads)
        if self._split:
            gemm_s = min(gemm_s, self._gemm_seconds(times[self.SPLIT], self._split, 1) / self.threads)
        one = torch.zeros(1, device=self.device)
        copy_fixed = _fixed_cost("copy", lambda: one.copy_(one), self.device, torch.float32, self.threads)
        bytes_s = max(0.0, times[self.BYTES] - copy_fixed) * self.nbytes / self._copy_size
        return Floor(max(gemm_s, bytes_s), gemm_s, bytes_s, sum(g.flops for g in self.gemms), self.nbytes)

