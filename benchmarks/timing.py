"""Clock discipline shared by the runner and the suites: synchronise before reading the clock,
warm up, take the median of many runs; inputs are made before timing."""
import statistics
import time

import torch


def synchronize(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def measure(fn, device="cpu", *, warmup=3, min_runs=7, min_time=0.5, max_runs=1000):
    """Median wall time of ``fn()`` in seconds."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    start_all = time.perf_counter()
    while len(times) < min_runs or (time.perf_counter() - start_all < min_time and len(times) < max_runs):
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def gemm_rate(device="cpu", dtype=torch.float32, n=1024):
    """FLOP/s of a large square GEMM: the arithmetic ceiling the floors divide by."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    out = torch.empty(n, n, device=device, dtype=dtype)
    seconds = measure(lambda: torch.mm(a, b, out=out), device, min_time=0.5)
    return 2 * n ** 3 / seconds


def copy_rate(device="cpu", nbytes=256 << 20):
    """Bytes/s of a large device-to-device copy (read + write counted)."""
    src = torch.empty(nbytes // 4, device=device, dtype=torch.float32).normal_()
    dst = torch.empty_like(src)
    seconds = measure(lambda: dst.copy_(src), device, min_time=0.5)
    return 2 * nbytes / seconds
