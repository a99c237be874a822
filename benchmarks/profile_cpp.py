"""Quick timings of the ``cpp`` backend against the reference (d2l) modules, one process.

Runs the backend functions directly on reference modules (same weights by construction), so it
needs only the extension and ``seq2seq_fast.reference``. The official numbers come from the
benchmark runner; this is the engineer's profile.

    .venv/bin/python -m benchmarks.profile_cpp --configs zh large --reps 20 --threads 1 --cpu-time
"""
import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import workloads as W  # noqa: E402
from configs import CONFIGS  # noqa: E402
from workloads import BOS, EOS  # noqa: E402
from seq2seq_fast.backends import cpp_ops as C  # noqa: E402
from seq2seq_fast import reference as R  # noqa: E402


def median_ms(fn, reps, warmup=3, clock=time.perf_counter):
    """Median milliseconds of ``fn()``; ``clock=time.process_time`` counts this process's CPU time,
    steadier than wall time on a machine shared with other jobs (equal to it with one thread)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start = clock()
        fn()
        times.append(clock() - start)
    return 1e3 * statistics.median(times)


def build(cfg):
    """The runner's reference model and inputs for ``cfg``, on the CPU."""
    return W.reference_model(cfg, "cpu"), W.inputs(cfg, "cpu")


def workloads(net, cfg, data):
    enc, dec = net.encoder, net.decoder
    loss_fn = R.MaskedSoftmaxCELoss()
    bos = torch.full((cfg.batch, 1), BOS, dtype=torch.long)
    dec_input = torch.cat([bos, data["tgt"][:, :-1]], dim=1)
    enc_bth = data["enc_outputs"].permute(1, 0, 2)

    def ref_forward():
        net.eval()
        with torch.no_grad():
            state = dec.init_state((data["enc_outputs"], data["hidden"]), data["src_len"])
            return dec(data["tgt"], state)[0]

    def cpp_forward():
        net.eval()
        with torch.no_grad():
            kp = dec.attention.W_k(enc_bth)
            return C.decoder_forward(dec, data["tgt"], enc_bth, data["hidden"], data["src_len"], kp)[0]

    def ref_train():
        net.train()
        net.zero_grad(set_to_none=True)
        Y, _ = net(data["src"], dec_input, data["src_len"])
        loss_fn(Y, data["tgt"], data["tgt_len"]).sum().backward()

    def cpp_train():
        net.train()
        net.zero_grad(set_to_none=True)
        out, state = C.encoder_forward(enc, data["src"])
        values = out.permute(1, 0, 2)
        kp = dec.attention.W_k(values)
        Y, _, _ = C.decoder_forward(dec, dec_input, values, state, data["src_len"], kp)
        loss_fn(Y, data["tgt"], data["tgt_len"]).sum().backward()

    greedy = W.reference_greedy(net, cfg, data)

    def ref_greedy():
        net.eval()  # the train workloads above switch it back
        return greedy()

    def cpp_greedy():
        net.eval()
        with torch.no_grad():
            out, state = C.encoder_forward(enc, data["src"])
            values = out.permute(1, 0, 2)
            kp = dec.attention.W_k(values)
            return C.greedy_loop(dec, values, state, data["src_len"], kp, bos=BOS, eos=EOS,
                                 max_len=cfg.tgt_steps, return_attention=False)[0]

    return {
        "decoder_forward": (ref_forward, cpp_forward),
        "train_step": (ref_train, cpp_train),
        "greedy_decode": (ref_greedy, cpp_greedy),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=["zh", "large"], choices=sorted(CONFIGS))
    parser.add_argument("--workloads", nargs="+", default=["decoder_forward", "train_step", "greedy_decode"])
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--cpu-time", action="store_true",
                        help="time with process CPU time instead of wall time (use with --threads 1)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    clock = time.process_time if args.cpu_time else time.perf_counter
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"clock {'process CPU time' if args.cpu_time else 'wall'}")
    print(f"{'config':6} {'workload':16} {'reference ms':>13} {'cpp ms':>9} {'speedup':>8}")
    for name in args.configs:
        cfg = CONFIGS[name]
        net, data = build(cfg)
        reps = args.reps if name != "large" else max(3, args.reps // 4)
        for workload, (ref, fast) in workloads(net, cfg, data).items():
            if workload not in args.workloads:
                continue
            t_ref = median_ms(ref, reps, clock=clock)
            t_fast = median_ms(fast, reps, clock=clock)
            print(f"{name:6} {workload:16} {t_ref:13.3f} {t_fast:9.3f} {t_ref / t_fast:7.1f}x", flush=True)


if __name__ == "__main__":
    main()
