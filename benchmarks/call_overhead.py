"""Python overhead of a module call over the raw op, and step-by-step decoding through the module.

d2l zh setting, CPU, eval mode, no gradient. Three measurements, each as medians of many
interleaved pairs (the two sides alternate call by call, so a drifting machine touches both):

* ``forward``: ``decoder(X, state)`` with X (B, S = 10) against
  ``torch.ops.seq2seq_fast.decoder_forward`` on the same prepared arguments (state's key
  projection already cached, so both sides do the same arithmetic), each side holding its
  outputs until its next call as a caller does;
* ``step``: the same with X (B, 1), one incremental step as d2l's ``predict_seq2seq`` makes;
  for both, also the module call with the op answered at once from a saved result: its Python
  path alone (the pairs' difference adds what the op loses to caches that Python code, any
  Python code, leaves cold between calls: back-to-back raw op calls keep them warm);
* ``decode``: S one-step calls ``Y, state = decoder(X, state); X = Y.argmax(2)`` through the
  module against the same loop through d2l's reference decoder.

Each also through the module's long path (``nn.Module.__call__`` and ``forward``: a decoder
whose calls are never planned, seq2seq_fast/ops/call_plan.py), against the op or the planned
module in the same way: what the plan saves.

    python benchmarks/call_overhead.py [--pairs 2000] [--threads N] [--json out.json]
"""
import argparse
import copy
import json
import os
import statistics
import sys
import time
from unittest import mock

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from configs import CONFIGS  # noqa: E402
from workloads import fast_model, inputs, reference_model  # noqa: E402

from seq2seq_fast import Seq2SeqAttentionDecoder  # noqa: E402
from seq2seq_fast.backends import cpp_ops  # noqa: E402


def interleaved_pairs(first, second, pairs, warmup=50):
    """Median seconds of ``first()`` and of ``second()``, called alternately ``pairs`` times."""
    for _ in range(warmup):
        first()
        second()
    a, b = [], []
    clock = time.perf_counter
    for _ in range(pairs):
        t0 = clock()
        first()
        t1 = clock()
        second()
        t2 = clock()
        a.append(t1 - t0)
        b.append(t2 - t1)
    return statistics.median(a), statistics.median(b)


def raw_op_call(decoder, X, state):
    """A closure calling the decoder op directly on what ``decoder(X, state)`` hands it.

    Like the module's caller, it holds each call's outputs until its next call returns: a result
    dropped at once would hand its memory, still in cache, to the next call, which the module's
    outputs (held by its caller, its state and its attention weights) cannot do. That difference
    is where the memory goes, not Python: 5 us of a step and over 100 us of a 10-step call on
    this package's CPU VM when the raw op dropped its outputs."""
    values, key_proj = state.key_cache.values, state.key_cache.key_proj
    hidden, lens = state[1], state[2]
    params = cpp_ops.decoder_params(decoder)
    op = torch.ops.seq2seq_fast.decoder_forward
    held = [None]

    def call():
        held[0] = op(X, values, hidden, lens, key_proj, params, None, None, False)
    return call


def module_call(decoder, X, state):
    """A closure calling ``decoder(X, state)`` and holding what it returns until its next call."""
    held = [None]

    def call():
        held[0] = decoder(X, state)
    return call


class _SavedOps:
    """Stands in for ``torch.ops.seq2seq_fast`` and answers ``decoder_call`` (the op a module
    call reaches: ``decoder_forward`` and its output views, csrc/autograd.cpp) at once with
    one saved result: a module call through it costs its Python alone."""

    def __init__(self, result):
        self.result = result

    def decoder_call(self, *args):
        return self.result


def python_path_seconds(decoder, X, state, calls=2000):
    """Median seconds of ``decoder(X, state)`` with the op stubbed out (its Python path alone)."""
    stub = _SavedOps(torch.ops.seq2seq_fast.decoder_call(
        X, state.key_cache.values, state[1], state[2], state.key_cache.key_proj, cpp_ops.decoder_params(decoder),
        None, None))
    # The decoder's plan of its next calls (seq2seq_fast/ops/call_plan.py) holds the op it was
    # made with: made anew under the stub, and dropped after.
    decoder.__dict__["_call_plan"] = None
    try:
        with mock.patch.object(cpp_ops, "_ops", lambda: stub), \
                mock.patch.object(cpp_ops, "decoder_call_op", lambda: stub.decoder_call):
            return median_seconds(lambda: decoder(X, state), calls)
    finally:
        decoder.__dict__["_call_plan"] = None


