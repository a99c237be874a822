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


def measure_interleaved(fns, device="cpu", *, rounds=9, round_time=0.15, warmup=3):
    """Median seconds per call of each of ``fns`` ({name: callable}), timed in interleaved rounds.

    Each round times every function in turn over a batch of calls lasting about ``round_time``;
    the median over rounds is taken. A slow drift of the machine (frequency, neighbours) then
    touches all of them alike, so their ratios hold even when absolute times wander.
    """
    batch = {}
    for name, fn in fns.items():
        for _ in range(warmup):
            fn()
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        batch[name] = max(1, int(round_time / max(time.perf_counter() - start, 1e-9)))
    samples = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            synchronize(device)
            start = time.perf_counter()
            for _ in range(batch[name]):
                fn()
            synchronize(device)
            samples[name].append((time.perf_counter() - start) / batch[name])
    return {name: statistics.median(values) for name, values in samples.items()}
