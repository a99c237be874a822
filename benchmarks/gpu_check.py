"""``make gpu-check``: everything a lent GPU machine should run, in one command, with no network.

    python3 benchmarks/gpu_check.py [--no-build]
    GPU_CHECK_STAGES=build,tests,sanitizer,bench,bench-compile,memory   (default: all, in that order)
    GPU_CHECK_OUT=gpu-out                                 (log, benchmark JSON, markdown summary)
    GPU_CHECK_LIMITS=tests=150,bench=120                  (seconds, replacing LIMITS' entries)

Stages, each a subprocess with its own time limit, so that a hang costs that stage only:

* ``build``: ``python3 -m pip install --no-deps --no-build-isolation -e .`` against the machine's
  torch, MAX_JOBS = its cores, TORCH_CUDA_ARCH_LIST = the device's capability (e.g. "9.0").
* ``tests``: the CUDA and Triton tests, compiled (TRITON_INTERPRET is removed from the
  environment: the lent machines' numpy is too new for triton 3.6's interpreter), one pytest per
  path (cpp:cuda, triton:cuda), spread over worker processes where pytest-xdist is installed
  (Triton's compiles are CPU-bound; the machines have 16 cores). Each path whose tests ran and passed is recorded as verified in
  ``seq2seq_fast/backends/verified_gpu.json`` (copied to the output folder): ``backend="auto"``
  picks only verified paths on CUDA.
* ``sanitizer``: compute-sanitizer memcheck and racecheck over a small script that calls every
  CUDA op (encoder, decoder forward and backward, greedy decoding, loss, keep-mask).
* ``bench``: benchmarks/runner.py on cuda: zh, en, large x decoder_forward, train_step,
  greedy_decode, float32, bfloat16 and bfloat16 autocast, every backend, CUDA graphs, the floor,
  short windows.
* ``bench-compile``: the compiled reference (float32) in a run of its own, so that slow compiles
  cost only it.
* ``memory``: the training step's peak memory per implementation (the runner's memory rows).

Planned time on an H100/H200: build ~1 min (16 cores), tests ~1.5 min, sanitizer ~30 s, bench
~1.5 min, memory ~20 s. Without a GPU it runs what can run (the build, the sanitizer's script and a
smoke benchmark on the CPU, so that this script cannot rot), says what it skipped and exits 0.
"""
import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
STAGES = ("build", "tests", "sanitizer", "bench", "bench-compile", "memory")
RECORD = os.path.join(ROOT, "seq2seq_fast", "backends", "verified_gpu.json")

# Tests of each GPU path: (files, pytest -k expression or None).
TEST_GROUPS = {
    "cpp:cuda": (["tests/backends/test_cuda_ops.py", "tests/ops/test_autocast.py", "tests/modules/test_decoder_parity.py",
                  "tests/modules/test_cuda_graph.py", "tests/modules/test_graph_option.py",
                  "tests/backends/test_cpp_loss.py", "tests/backends/test_cpp_linear_loss.py",
                  "tests/backends/test_cpp_dropout_mask.py"], "not triton"),
    "triton:cuda": (["tests/backends/test_triton_attention.py", "tests/backends/test_triton_decoder.py",
                     "tests/backends/test_triton_dropout_counters.py", "tests/test_triton_bench.py",
                     "tests/backends/test_triton_gpu_compile.py", "tests/modules/test_cuda_graph.py", "tests/modules/test_graph_option.py",
                     "tests/modules/test_decoder_parity.py", "tests/modules/test_hardening.py",
                     "tests/ops/test_autocast.py"], "triton"),
}
# Seconds each stage (or each part of it) may run; GPU_CHECK_LIMITS replaces some (a lease is short).
LIMITS = {"build": 900, "tests": 420, "sanitizer": 180, "bench": 240, "bench-compile": 180, "memory": 150}


def limits(text):
    """LIMITS with the entries of ``text`` ("tests=150,bench=120") replaced."""
    found = dict(LIMITS)
    for item in filter(None, text.split(",")):
        name, _, seconds = item.partition("=")
        if name not in LIMITS or not seconds.isdigit():
            raise ValueError(f"GPU_CHECK_LIMITS: expected name=seconds with a name of {tuple(LIMITS)}, got {item!r}")
        found[name] = int(seconds)
    return found


