"""Clock discipline shared by the runner and the suites: synchronise before reading the clock,
warm up, take the median of many runs; inputs are made before timing."""
import statistics
import time

import torch


def synchronize(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def per_call(fn, device="cpu", *, min_time=0.03, batch_time=2e-4):
    """Median seconds of one ``fn()``, timed in batches of calls lasting about ``batch_time``
    (so that a call far shorter than the clock's resolution is timed too): at least 3 batches
    and about ``min_time`` seconds after a warm-up call."""
    fn()
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    reps = max(1, int(batch_time / max(time.perf_counter() - start, 1e-9)))
    samples = []
    deadline = time.perf_counter() + min_time
    while len(samples) < 3 or (time.perf_counter() < deadline and len(samples) < 200):
        synchronize(device)
        start = time.perf_counter()
        for _ in range(reps):
            fn()
        synchronize(device)
        samples.append((time.perf_counter() - start) / reps)
    return statistics.median(samples)


def interleaved_samples(fns, device="cpu", *, rounds=9, round_time=0.15, warmup=3, max_seconds=None):
    """Seconds per call of each of ``fns`` ({name: callable}) in each of interleaved rounds:
    {name: [seconds, one per round]}.

    Each round times every function in turn over a batch of calls lasting about ``round_time``;
    take the median over rounds (or, for a lower bound, the minimum). A slow drift of the machine (frequency, neighbours) then
    touches all of them alike, so their ratios hold even when absolute times wander. With
    ``max_seconds``, fewer rounds (at least 3) are run where ``rounds`` would take longer.
    ``warmup`` calls precede the call that sizes the batches (0: the caller has warmed them).
    """
    batch, call = {}, {}
    for name, fn in fns.items():
        for _ in range(warmup):
            fn()
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        call[name] = max(time.perf_counter() - start, 1e-9)
        batch[name] = max(1, int(round_time / call[name]))
    if max_seconds is not None:
        round_cost = sum(batch[name] * call[name] for name in fns)
        rounds = max(3, min(rounds, int(max_seconds / round_cost)))
    # A function slower than a round ran once, warm, to size its batch: that call is a sample.
    samples = {name: [call[name]] if batch[name] == 1 else [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            if len(samples[name]) == rounds:
                continue
            synchronize(device)
            start = time.perf_counter()
            for _ in range(batch[name]):
                fn()
            synchronize(device)
            samples[name].append((time.perf_counter() - start) / batch[name])
    return samples
