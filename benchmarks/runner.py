"""The benchmark runner (``make bench``): median times of every workload on every configuration
for the reference, ``torch.compile`` of the reference, each available backend and the floor,
as ratios measured in one process. Prints a table and writes markdown, JSON and a plot.

    python benchmarks/runner.py [--configs zh,en,large] [--workloads ...] [--device cpu]
                                [--dtypes float32,bfloat16]
"""
import argparse
import datetime
import json
import os
import platform
import subprocess
import sys

# Inductor compiles in a pool of worker processes that linger and steal the 2 cores from the
# rows timed after a compiled one: compile in this process instead. Set before torch is imported.
os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")

import torch  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import seq2seq_fast as sf  # noqa: E402
from configs import CONFIGS, SMOKE, WORKLOADS  # noqa: E402
from peak_memory import train_step_peak  # noqa: E402
from timing import copy_rate, gemm_rate, measure, measure_interleaved  # noqa: E402
import workloads as W  # noqa: E402


def machine_info(device):
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "seq2seq_fast": sf.__version__,
        "threads": torch.get_num_threads(),
        "cpu": _cpu_name(),
        "device": device,
        "backends": sf.available_backends(),
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(device)
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True, text=True).stdout
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=HERE,
                               capture_output=True, text=True).stdout
        info["git"] = sha.strip() + ("-dirty" if dirty.strip() else "")
    except OSError:
        info["git"] = None
    return info


def _cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def implementations(device, compile_reference, requested=None):
    impls = ["reference"]
    if compile_reference:
        impls.append("reference+compile")
    device_type = torch.device(device).type
    for name in sf.available_backends():
        if sf.unavailable_reason(name, device_type) is None and not (name == "triton" and device_type == "cpu"):
            impls.append(name)
    if device_type == "cuda":  # the decoder's CUDA-graph option, where a backend supports it
        impls += [f"{name}+graph" for name in ("cpp", "triton") if name in impls]
    if requested:
        impls = [i for i in impls if i in requested]
    return impls


def _applies(impl, workload, dtype):
    """Whether a row of ``impl`` exists: CUDA graphs replay inference (decoder_forward) only;
    the compiled reference is timed in float32 only (its compile time dominates a short run)."""
    if impl.endswith("+graph"):
        return workload == "decoder_forward"
    return impl != "reference+compile" or dtype == torch.float32


def _step_memory(config_name, workload, impl, device, enabled, log, dtype=torch.float32):
    """Memory of a float32 training step in a subprocess of its own (not for compiled rows:
    compiling in every subprocess would cost minutes)."""
    if (not enabled or workload != "train_step" or impl == "reference+compile" or config_name == "smoke"
            or dtype != torch.float32):
        return None
    try:
        return train_step_peak(config_name, impl, device)
    except RuntimeError as exc:
        log(f"  {config_name}/{workload}/{impl}: memory not measured ({exc})")
        return None


def run(configs, workloads, device, compile_reference=True, min_time=0.5, requested_impls=None, log=print,
        memory=True, dtype=torch.float32):
    rate = gemm_rate(device)
    bandwidth = copy_rate(device)
    log(f"measured GEMM rate {rate / 1e9:.1f} GFLOP/s, copy rate {bandwidth / 1e9:.1f} GB/s on {device}")
    rows = []
    all_impls = implementations(device, compile_reference, requested_impls)
    dtype_name = str(dtype).replace("torch.", "")
    for config_name, cfg in configs.items():
        reference = W.reference_model(cfg, device, dtype)
        data = W.inputs(cfg, device, dtype)
        for workload in workloads:
            impls = [impl for impl in all_impls if _applies(impl, workload, dtype)]
            flops = W.workload_flops(workload, cfg)
            floor = max(flops / rate, W.weight_bytes(reference) / bandwidth)
            fns, times = {}, {}
            for impl in impls:
                try:
                    fn = W.build(workload, impl, reference, cfg, data)
                    fn()  # compiles, where it compiles, before any clock runs
                    fns[impl] = fn
                except Exception as exc:  # a row that cannot run says why instead of stopping the run
                    times[impl] = None
                    log(f"  {config_name}/{workload}/{impl}: not measured ({type(exc).__name__}: {str(exc)[:120]})")
            rounds = max(5, int(min_time / 0.1))
            times.update(measure_interleaved(fns, device, rounds=rounds, round_time=0.1))
            times = {impl: times[impl] for impl in impls}
            base = times.get("reference")
            for impl, seconds in times.items():
                mem = _step_memory(config_name, workload, impl, device, memory, log, dtype)
                rows.append(dict(
                    config=config_name, dtype=dtype_name, workload=workload, impl=impl, median_s=seconds,
                    speedup=(base / seconds) if base and seconds else None,
                    over_floor=(seconds / floor) if seconds else None,
                    peak_mib=mem and mem["peak_bytes"] / 2**20, step_mib=mem and mem["step_bytes"] / 2**20,
                ))
            rows.append(dict(config=config_name, dtype=dtype_name, workload=workload, impl="floor", median_s=floor,
                             speedup=base / floor if base else None, over_floor=1.0, flops=flops))
            log(format_rows([r for r in rows if r["config"] == config_name and r["workload"] == workload
                             and r["dtype"] == dtype_name]))
    return dict(gemm_flops_per_s=rate, copy_bytes_per_s=bandwidth, rows=rows)