class Log:
    def __init__(self, path):
        self.file = open(path, "a")

    def __call__(self, text):
        print(text, flush=True)
        self.file.write(text + "\n")
        self.file.flush()


def gpu():
    """(name, capability "9.0") of device 0, or None without a usable CUDA device."""
    import torch

    if not torch.cuda.is_available():
        return None
    major, minor = torch.cuda.get_device_capability(0)
    return torch.cuda.get_device_name(0), f"{major}.{minor}"


def run(cmd, log, limit, env=None, label=None):
    """Runs cmd with its output appended to the log; (return code or "timeout", output)."""
    log(f"$ {' '.join(cmd)}   (limit {limit} s)")
    env = dict(os.environ if env is None else env)
    # This checkout's package first, whatever else the environment has installed.
    env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, env.get("PYTHONPATH")) if p)
    start = time.monotonic()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=limit)
        rc, out = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as exc:
        rc = "timeout"
        out = "".join(x.decode() if isinstance(x, bytes) else (x or "") for x in (exc.stdout, exc.stderr))
    log(out.rstrip())
    log(f"-> {label or cmd[0]}: {rc} after {time.monotonic() - start:.0f} s")
    return rc, out


def stage_build(ctx):
    env = dict(os.environ, MAX_JOBS=str(os.cpu_count() or 1))
    if ctx.gpu:
        env["TORCH_CUDA_ARCH_LIST"] = ctx.gpu[1]
    rc, _ = run([ctx.python, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "-e", "."], ctx.log,
                ctx.limits["build"], env)
    return ("passed" if rc == 0 else "failed"), f"pip install -e . (arch {env.get('TORCH_CUDA_ARCH_LIST', 'n/a')})"


def _counts(out):
    """pytest's summary counts, e.g. {"passed": 12, "skipped": 3}."""
    counts = {}
    for line in out.splitlines()[-3:]:
        words = line.replace(",", " ").split()
        for n, word in zip(words, words[1:]):
            if n.isdigit() and word.rstrip("s") in ("passed", "failed", "skipped", "error", "xfailed"):
                counts[word.rstrip("s")] = int(n)
    return counts


