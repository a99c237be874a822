"""The benchmark runner: ``make bench`` (a representative set, a few minutes) and ``make
bench-full`` (everything). Two sections, each a table of groups (one configuration, dtype and
workload): the whole model, and the additive attention alone. Every group times the d2l
reference, what a user would try instead (torch.compile), the backends, and ends with the
floor, a lower bound on the time (benchmarks/floor.py). The whole model also runs under
bfloat16 autocast (dtype autocast-bf16), in a table of its own. Prints the machine and what
runs, each group as it is done, then the tables; writes results.md, results.json and speedups.png.

    python benchmarks/runner.py [--full] [--configs zh,large] [--workloads ...] [--impls ...]
"""
import argparse
import json
import logging
import os
import sys
import time

# Inductor compiles in a pool of worker processes that linger and steal the cores from the
# rows timed after a compiled one: compile in this process instead. Set before torch is imported.
os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")


class _NoGpuIsExpected(logging.Filter):
    """Drops torch's "No CUDA runtime is found, using CUDA_HOME=..." warning, which inductor's
    CPU compiles trigger on a machine with a CUDA toolkit and no GPU: a CPU run expects none."""

    def filter(self, record):
        return not record.getMessage().startswith("No CUDA runtime is found")


# The logger exists before torch.utils.cpp_extension (which warns once, at import) is imported.
logging.getLogger("torch.utils.cpp_extension").addFilter(_NoGpuIsExpected())

import torch  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import seq2seq_fast as sf  # noqa: E402
from seq2seq_fast.ops.dispatch import BACKEND_NAMES  # noqa: E402
import attention_bench as A  # noqa: E402
import chapter_bench  # noqa: E402
import contention  # noqa: E402
import train_memory  # noqa: E402
import report  # noqa: E402
import selection as S  # noqa: E402
import workloads as W  # noqa: E402
from configs import CONFIGS, SMOKE  # noqa: E402
from floor import FloorWork  # noqa: E402
from machine import bf16_units, machine_info  # noqa: E402
from peak_memory import train_step_peak  # noqa: E402
from rows import failing, group_rows, time_group, under_floor  # noqa: E402

IMPLEMENTATIONS = """\
implementations:
  model section:     reference          d2l's modules, eager (seq2seq_fast.reference)
                     reference+compile  the same under torch.compile (float32 only)
                     torch, cpp, triton the backends of seq2seq_fast (triton: CUDA only)
                     cpp+graph, triton+graph   the decoder replayed as a CUDA graph (CUDA, decoder_forward)
  attention section: reference          d2l's AdditiveAttention module (projects queries and keys per call)
                     hoisted            d2l's attention math from projected queries and keys
                     hoisted+compile    the same under torch.compile
                     triton             the fused Triton kernel (CUDA only)
  both:              best               the fastest backend on the device (model: cpp, else triton on
                                        CUDA, else torch; attention: triton)
  every group ends with a floor row (not an implementation: a lower bound on the time).
  --dtypes autocast-bf16 (model section): model and inputs in float32, called under
  torch.autocast(dtype=torch.bfloat16); the training step's backward outside it (torch's AMP recipe).
  Each group: reference in float32 without autocast (the base of its speedups), reference+autocast
  (the reference under autocast), each selected backend under autocast, and the floor with its GEMMs
  run in bfloat16 (the logits' bytes at bfloat16 size); torch.compile is not run under autocast."""

RUNS = """\
make bench:      --configs zh,large, every workload, --impls reference,reference+compile,hoisted+compile,best,
                 float32, and under autocast-bf16 the large decoder_forward group only;
                 the book end to end: train_seq2seq over 10 epochs, predict_seq2seq
make bench-full: --full: every configuration, workload and implementation, in float32 and under autocast-bf16,
                 the training step's memory (and the fused output layer's, large setting), the book end
                 to end over 250 epochs, and --contend
(--dtypes given: every selected configuration and workload in each of its dtypes)"""

# --dtypes names run under torch.autocast (model and inputs in float32) -> the autocast dtype.
AUTOCAST_DTYPES = {S.AUTOCAST: torch.bfloat16}
AUTOCAST_REFERENCE = "reference+autocast"
AUTOCAST_BASE_NOTE = "float32, not under autocast: the group's base; the bfloat16 floor does not bound it"

CHAPTER_EPOCHS = {"default": 10, "full": 250}


def best_backend(device_type):
    for name in ("cpp", "triton", "torch"):
        if (sf.unavailable_reason(name, device_type) is None
                and not (name == "triton" and device_type != "cuda")):
            return name
    return "torch"


