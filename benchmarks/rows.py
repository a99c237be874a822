"""One group of rows, the same for both sections: the implementations of one (config, dtype,
workload) timed in interleaved rounds, then a ``floor`` row. Row keys: ``section, config,
dtype, workload, impl, median_s`` (None: not measured), ``speedup`` (the reference's time over
the row's), ``over_floor`` (the row's time over the floor), ``note`` (why a row is not
measured, or how it was run); ``bounded``: False where the floor is no bound on the row (the
float32 base of a group under autocast, whose floor runs in the autocast dtype)."""
import statistics

from timing import interleaved_samples

FLOOR = "floor"


def first_line(exc):
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:160] if text else ''}".rstrip(": ")


def failing(exc):
    """A callable that raises ``exc``: the row of an implementation that could not be built."""
    def run():
        raise exc
    return run


def time_group(callables, device, min_time, floor_work, notes=None):
    """``({impl: median seconds or None}, {impl: note}, floor)``: each callable runs once first
    (it compiles there, where it compiles, before any clock runs); one that raises is not timed
    and its note says why. The rest and the floor's own work (``floor.FloorWork``) are timed
    together in interleaved rounds, so that the floor sees the machine as the rows do: rows
    are medians over the rounds, the floor takes its fastest call."""
    notes = dict(notes or {})
    runnable = {}
    for impl, fn in callables.items():
        try:
            fn()
            runnable[impl] = fn
        except Exception as exc:  # a row that cannot run says why instead of stopping the run
            notes[impl] = f"failed: {first_line(exc)}"
    floor_fns = floor_work.callables()
    for fn in floor_fns.values():
        fn()
    samples = interleaved_samples({**runnable, **floor_fns}, device, rounds=max(3, int(min_time / 0.1)),
                                  round_time=min(0.1, min_time / 3), warmup=0, max_seconds=20 * min_time)
    times = {impl: statistics.median(samples[impl]) if impl in runnable else None for impl in callables}
    return times, notes, floor_work.result()


def group_rows(section, config, dtype, workload, times, notes, floor, extra=None):
    """Rows of the implementations ``times`` ({impl: seconds or None}) and the :class:`floor.Floor`."""
    base = times.get("reference")
    rows = []
    for impl, seconds in times.items():
        rows.append(dict(section=section, config=config, dtype=dtype, workload=workload, impl=impl, median_s=seconds,
                         speedup=base / seconds if base and seconds else None,
                         over_floor=seconds / floor.seconds if seconds and floor.seconds else None,
                         note=notes.get(impl, ""), **(extra or {}).get(impl, {})))
    rows.append(dict(section=section, config=config, dtype=dtype, workload=workload, impl=FLOOR,
                     median_s=floor.seconds, speedup=base / floor.seconds if base and floor.seconds else None,
                     over_floor=1.0, note="", floor_bound=floor.bound, floor_gemm_s=floor.gemm_seconds,
                     floor_bytes_s=floor.bytes_seconds, flops=floor.flops, nbytes=floor.nbytes))
    return rows


def under_floor(rows):
    """Measured rows faster than their group's floor (a floor that is no lower bound); groups
    without a floor (the book end to end) have none to be under."""
    def key(r):
        return r["section"], r["config"], r["dtype"], r["workload"]

    floors = {key(r): r["median_s"] for r in rows if r["impl"] == FLOOR}
    return [r for r in rows if r["impl"] != FLOOR and r["median_s"] is not None and floors.get(key(r)) is not None
            and r["median_s"] < floors[key(r)] and r.get("bounded", True)]