def median_seconds(call, calls, warmup=50):
    for _ in range(warmup):
        call()
    times = []
    clock = time.perf_counter
    for _ in range(calls):
        t0 = clock()
        call()
        times.append(clock() - t0)
    return statistics.median(times)


class _Unplanned(Seq2SeqAttentionDecoder):
    """The decoder with ``nn.Module.__call__``: every call takes the long path."""

    __call__ = torch.nn.Module.__call__


def unplanned(decoder):
    """``decoder`` (a shallow copy: its submodules and weights, which the extension's weight
    cache keeps packed once) with calls that are never planned."""
    copied = copy.copy(decoder)
    copied.__class__ = _Unplanned
    return copied


def measure(pairs, steps_decode):
    cfg = CONFIGS["zh"]
    torch.manual_seed(0)
    ref = reference_model(cfg, "cpu").eval()
    fast = fast_model(ref, cfg, "cpp").eval()
    long_path = unplanned(fast.decoder)
    data = inputs(cfg, "cpu")
    enc = (data["enc_outputs"], data["hidden"])
    lens = data["src_len"]
    out = {}
    with torch.inference_mode():
        for name, steps in (("forward", cfg.tgt_steps), ("step", 1)):
            X = data["tgt"][:, :steps].contiguous()
            state = fast.decoder.init_state(enc, lens)
            _, state = fast.decoder(X, state)  # fills the key cache the next calls reuse
            state = type(state)([state[0], enc[1], state[2]], state.key_cache)
            module_s, op_s = interleaved_pairs(module_call(fast.decoder, X, state), raw_op_call(fast.decoder, X, state),
                                               pairs)
            python_s = python_path_seconds(fast.decoder, X, state, pairs)
            long_s, long_op_s = interleaved_pairs(module_call(long_path, X, state),
                                                  raw_op_call(fast.decoder, X, state), pairs)
            out[name] = {"module_us": module_s * 1e6, "op_us": op_s * 1e6, "overhead_us": (module_s - op_s) * 1e6,
                         "python_path_us": python_s * 1e6, "long_path_overhead_us": (long_s - long_op_s) * 1e6}

        bos = data["tgt"][:, :1].contiguous()

        def decode(decoder):
            def run():
                state = decoder.init_state(enc, lens)
                X = bos
                for _ in range(steps_decode):
                    Y, state = decoder(X, state)
                    X = Y.argmax(dim=2)
            return run

        rounds = max(20, pairs // 50)
        ref_s, fast_s = interleaved_pairs(decode(ref.decoder), decode(fast.decoder), rounds, warmup=5)
        long_s, planned_s = interleaved_pairs(decode(long_path), decode(fast.decoder), rounds, warmup=5)
        out["decode"] = {"reference_us_per_step": ref_s / steps_decode * 1e6,
                         "module_us_per_step": fast_s / steps_decode * 1e6, "speedup": ref_s / fast_s,
                         "long_path_over_planned": long_s / planned_s, "steps": steps_decode}
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=2000, help="interleaved pairs per measurement")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--json", default=None, help="also write the figures here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    result = measure(args.pairs, CONFIGS["zh"].tgt_steps)
    result["threads"] = torch.get_num_threads()
    for name in ("forward", "step"):
        r = result[name]
        print(f"{name:8s} module {r['module_us']:8.1f} us   op {r['op_us']:8.1f} us   overhead {r['overhead_us']:6.1f} us"
              f"   (Python path alone {r['python_path_us']:5.1f} us; long path's overhead"
              f" {r['long_path_overhead_us']:5.1f} us)")
    d = result["decode"]
    print(f"decode   reference {d['reference_us_per_step']:8.1f} us/step   module {d['module_us_per_step']:8.1f} us/step"
          f"   speedup {d['speedup']:.2f}x  ({d['steps']} one-step calls, batch {CONFIGS['zh'].batch};"
          f" the long path takes {d['long_path_over_planned']:.3f}x the planned calls' time)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
