"""``python -m seq2seq_fast {bench,demo,train,translate}`` (also installed as ``seq2seq-fast``).

bench      run the benchmark runner of a source checkout (benchmarks/runner.py)
demo       train on the built-in date task, print translations, BLEU, exact match, save a heatmap
train      train on the date task or a d2l fra.txt, writing a checkpoint with the vocabularies
translate  translate lines from stdin or a file with a checkpoint, greedy or beam search

Errors end in one line on stderr and exit status 1 (2 for a bad option, 130 when interrupted);
--debug shows the traceback instead.
"""
import argparse
import os
import sys

import torch

from seq2seq_fast.tools.commands import TRAIN_STEPS, CliError, cmd_bench, cmd_demo, cmd_train, cmd_translate


class _Parser(argparse.ArgumentParser):
    """Reports a bad option in one line (argparse prints the whole usage first)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _int_at_least(minimum):
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    return parse


def _float_where(check, expected):
    def parse(text):
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not check(value):
            raise argparse.ArgumentTypeError(f"must be {expected}, got {text}")
        return value

    return parse


def _device(text):
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"not a torch device: {text!r} (e.g. cpu, cuda, cuda:1)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{text!r}: torch sees no CUDA device here")
    return text


def _file(text):
    if not os.path.isfile(text):
        raise argparse.ArgumentTypeError(f"not a file: {text!r}" if os.path.exists(text) else f"no such file: {text!r}")
    return text


def _input_file(text):
    return text if text == "-" else _file(text)


def _nmt_data(text):
    from seq2seq_fast.tools.data import nmt_data_path

    try:
        nmt_data_path(text)
    except FileNotFoundError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def build_parser(prog="python -m seq2seq_fast"):
    parser = _Parser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--debug", action="store_true", help="on an error, show the traceback")
    sub = parser.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="on an error, show the traceback")
    backend = dict(default="auto", choices=["auto", "torch", "triton", "cpp"], help="decoder backend (default auto)")
    device = dict(type=_device, default="cpu", help="torch device, e.g. cpu or cuda (default cpu)")
    count, positive = _int_at_least(0), _int_at_least(1)

    p = sub.add_parser("bench", help="run the benchmark runner (source checkout only)", add_help=False,
                       description="Runs benchmarks/runner.py; every argument is passed on (try bench --help).")
    p.add_argument("runner_args", nargs=argparse.REMAINDER)
    p.set_defaults(func=lambda args: cmd_bench(args.runner_args))

    p = sub.add_parser("demo", parents=[common],
                       help="train on the built-in date task and show translations, BLEU, a heatmap")
    p.add_argument("--steps", type=count, default=150, help="training steps (default 150)")
    p.add_argument("--time-budget", type=_float_where(lambda v: v >= 0, "at least 0"), default=90.0,
                   help="stop training after this many seconds from the start (default 90; 0: no limit)")
    p.add_argument("--num-train", type=positive, default=20000, help="training pairs (default 20000)")
    p.add_argument("--num-test", type=positive, default=500, help="held-out pairs (default 500)")
    p.add_argument("--batch-size", type=positive, default=128, help="(default 128)")
    p.add_argument("--num-hiddens", type=positive, default=64, help="(default 64)")
    p.add_argument("--beam", type=positive, default=1, help="beam size for the translations (1: greedy)")
    p.add_argument("--samples", type=count, default=5, help="translations to print (default 5)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=count, default=0, help="torch threads (default: torch's choice)")
    p.add_argument("--heatmap", default="attention_heatmap.png",
                   help="PNG path (default ./attention_heatmap.png; '': none); needs matplotlib")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--backend", **backend)
    p.add_argument("--device", **device)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("train", parents=[common], help="train on the date task or a d2l fra.txt; writes a checkpoint")
    p.add_argument("--data", type=_nmt_data, default=None,
                   help="d2l's fra.txt (or its folder); default: the built-in date task")
    p.add_argument("--num-examples", type=positive, default=600, help="fra.txt lines to read, as d2l (default 600)")
    p.add_argument("--num-train", type=positive, default=20000, help="date task: training pairs (default 20000)")
    p.add_argument("--num-test", type=positive, default=500, help="date task: held-out pairs (default 500)")
    p.add_argument("--out", default="seq2seq_fast.pt", help="checkpoint path (default seq2seq_fast.pt)")
    p.add_argument("--resume", action="store_true", help="continue the run saved in --out")
    p.add_argument("--epochs", type=count, default=None, help="train this many epochs in all")
    p.add_argument("--steps", type=count, default=None,
                   help=f"train this many steps in all (default {TRAIN_STEPS} when --epochs is not given)")
    p.add_argument("--checkpoint-every", type=count, default=100, help="steps between checkpoints (default 100)")
    for name in ("embed-size", "num-hiddens", "num-layers", "batch-size", "num-steps"):
        p.add_argument(f"--{name}", type=positive, default=None, help="(default: the task's)")
    p.add_argument("--dropout", type=_float_where(lambda v: 0 <= v < 1, "in [0, 1)"), default=None,
                   help="(default: the task's)")
    p.add_argument("--lr", type=_float_where(lambda v: v > 0, "positive"), default=None, help="(default 0.005)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--nproc", type=positive, default=1, help="DDP processes on this machine (gloo, CPU)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--backend", **backend)
    p.add_argument("--device", **device)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("translate", parents=[common],
                       help="translate lines from stdin or a file with a train checkpoint")
    p.add_argument("input", nargs="?", type=_input_file, default=None,
                   help="text file, one sentence a line (default or '-': stdin)")
    p.add_argument("--checkpoint", type=_file, required=True, help="a checkpoint written by train")
    p.add_argument("--output", default=None, help="write here instead of stdout")
    p.add_argument("--beam", type=positive, default=1, help="beam size (1: greedy)")
    p.add_argument("--length-penalty", type=float, default=0.0, help="GNMT length penalty alpha for beam search")
    p.add_argument("--max-len", type=positive, default=None, help="longest output (default: the training num_steps)")
    p.add_argument("--backend", **backend)
    p.add_argument("--device", **device)
    p.set_defaults(func=cmd_translate)
    return parser


def _one_line(exc):
    """An unexpected exception as one line: its first (a training process's: its last) line."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()] or [type(exc).__name__]
    if isinstance(exc, torch.multiprocessing.ProcessRaisedException):
        text = f"in a training process: {lines[-1]}"
    elif isinstance(exc, (ValueError, TypeError, OSError)):
        text = lines[0]
    else:
        text = f"{type(exc).__name__}: {lines[0]}"
    return f"{text} (--debug shows the traceback)"


def main(argv=None):
    """Run the command line ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    prog = "seq2seq-fast" if os.path.basename(sys.argv[0]) == "seq2seq-fast" else "python -m seq2seq_fast"
    first = next((i for i, arg in enumerate(argv) if arg != "--debug"), len(argv))
    if argv[first:first + 1] == ["bench"]:  # everything after it, options included, belongs to the runner
        debug, command = "--debug" in argv[:first], lambda: cmd_bench(argv[first + 1:])
    else:
        args = build_parser(prog).parse_args(argv)
        debug, command = args.debug, lambda: args.func(args)
    try:
        return command()
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if debug:
            raise
        print(f"{prog}: error: {exc if isinstance(exc, CliError) else _one_line(exc)}", file=sys.stderr)
        return 1
