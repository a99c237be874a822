"""The floor: one lower bound on a workload's time, the same definition for every table.

    floor = max( sum_i gemm_seconds(gemm_i),  bytes / copy rate )

* ``gemm_seconds``: the time ``torch.matmul`` takes for exactly that GEMM's shape (M, N, K and
  batch), measured in the same run and cached per shape, less the time of the same call on a
  1x1x1 problem (the call's fixed cost is Python and dispatch, not arithmetic). A per-step GEMM
  has M = B rows and runs once per step; a GEMM batched over steps has M = S·B and runs once.
  With p > 1 CPU threads the faster of two ways counts: the BLAS's own threading, or the rows
  split evenly over the p threads, each share at its single-thread time (what the ``cpp``
  backend does).
* ``bytes``: what the workload must touch at least once (weights read, activations read and
  written) at the copy rate measured for a buffer of that size (read + write counted), less a
  1-element copy's fixed cost.

Only GEMMs count as arithmetic (elementwise work, softmax and the loss are left out), and each
GEMM is counted in the cheapest form the algorithm allows, so every implementation needs at
least this long; a measured row under it means a rate above was measured too low, and the
runner says so.
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

    def describe(self):
        return (f"{self.bound}-bound: {self.flops / 1e6:.3g} MFLOP of GEMMs take {self.gemm_seconds * 1e3:.3g} ms at "
                f"the rates measured for their shapes, {self.nbytes / 2**20:.3g} MiB take "
                f"{self.bytes_seconds * 1e3:.3g} ms at the measured copy rate")


class Rates:
    """Measured times of GEMMs per shape and of copies per size on ``device`` in ``dtype``,
    each measured once, on first use, and cached."""

    def __init__(self, device, dtype=torch.float32, min_time=0.03):
        self.device, self.dtype, self.min_time = device, dtype, min_time
        self.threads = torch.get_num_threads() if torch.device(device).type == "cpu" else 1
        self._gemm, self._copy, self._fixed = {}, {}, {}

    def _matmul_time(self, m, n, k, batch):
        a = torch.randn(batch, m, k, device=self.device).to(self.dtype)
        b = torch.randn(batch, k, n, device=self.device).to(self.dtype)
        if batch == 1:
            a, b = a[0], b[0]
        out = torch.matmul(a, b)
        return per_call(lambda: torch.matmul(a, b, out=out), self.device, min_time=self.min_time)

    def _kernel_time(self, m, n, k, batch):
        key = ("matmul", batch > 1, torch.get_num_threads())
        if key not in self._fixed:
            self._fixed[key] = self._matmul_time(1, 1, 1, 2 if batch > 1 else 1)
        return max(0.0, self._matmul_time(m, n, k, batch) - self._fixed[key])

    def gemm_seconds(self, gemm):
        """Seconds of one repetition of ``gemm``."""
        key = (gemm.m, gemm.n, gemm.k, gemm.batch)
        if key not in self._gemm:
            seconds = self._kernel_time(*key)
            # Rows split over the threads: the batch of a batched GEMM, else M.
            split_batch = gemm.batch > 1
            rows = gemm.batch if split_batch else gemm.m
            if self.threads > 1 and rows > 1:
                share = math.ceil(rows / self.threads)
                previous = torch.get_num_threads()
                torch.set_num_threads(1)
                try:
                    split = (self._kernel_time(gemm.m, gemm.n, gemm.k, share) if split_batch
                             else self._kernel_time(share, gemm.n, gemm.k, 1))
                finally:
                    torch.set_num_threads(previous)
                seconds = min(seconds, split)
            self._gemm[key] = seconds
        return self._gemm[key]

    def copy_seconds(self, nbytes, cap=256 << 20):
        """Seconds to touch ``nbytes`` (half read, half written) by a copy."""
        size = min(max(8, nbytes), cap)
        if size not in self._copy:
            if "copy" not in self._fixed:
                one = torch.zeros(1, device=self.device)
                self._fixed["copy"] = per_call(lambda: one.copy_(one), self.device, min_time=self.min_time)
            src = torch.randn(size // 8, device=self.device)
            dst = torch.empty_like(src)
            seconds = per_call(lambda: dst.copy_(src), self.device, min_time=self.min_time)
            self._copy[size] = max(0.0, seconds - self._fixed["copy"])
        return self._copy[size] * nbytes / size

    def describe(self):
        """One line per measured GEMM shape: the rate the floor used."""
        return [f"M={m} N={n} K={k}" + (f" batch={b}" if b > 1 else "")
                + (f": {2 * m * n * k * b / s / 1e9:.1f} GFLOP/s" if s > 0 else ": below the call's fixed cost")
                for (m, n, k, b), s in sorted(self._gemm.items())]


def floor(gemms, nbytes, rates):
    """The :class:`Floor` of a workload running ``gemms`` (list of :class:`Gemm`) and touching
    ``nbytes`` at least once, at the rates ``rates`` measures."""
    gemm_s = sum(g.count * rates.gemm_seconds(g) for g in gemms)
    bytes_s = rates.copy_seconds(nbytes)
    return Floor(max(gemm_s, bytes_s), gemm_s, bytes_s, sum(g.flops for g in gemms), nbytes)
