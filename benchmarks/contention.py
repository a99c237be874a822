"""A busy machine must not halve the job (``runner.py --contend``): the zh training step on 1
and on 2 threads (the reference's and this package's modules' forward, loss and backward, and
the package's whole trainer step), on a quiet machine and with one competing CPU-bound process, which this
module starts itself (a bounded busy loop, killed when the rows are measured).

The pass mark: with the competitor running, the 2-thread step takes at most 1.1x the 1-thread
step (a thread that shares its core with the competitor must not hold up the other), and on a
quiet machine 2 threads are no slower than 1.

    python benchmarks/contention.py [--impls reference,cpp] [--rounds 9]
"""
import argparse
import contextlib
import statistics
import subprocess
import sys

import torch

import workloads as W
from seq2seq_fast.tools.train import Seq2SeqTrainer
from configs import CONFIGS
from timing import interleaved_samples

BUSY_SECONDS = 600  # the competitor's own deadline, should this process die before killing it


@contextlib.contextmanager
def competing_process():
    """One other CPU-bound process (a Python busy loop, not pinned) for the duration."""
    code = f"import time\nend = time.time() + {BUSY_SECONDS}\nwhile time.time() < end:\n    pass\n"
    busy = subprocess.Popen([sys.executable, "-c", code])
    try:
        yield busy
    finally:
        busy.kill()
        busy.wait()


def _at_threads(fn, threads):
    def run():
        torch.set_num_threads(threads)
        fn()
    return run


def trainer_step(reference, cfg, data):
    """The package's whole training step (``Seq2SeqTrainer.train_step``: forward, loss,
    backward, clipping, Adam) on the cpp backend, from the reference's weights."""
    trainer = Seq2SeqTrainer(W.make_model("cpp", reference, cfg), bos=W.BOS, lr=0.005, init_weights=False)
    batch = (data["src"], data["src_len"], data["tgt"], data["tgt_len"])
    return lambda: trainer.train_step(batch)


def step_samples(impl, rounds, config="zh"):
    """{(threads, busy): [seconds per step, one per round]} of ``impl``'s training step."""
    cfg = CONFIGS[config]
    reference = W.reference_model(cfg, "cpu")
    data = W.inputs(cfg, "cpu")
    if impl == "trainer":
        step = trainer_step(reference, cfg, data)
    else:
        step = W.build("train_step", impl, reference, cfg, data)
    fns = {threads: _at_threads(step, threads) for threads in (1, 2)}
    samples = {}
    for busy in (False, True):
        with competing_process() if busy else contextlib.nullcontext():
            got = interleaved_samples(fns, rounds=rounds, round_time=0.2, warmup=3)
        samples.update({(threads, busy): times for threads, times in got.items()})
    torch.set_num_threads(2)
    return samples


def contention_rows(impls, rounds, config="zh", log=print):
    """Rows: per implementation and machine state, the 1- and 2-thread step and their ratio."""
    rows = []
    for impl in impls:
        samples = step_samples(impl, rounds, config)
        for busy in (False, True):
            one, two = (statistics.median(samples[(threads, busy)]) for threads in (1, 2))
            rows.append(dict(section="contention", config=config, dtype="float32", workload="train_step",
                             impl=impl, machine="one competing process" if busy else "quiet",
                             one_thread_s=one, two_threads_s=two, ratio=two / one,
                             passes=two <= (1.1 if busy else 1.0) * one))
        log(table(rows[-2:]))
    return rows


def table(rows):
    lines = [f"{'impl':10} {'machine':22} {'1 thread ms':>12} {'2 threads ms':>13} {'2t / 1t':>8}  pass"]
    for r in rows:
        lines.append(f"{r['impl']:10} {r['machine']:22} {r['one_thread_s'] * 1e3:12.3f} "
                     f"{r['two_threads_s'] * 1e3:13.3f} {r['ratio']:8.2f}  {'yes' if r['passes'] else 'NO'}")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--impls", default="reference,cpp,trainer",
                        help="reference and cpp: forward, loss and backward through the modules (the "
                             "train_step workload); trainer: the package's whole step")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--config", default="zh", choices=sorted(CONFIGS))
    args = parser.parse_args(argv)
    contention_rows(args.impls.split(","), args.rounds, args.config)
    return 0


if __name__ == "__main__":
    sys.exit(main())