def stage_tests(ctx):
    if not ctx.gpu:
        return "skipped", "no CUDA device: the CUDA and Triton tests need one"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    # seq2seq_fast.kernels is kernels/, mapped there by the install: an extension built in place
    # without it fails every Triton test at import (seen on the first lease).
    rc, _ = run([ctx.python, "-c", "import seq2seq_fast._C, seq2seq_fast.kernels"], ctx.log, 60, env, label="import")
    if rc != 0:
        return "failed", "seq2seq_fast._C or seq2seq_fast.kernels does not import: run the build stage (pip install -e .)"
    verified, notes = {}, []
    for path, (files, expr) in TEST_GROUPS.items():
        cmd = [ctx.python, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", *files]
        cmd += ["-k", expr] if expr else []
        cmd += _xdist()
        rc, out = run(cmd, ctx.log, ctx.limits["tests"], env, label=path)
        counts = _counts(out)
        verified[path] = rc == 0 and counts.get("passed", 0) > 0
        notes.append(f"{path}: {'verified' if verified[path] else 'NOT verified'} (rc {rc}, {counts})")
    write_record(ctx, verified)
    return ("passed" if all(verified.values()) else "failed"), "; ".join(notes)


def _xdist():
    """pytest-xdist's arguments for up to 8 workers, or none where it is not installed."""
    import importlib.util

    workers = min(8, os.cpu_count() or 1)
    return ["-n", str(workers)] if workers > 1 and importlib.util.find_spec("xdist") else []


def write_record(ctx, verified):
    import torch

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout
    record = {
        "paths": verified,
        "device": ctx.gpu[0],
        "capability": ctx.gpu[1],
        "torch": torch.__version__,
        "triton": triton_version,
        "git": sha.strip() or None,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    text = json.dumps(record, indent=2) + "\n"
    for path in (RECORD, os.path.join(ctx.out, "verified_gpu.json")):
        with open(path, "w") as f:
            f.write(text)
    ctx.log(f"wrote the record of verified GPU paths to {RECORD} (commit it): {verified}")


def stage_sanitizer(ctx):
    script = [ctx.python, os.path.abspath(__file__), "--exercise-ops"]
    if not ctx.gpu:
        rc, _ = run(script + ["--device", "cpu"], ctx.log, ctx.limits["sanitizer"], label="ops script on cpu")
        status = "passed" if rc == 0 else "failed"
        return ("skipped" if status == "passed" else status), "no CUDA device: ran the ops script on the CPU only"
    tool = shutil.which("compute-sanitizer") or next(
        (p for p in ("/usr/local/cuda/bin/compute-sanitizer",) if os.path.exists(p)), None)
    if tool is None:
        return "skipped", "compute-sanitizer not found"
    notes, status = [], "passed"
    for kind in ("memcheck", "racecheck"):
        rc, out = run([tool, "--tool", kind, "--error-exitcode", "9", *script, "--device", "cuda"], ctx.log,
                      ctx.limits["sanitizer"], label=kind)
        if "ERROR SUMMARY" not in out and rc != 0:
            notes.append(f"{kind}: could not run (rc {rc}; see the log)")
            status = "skipped" if status == "passed" else status
        elif rc != 0:
            notes.append(f"{kind}: errors (rc {rc})")
            status = "failed"
        else:
            notes.append(f"{kind}: clean")
    return status, "; ".join(notes)


def _runner(ctx, name, args, limit):
    out = os.path.join(ctx.out, name)
    rc, _ = run([ctx.python, os.path.join(HERE, "runner.py"), "--out", out, *args], ctx.log, limit, label=name)
    ctx.tables.append((name, os.path.join(out, "results.md")))
    return rc


def stage_bench(ctx):
    if not ctx.gpu:
        rc = _runner(ctx, "bench-smoke-cpu", ["--smoke", "--device", "cpu", "--no-compile", "--no-memory",
                                              "--min-time", "0.01", "--workloads", "decoder_forward",
                                              "--impls", "reference,torch"], ctx.limits["bench"])
        status = "passed" if rc == 0 else "failed"
        return ("skipped" if status == "passed" else status), "no CUDA device: ran a CPU smoke benchmark only"
    rc = _runner(ctx, "bench", BENCH_COMMON + ["--full", "--dtypes", "float32,bfloat16,autocast-bf16", "--no-compile"],
                 ctx.limits["bench"])
    return ("passed" if rc == 0 else "failed"), f"runner rc {rc}"


def stage_bench_compile(ctx):
    if not ctx.gpu:
        return "skipped", "no CUDA device"
    rc = _runner(ctx, "bench-compile", BENCH_COMMON + ["--dtypes", "float32", "--impls", "reference,reference+compile"],
                 ctx.limits["bench-compile"])
    return ("passed" if rc == 0 else "failed"), f"runner rc {rc}"


BENCH_COMMON = ["--device", "cuda", "--configs", "zh,en,large", "--no-memory", "--no-attention", "--min-time", "0.1"]


def stage_memory(ctx):
    if not ctx.gpu:
        return "skipped", "no CUDA device: GPU memory needs one"
    rc = _runner(ctx, "memory", ["--device", "cuda", "--configs", "zh,en,large", "--workloads", "train_step", "--memory",
                                 "--dtypes", "float32", "--no-compile", "--no-attention", "--min-time", "0.05"],
                 ctx.limits["memory"])
    return ("passed" if rc == 0 else "failed"), f"runner rc {rc} (step MiB / peak MiB columns)"


def exercise_ops(device):
    """Every op of the extension once on ``device``, forward and backward: what the sanitizer watches."""
    import torch

    sys.path.insert(0, ROOT)
    import seq2seq_fast as sf

    backend = "cpp" if sf.unavailable_reason("cpp", torch.device(device).type) is None else "torch"
    torch.manual_seed(0)
    V, E, H, L, B, T, S = 37, 16, 32, 2, 5, 7, 6
    model = sf.EncoderDecoder(sf.Seq2SeqEncoder(V, E, H, L, 0.1, backend=backend),
                              sf.Seq2SeqAttentionDecoder(V, E, H, L, 0.1, backend=backend)).to(device)
    src = torch.randint(3, V, (B, T), device=device)
    tgt = torch.randint(3, V, (B, S), device=device)
    src_len = torch.tensor([7, 3, 1, 0, 5], device=device)
    tgt_len = torch.tensor([6, 2, 1, 0, 4], device=device)
    model.train()
    Y, _ = model(src, tgt, src_len)
    if backend == "cpp":  # the fused loss op itself, whether or not auto would pick it yet
        from seq2seq_fast.backends import cpp_ops

        loss = cpp_ops.masked_ce_loss(Y, tgt, tgt_len)
    else:
        loss = sf.MaskedSoftmaxCELoss()(Y, tgt, tgt_len)
    loss.sum().backward()
    model.eval()
    with torch.no_grad():
        tokens = sf.greedy_decode(model, src, src_len, bos=1, eos=2, max_len=S)
    if device != "cpu":
        torch.cuda.synchronize()
    print(f"exercised every op on {device} with backend {backend}: loss ok, greedy {tuple(tokens[0].shape)}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--no-build", action="store_true", help="skip the build stage (reuse the built extension)")
    parser.add_argument("--exercise-ops", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--device", default="cuda", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.exercise_ops:
        exercise_ops(args.device)
        return 0

    stages = [s for s in os.environ.get("GPU_CHECK_STAGES", ",".join(STAGES)).split(",") if s]
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        parser.error(f"GPU_CHECK_STAGES: unknown stages {unknown}, expected some of {STAGES}")
    if args.no_build:
        stages = [s for s in stages if s != "build"]

    class Ctx:
        pass

    ctx = Ctx()
    ctx.out = os.path.abspath(os.environ.get("GPU_CHECK_OUT", os.path.join(ROOT, "gpu-out")))
    os.makedirs(ctx.out, exist_ok=True)
    ctx.log = Log(os.path.join(ctx.out, "gpu-check.log"))
    try:
        ctx.limits = limits(os.environ.get("GPU_CHECK_LIMITS", ""))
    except ValueError as exc:
        parser.error(str(exc))
    ctx.python = sys.executable
    ctx.tables = []
    ctx.gpu = gpu()
    ctx.log(f"== gpu-check {datetime.datetime.now().isoformat(timespec='seconds')}: stages {','.join(stages)}; "
            f"device {ctx.gpu[0] + ' (sm ' + ctx.gpu[1] + ')' if ctx.gpu else 'none (no CUDA device)'}")
    results = []
    for name in stages:
        start = time.monotonic()
        ctx.log(f"== stage {name}")
        status, note = globals()[f"stage_{name.replace('-', '_')}"](ctx)
        results.append((name, status, note, time.monotonic() - start))
        ctx.log(f"== stage {name}: {status.upper()} ({note})")

    summary = ["# gpu-check", "", f"- device: {ctx.gpu[0] if ctx.gpu else 'none'}", "",
               "| stage | result | seconds | note |", "|---|---|---|---|"]
    summary += [f"| {n} | {s} | {t:.0f} | {note} |" for n, s, note, t in results]
    for name, path in ctx.tables:
        if os.path.exists(path):
            with open(path) as f:
                summary += ["", f"## {name}", "", f.read()]
    with open(os.path.join(ctx.out, "summary.md"), "w") as f:
        f.write("\n".join(summary) + "\n")
    skipped = [n for n, s, _, _ in results if s == "skipped"]
    failed = [n for n, s, _, _ in results if s == "failed"]
    ctx.log(f"== gpu-check done: passed {[n for n, s, _, _ in results if s == 'passed']}, skipped {skipped}, "
            f"failed {failed}; wrote {ctx.out}/summary.md, gpu-check.log")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