def model_impls(device, requested):
    """``(implementations to time, {implementation: why it does not run here})``."""
    device_type = torch.device(device).type
    impls, skipped = [], {}
    for impl in requested:
        impl = best_backend(device_type) if impl == S.BEST else impl
        backend, _, graph = impl.partition("+")
        reason = None
        if graph == "graph" and device_type != "cuda":
            reason = "CUDA graphs need a CUDA device"
        elif backend in BACKEND_NAMES:
            reason = sf.unavailable_reason(backend, device_type)
            if backend == "triton" and device_type != "cuda":
                reason = "on a CPU Triton runs only under its interpreter, which says nothing about speed"
        if reason:
            skipped[impl] = reason
        elif impl not in impls:
            impls.append(impl)
    return impls, skipped


def _applies(impl, workload, dtype):
    """Whether a row of ``impl`` exists: CUDA graphs replay inference (decoder_forward) only;
    the compiled reference is timed in float32 only (its compile time dominates a short run)."""
    if impl.endswith("+graph"):
        return workload == "decoder_forward"
    return impl != "reference+compile" or dtype == torch.float32


def _precision(dtype_name):
    """``(dtype of model and inputs, autocast dtype or None)`` of a --dtypes name."""
    autocast = AUTOCAST_DTYPES.get(dtype_name)
    return (torch.float32 if autocast else getattr(torch, dtype_name)), autocast


def _builds(impls, workload, dtype, autocast):
    """{row's implementation: (implementation, autocast dtype or None)} of a group; under
    autocast every row runs under it except the reference, which also runs under it as
    ``reference+autocast``."""
    applying = [impl for impl in impls if _applies(impl, workload, autocast or dtype)]
    if autocast is None:
        return {impl: (impl, None) for impl in applying}
    builds = {}
    if "reference" in applying:
        builds = {"reference": ("reference", None), AUTOCAST_REFERENCE: ("reference", autocast)}
    return {**builds, **{impl: (impl, autocast) for impl in applying if impl != "reference"}}


def _step_memory(config_name, impl, device, log):
    """Memory of a float32 training step in a subprocess of its own."""
    try:
        mem = train_step_peak(config_name, impl, device)
    except RuntimeError as exc:
        log(f"  {config_name}/train_step/{impl}: memory not measured ({exc})")
        return {}
    return dict(peak_mib=mem["peak_bytes"] / 2**20, step_mib=mem["step_bytes"] / 2**20)


def _floor_work(workload, cfg, reference, data, device, dtype, autocast=None):
    """The floor of a group; under ``autocast`` its GEMMs run in the autocast dtype and in
    ``dtype``, the faster counting."""
    rows = None
    if workload == "greedy_decode":  # the steps, and rows per step, a greedy decoding really runs
        rows = W.greedy_rows(W.reference_greedy(reference, cfg, data, autocast)())
    return FloorWork(W.workload_gemms(workload, cfg, rows), W.workload_bytes(workload, cfg, reference, autocast),
                     device, (autocast, dtype) if autocast else dtype)


def model_rows(configs, workloads, impls, device, dtype_name, min_time, memory, log):
    """Rows of the whole model: every implementation of ``impls`` on every configuration and
    workload in the --dtypes name ``dtype_name`` (under autocast: see ``_builds``); memory of
    the float32 training step (not compiled, not under autocast) when ``memory``."""
    rows = []
    dtype, autocast = _precision(dtype_name)
    for config_name, cfg in configs.items():
        reference = W.reference_model(cfg, device, dtype)
        data = W.inputs(cfg, device, dtype)
        for workload in workloads:
            callables = {}
            for name, (impl, amp) in _builds(impls, workload, dtype, autocast).items():
                try:
                    callables[name] = W.build(workload, impl, reference, cfg, data, amp)
                except Exception as exc:  # a row that cannot run says why instead of stopping the run
                    callables[name] = failing(exc)
            work = _floor_work(workload, cfg, reference, data, device, dtype, autocast)
            base = {"reference": AUTOCAST_BASE_NOTE} if autocast else {}
            times, notes, bound = time_group(callables, device, min_time, work, base)
            del work  # its operands
            extra = {impl: dict(bounded=False) for impl in base}  # float32, under a bfloat16 floor
            if memory and workload == "train_step" and dtype_name == "float32" and config_name in CONFIGS:
                extra = {impl: _step_memory(config_name, impl, device, log) for impl in times
                         if impl != "reference+compile" and times[impl] is not None}
            group = group_rows("model", config_name, dtype_name, workload, times, notes, bound, extra)
            log(report.table(group))
            rows += group
    return rows


