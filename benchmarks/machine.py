"""What a benchmark ran on: machine, CPU instruction sets, threads, versions, git commit."""
import datetime
import os
import platform
import subprocess

import torch

import seq2seq_fast as sf
from seq2seq_fast.backends import cpp_ops

HERE = os.path.dirname(os.path.abspath(__file__))

# /proc/cpuinfo flag -> the name the output gives it, in the order printed.
ISA_FLAGS = {"avx2": "AVX2", "avx512f": "AVX-512", "avx512_bf16": "AVX512-BF16", "avx512_fp16": "AVX512-FP16",
             "amx_tile": "AMX", "amx_bf16": "AMX-BF16"}
# The instruction sets with bfloat16 arithmetic, matrix units first.
BF16_UNITS = ("AMX-BF16", "AVX512-BF16")


def _cpuinfo():
    try:
        with open("/proc/cpuinfo") as f:
            return f.read()
    except OSError:
        return ""


def cpu_name(cpuinfo):
    for line in cpuinfo.splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def instruction_sets(cpuinfo):
    """Names of the vector and matrix extensions the first CPU lists (``ISA_FLAGS``)."""
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            return [name for flag, name in ISA_FLAGS.items() if flag in flags]
    return []


def bf16_units(info):
    """The line over the autocast table: the bfloat16 units the CPU offered (of ``BF16_UNITS``,
    from ``machine_info``'s instruction sets), or the GPU it ran on."""
    if "gpu" in info:
        return f"bfloat16 autocast on the GPU: {info['gpu']}"
    listed = info["instruction sets"]
    offered = [unit for unit in BF16_UNITS if unit in listed.split(", ")]
    found = ", ".join(offered) or ("unknown" if listed == "unknown" else "neither " + " nor ".join(BF16_UNITS))
    line = f"bfloat16 units the CPU offered: {found}"
    return line + (f"; the cpp ops' bfloat16 GEMMs: {info['cpp bf16 GEMMs']}" if "cpp bf16 GEMMs" in info else "")


def _git(*args):
    try:
        return subprocess.run(["git", *args], cwd=HERE, capture_output=True, text=True).stdout.strip()
    except OSError:
        return ""


def machine_info(device):
    cpuinfo = _cpuinfo()
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cpu": cpu_name(cpuinfo),
        "instruction sets": ", ".join(instruction_sets(cpuinfo)) or "unknown",
        "torch CPU kernels": torch.backends.cpu.get_cpu_capability(),
        "cores usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "threads": torch.get_num_threads(),
        "device": device,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": None,
        "seq2seq_fast": sf.__version__,
        "backends": ", ".join(sf.available_backends()),
        # What the cpp ops' bfloat16 GEMMs (under CPU autocast) run on: amx, mkl or none.
        "cpp bf16 GEMMs": cpp_ops.bf16_gemm_kernel(),
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = "not installed"
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(device)
    sha = _git("rev-parse", "--short", "HEAD")
    info["git"] = (sha + ("-dirty" if _git("status", "--porcelain", "--untracked-files=no") else "")) or None
    return info
