"""Peak memory of one training step, each implementation in a subprocess of its own.

On CPU: the peak resident memory of a process that only builds the model and runs the step
(``VmHWM``), and its growth over the resident memory just before the first step (what the
step itself holds: activations saved for backward, gradients, workspace). On GPU:
``torch.cuda.max_memory_allocated`` over the steps.

    python benchmarks/peak_memory.py --config zh --impl cpp   # prints one JSON line
"""
import argparse
import json
import os
import resource
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def _rss_kib():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() // 1024


def _peak_rss_kib():
    # VmHWM belongs to this process image; ru_maxrss would also count the parent's memory,
    # since it survives the fork + exec that started us.
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _child(config, impl, device):
    sys.path.insert(0, HERE)
    import torch

    from configs import CONFIGS
    import workloads as W

    cfg = CONFIGS[config]
    reference = W.reference_model(cfg, device)
    data = W.inputs(cfg, device)
    step = W.build("train_step", impl, reference, cfg, data)
    before_kib = _rss_kib()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    for _ in range(3):
        step()
    result = dict(config=config, impl=impl)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        result["peak_bytes"] = torch.cuda.max_memory_allocated()
        result["step_bytes"] = torch.cuda.max_memory_allocated() - base
    else:
        peak_kib = _peak_rss_kib()
        result["peak_bytes"] = peak_kib * 1024
        result["step_bytes"] = max(0, peak_kib - before_kib) * 1024
    print(json.dumps(result))


def train_step_peak(config, impl, device):
    """{peak_bytes, step_bytes} of one implementation's training step, measured in a subprocess."""
    out = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--config", config, "--impl", impl, "--device", device],
        capture_output=True, text=True,
    )
    if out.returncode != 0:
        raise RuntimeError(out.stderr.strip().splitlines()[-1] if out.stderr.strip() else "failed")
    return json.loads(out.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--impl", required=True)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    _child(args.config, args.impl, args.device)