def _parser():
    names = "\n".join(f"  --{option}: {S.valid_names(option)}" for option in S.NAMES)
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"valid names (any case; a filter keeps, in each section, the names it has there):\n{names}\n\n"
               f"{IMPLEMENTATIONS}\n\n{RUNS}")
    parser.add_argument("--full", action="store_true", help="every configuration, workload and implementation")
    parser.add_argument("--configs", help="comma-separated configurations (default: zh,large)")
    parser.add_argument("--workloads", help="comma-separated workloads (default: all)")
    parser.add_argument("--impls", help="comma-separated implementations (default: "
                                        f"{','.join(S.DEFAULT['impls'])})")
    parser.add_argument("--dtypes", help="comma-separated dtypes of model and inputs (default: float32, and "
                                         f"{S.AUTOCAST} as make bench and make bench-full below say); "
                                         f"{S.AUTOCAST}: float32 under bfloat16 autocast (model section)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's own)")
    parser.add_argument("--no-compile", action="store_true", help="leave out the torch.compile rows")
    parser.add_argument("--no-attention", action="store_true", help="leave out the attention section")
    parser.add_argument("--no-chapter", action="store_true",
                        help="leave out the book end to end (train_seq2seq and predict_seq2seq, CPU)")
    parser.add_argument("--chapter-epochs", type=int, help="epochs per train_seq2seq call (default: 10; --full: 250)")
    parser.add_argument("--contend", action=argparse.BooleanOptionalAction, default=None,
                        help="the zh training step on 1 and 2 threads, quiet and with a competing process "
                             "(default: with --full, on CPU)")
    parser.add_argument("--memory", action=argparse.BooleanOptionalAction, default=None,
                        help="the training step's memory, each implementation in a subprocess (default: with --full)")
    parser.add_argument("--min-time", type=float, default=0.5, help="about the seconds of timed rounds per group")
    parser.add_argument("--smoke", action="store_true", help="one tiny configuration, to check that the runner works")
    parser.add_argument("--out", default="bench-out", help="folder for results.md, results.json, speedups.png")
    return parser


def _plan(args, parser):
    """``(selection, {section: its names}, {section: {impl: why skipped}})``, or exit with the
    valid names when a filter names something unknown."""
    try:
        sel = S.select(full=args.full, configs=args.configs, workloads=args.workloads, impls=args.impls,
                       dtypes=args.dtypes)
    except S.SelectionError as exc:
        parser.error(str(exc))
    sections, skipped = {}, {}
    for section in ("model", "attention"):
        part = sel.for_section(section)
        if args.no_compile:
            part["impls"] = tuple(i for i in part["impls"] if not i.endswith("+compile"))
        runs = sel.runs(section)
        if args.smoke:
            part["configs"] = ("smoke",)
            runs = {dtype: (("smoke",) if configs else (), workloads) for dtype, (configs, workloads) in runs.items()}
        part["runs"] = runs
        if section == "model":
            part["impls"], skipped[section] = model_impls(args.device, part["impls"])
        else:
            part["impls"], skipped[section] = A.runnable_impls(args.device, part["impls"])
        sections[section] = part
    if args.no_attention:
        sections["attention"] = None
    return sel, sections, skipped


def _dtype_names(part):
    """A section's dtypes, each run on fewer configurations or workloads than the section's
    with those it runs."""
    names = []
    for dtype, (configs, workloads) in part["runs"].items():
        if (configs, workloads) == (part["configs"], part["workloads"]):
            names.append(dtype)
        elif configs and workloads:
            names.append(f"{dtype} ({', '.join(configs)}; {', '.join(workloads)} only)")
        else:
            names.append(f"{dtype} (not run with these filters)")
    return names


def _plan_lines(sections, skipped):
    lines = []
    options = ("configs", "workloads", "impls", "dtypes")
    for section, part in sections.items():
        empty = part is None or not all(part[o] for o in options)
        if empty:
            lines.append(f"{section} section: not run (" + ("--no-attention" if part is None else
                         "the filters leave it no " + ", ".join(o for o in options if not part[o])) + ")")
            continue
        lines.append(f"{section} section: configs {', '.join(part['configs'])}; workloads "
                     f"{', '.join(part['workloads'])}; implementations {', '.join(part['impls'])}, floor; "
                     f"dtypes {', '.join(_dtype_names(part))}")
        lines += [f"  not run here: {impl}: {why}" for impl, why in skipped[section].items()]
    return lines