def _fmt(value, spec, missing="n/a"):
    return missing if value is None else format(value, spec)


def format_rows(rows, markdown=False):
    header = ["config", "dtype", "workload", "impl", "median ms", "speedup vs reference", "x floor",
              "step MiB / peak MiB"]
    lines = []
    for r in rows:
        memory = "" if r.get("step_mib") is None else f"{r['step_mib']:.1f} / {r['peak_mib']:.0f}"
        lines.append([r["config"], r.get("dtype", "float32"), r["workload"], r["impl"], _fmt(r["median_s"] and r["median_s"] * 1e3, ".3f"),
                      _fmt(r["speedup"], ".2f") + ("x" if r["speedup"] else ""), _fmt(r["over_floor"], ".2f"),
                      memory])
    if markdown:
        out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        out += ["| " + " | ".join(line) + " |" for line in lines]
        return "\n".join(out)
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(header)]
    fmt = "  ".join("{:<%d}" % w for w in widths)
    return "\n".join([fmt.format(*header)] + [fmt.format(*line) for line in lines])


def plot(rows, path):
    """Bar chart of each implementation's speedup over the reference, per config and workload."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key = lambda r: (r["config"], r.get("dtype", "float32"), r["workload"])  # noqa: E731
    groups = sorted({key(r) for r in rows})
    impls = [i for i in dict.fromkeys(r["impl"] for r in rows) if i not in ("reference",)]
    fig, ax = plt.subplots(figsize=(max(6, 1.4 * len(groups)), 4))
    width = 0.8 / max(1, len(impls))
    for k, impl in enumerate(impls):
        values = []
        for g in groups:
            match = [r for r in rows if key(r) == g and r["impl"] == impl]
            values.append(match[0]["speedup"] or 0 if match else 0)
        ax.bar([i + k * width for i in range(len(groups))], values, width, label=impl)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(groups))])
    ax.set_xticklabels([f"{c} {d}\n{w}" for c, d, w in groups], fontsize=8)
    ax.set_ylabel("speedup over d2l reference (x)")
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def attention_section(device, min_time, log):
    """Rows of the attention-only benchmark, when its module is present."""
    try:
        import attention_bench
    except ImportError:
        return []
    return attention_bench.attention_rows(device, lambda fn: measure(fn, device, min_time=min_time))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated names of CONFIGS")
    parser.add_argument("--workloads", default=",".join(WORKLOADS))
    parser.add_argument("--impls", default=None, help="comma-separated implementations to keep (default: all)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile of the reference")
    parser.add_argument("--no-attention", action="store_true", help="skip the attention-only rows")
    parser.add_argument("--no-memory", action="store_true", help="skip the training step's memory (subprocesses)")
    parser.add_argument("--dtypes", default="float32",
                        help="comma-separated dtypes of the model and inputs, e.g. float32,bfloat16")
    parser.add_argument("--min-time", type=float, default=0.5, help="seconds of timed runs per row")
    parser.add_argument("--smoke", action="store_true", help="one tiny configuration, to check the runner works")
    parser.add_argument("--out", default="bench-out", help="folder for results.md, results.json, speedups.png")
    args = parser.parse_args(argv)

    configs = {"smoke": SMOKE} if args.smoke else {n: CONFIGS[n] for n in args.configs.split(",")}
    workloads = args.workloads.split(",")
    for w in workloads:
        if w not in WORKLOADS:
            parser.error(f"--workloads: unknown workload {w!r}, expected some of {WORKLOADS}")
    dtypes = []
    for name in args.dtypes.split(","):
        if not isinstance(getattr(torch, name, None), torch.dtype):
            parser.error(f"--dtypes: {name!r} is not a torch dtype")
        dtypes.append(getattr(torch, name))
    info = machine_info(args.device)
    print(" ".join(f"{k}={v}" for k, v in info.items()))
    result = {"rows": []}
    for dtype in dtypes:
        part = run(configs, workloads, args.device, compile_reference=not args.no_compile,
                   min_time=args.min_time, requested_impls=args.impls and args.impls.split(","),
                   memory=not args.no_memory, dtype=dtype)
        result.update(part, rows=result["rows"] + part["rows"])
    attention = [] if args.no_attention or args.smoke else attention_section(args.device, args.min_time, print)
    os.makedirs(args.out, exist_ok=True)
    result.update(machine=info, configs={n: c.as_dict() for n, c in configs.items()}, attention=attention)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(result, f, indent=2)
    table = format_rows(result["rows"], markdown=True)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write("# seq2seq_fast benchmark\n\n")
        f.write("\n".join(f"- {k}: {v}" for k, v in info.items()) + "\n")
        f.write(f"- GEMM rate: {result['gemm_flops_per_s'] / 1e9:.1f} GFLOP/s; "
                f"copy rate: {result['copy_bytes_per_s'] / 1e9:.1f} GB/s\n\n{table}\n")
        if attention:
            f.write("\n## Attention alone\n\n| " + " | ".join(attention[0]) + " |\n|" + "---|" * len(attention[0]) + "\n")
            f.write("\n".join("| " + " | ".join(str(v) for v in row.values()) + " |" for row in attention) + "\n")
    plot(result["rows"], os.path.join(args.out, "speedups.png"))
    print("\n" + format_rows(result["rows"]))
    print(f"\nwrote {args.out}/results.md, results.json, speedups.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
