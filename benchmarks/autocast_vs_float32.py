"""Issue 15's "no slower under autocast than in float32": each workload of the package's
best backend on one configuration, in float32 and under CPU bfloat16 autocast, the two called
alternately in one process (``timing.interleaved_samples``), medians over rounds and their
ratio (autocast / float32; at most 1 is the mark). The runner's tables time the two dtypes in
different groups, minutes apart; this puts them side by side.

    python benchmarks/autocast_vs_float32.py [--config zh] [--rounds 30] [--threads N]
"""
import argparse
import statistics

import torch

import workloads as W
from configs import CONFIGS
from machine import bf16_units, machine_info
from runner import best_backend
from timing import interleaved_samples

WORKLOADS = ("decoder_forward", "greedy_decode", "train_step")


def ratio_rows(name, cfg, rounds, log=print):
    """[{workload, float32_ms, autocast_ms, ratio}] for configuration ``cfg`` (called ``name``)
    on the CPU."""
    torch.manual_seed(0)
    reference = W.reference_model(cfg, "cpu")
    data = W.inputs(cfg, "cpu")
    impl = best_backend("cpu")
    rows = []
    for workload in WORKLOADS:
        fns = {"float32": W.build(workload, impl, reference, cfg, data),
               "autocast": W.build(workload, impl, reference, cfg, data, torch.bfloat16)}
        samples = interleaved_samples(fns, rounds=rounds, round_time=0.05)
        f32, ac = (statistics.median(samples[name]) * 1e3 for name in ("float32", "autocast"))
        rows.append({"workload": workload, "float32_ms": f32, "autocast_ms": ac, "ratio": ac / f32})
        log(f"{name:6s} {workload:16s} float32 {f32:8.3f} ms   autocast {ac:8.3f} ms   "
            f"autocast / float32 {ac / f32:.3f}")
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="zh", choices=sorted(CONFIGS), help="the model and batch")
    parser.add_argument("--rounds", type=int, default=30, help="interleaved rounds per workload")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(bf16_units(machine_info("cpu")), f"; {torch.get_num_threads()} threads")
    rows = ratio_rows(args.config, CONFIGS[args.config], args.rounds)
    slower = [r["workload"] for r in rows if r["ratio"] > 1]
    print("no slower under autocast" if not slower else "slower under autocast: " + ", ".join(slower))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