def main(argv=None):
    parser = _parser()
    args = parser.parse_args(argv)
    sel, sections, skipped = _plan(args, parser)
    if args.threads:
        torch.set_num_threads(args.threads)
    memory = args.full if args.memory is None else args.memory
    started = time.perf_counter()
    info = machine_info(args.device)
    plan = _plan_lines(sections, skipped)
    print(report.header(info, plan), flush=True)
    clock = [time.perf_counter()]

    def log(text):
        now = time.perf_counter()
        print(f"\n{text}\n({now - clock[0]:.0f} s)", flush=True)
        clock[0] = now

    model, attention = sections["model"], sections["attention"]
    configs = {"smoke": SMOKE} if args.smoke else {n: CONFIGS[n] for n in model["configs"]}
    shapes = {"smoke": A.SMOKE_SHAPE} if args.smoke else {n: A.ATTENTION_SHAPES[n] for n in (attention or {}).get(
        "configs", ())}
    rows = []
    for name in sel.dtypes:
        if name in model["runs"] and model["impls"]:
            names, workloads = model["runs"][name]
            rows += model_rows({n: configs[n] for n in names}, workloads, model["impls"], args.device, name,
                               args.min_time, memory, log)
        if attention and name in attention["runs"] and attention["impls"]:
            names, workloads = attention["runs"][name]
            rows += A.attention_rows(args.device, {n: shapes[n] for n in names}, workloads, attention["impls"],
                                     getattr(torch, name), args.min_time, log=lambda group: log(report.table(group)))
    if not args.no_chapter and not args.smoke and torch.device(args.device).type == "cpu":
        epochs = args.chapter_epochs or CHAPTER_EPOCHS["full" if args.full else "default"]
        rows += chapter_bench.chapter_rows(epochs, rounds=3, log=lambda group: log(report.table(group)))
    fused = None
    if memory and not args.smoke and "large" in model["configs"]:
        fused = train_memory.fused_comparison("large", args.device, rounds=3, per_round=2)
        log(train_memory.table(fused))
    contended = []
    if (args.full if args.contend is None else args.contend) and torch.device(args.device).type == "cpu":
        contended = contention.contention_rows(["reference", "cpp", "trainer"], rounds=9, log=log)
    elapsed = time.perf_counter() - started
    below = under_floor(rows)
    check = ("every measured row is at or above its floor" if not below else
             "UNDER THE FLOOR (a rate the floor used was measured too low): "
             + "; ".join(f"{r['section']} {r['config']} {r['workload']} {r['impl']}" for r in below))
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(dict(machine=info, plan=plan, rows=rows, contention=contended, fused_output_layer=fused,
                       seconds=elapsed, under_floor=len(below),
                       configs={n: c.as_dict() for n, c in configs.items()}, attention_shapes=shapes), f, indent=2)
    # (title, the line over the table or "", rows)
    tables = [("The whole model", "", [r for r in rows if r["section"] == "model" and r["dtype"] != S.AUTOCAST]),
              ("The whole model under bfloat16 autocast", bf16_units(info),
               [r for r in rows if r["dtype"] == S.AUTOCAST]),
              ("Attention alone", "", [r for r in rows if r["section"] == "attention"]),
              ("The book end to end (zh setting, CPU)", "", [r for r in rows if r["section"] == "chapter"])]
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write("# seq2seq_fast benchmark\n\n" + "\n".join(f"- {k}: {v}" for k, v in info.items()) + "\n\n")
        f.write("\n".join(f"  - {line.strip()}" if line.startswith(" ") else f"- {line}" for line in plan))
        f.write("\n\n" + report.EXPLANATION + "\n")
        for title, lead, part in tables:
            if part:
                lead = f"{lead}\n\n" if lead else ""
                f.write(f"\n## {title}\n\n{lead}{report.table(part, markdown=True)}\n")
        if fused:
            f.write(f"\n## The fused output layer + loss (training step)\n\n```\n{train_memory.table(fused)}\n```\n")
        if contended:
            f.write(f"\n## A busy machine (zh training step)\n\n```\n{contention.table(contended)}\n```\n")
        f.write(f"\n{check}. Run took {elapsed:.0f} s.\n")
    if rows:
        report.plot(rows, os.path.join(args.out, "speedups.png"))
    for title, lead, part in tables:
        if part:
            print(f"\n== {title}\n" + (f"{lead}\n" if lead else "") + report.table(part))
    if contended:
        print(f"\n== A busy machine (zh training step)\n{contention.table(contended)}")
    print(f"\n{check}.\nrun took {elapsed:.0f} s; wrote {args.out}/results.md, results.json"
          + (", speedups.png" if rows else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
