"""The cpp training step with the output layer and the loss fused (``EncoderDecoder.masked_ce_loss``
then ``backward()``; and ``masked_ce_loss_backward``, the same without autograd's graph, what
``Seq2SeqTrainer`` runs) against the unfused one (forward's logits + ``MaskedSoftmaxCELoss``):
peak memory and time.

Memory: each variant in a fresh subprocess (``peak_memory.py``'s measure: the growth of the
process's resident high-water mark ``VmHWM`` over its resident memory just before the first of 3
steps, so it counts every tensor the step holds at its peak, the CPU block cache included, and
nothing the model or inputs held before). Time: both variants in one process, interleaved round
by round, median of the per-round medians.

    taskset -c 1 python benchmarks/train_memory.py --config large   # prints a table and one JSON line
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
# fused-recompute: the fused step with a grad_loss that is not uniform (l * ones, contiguous), so
# the backward recomputes the logits instead of scaling the gradients made in the forward.
# own: EncoderDecoder.masked_ce_loss_backward, what Seq2SeqTrainer runs: the fused step run by
# the compiled ops without autograd's graph.
VARIANTS = ("unfused", "fused", "fused-recompute", "own")


def _step(variant, config, device, chunk_values):
    """A zero-argument training step (forward, loss, backward; no optimizer) of the cpp model."""
    sys.path.insert(0, HERE)
    import torch

    import seq2seq_fast as sf
    import workloads as W
    from configs import CONFIGS
    from seq2seq_fast.backends import cpp_ops

    if chunk_values:
        cpp_ops.LINEAR_LOSS_CHUNK_VALUES = chunk_values

    cfg = CONFIGS[config]
    model = W.make_model("cpp", W.reference_model(cfg, device), cfg)
    model.train()
    data = W.inputs(cfg, device)
    bos = torch.full((cfg.batch, 1), W.BOS, dtype=torch.long, device=device)
    dec_input = torch.cat([bos, data["tgt"][:, :-1]], dim=1)
    loss = sf.MaskedSoftmaxCELoss()
    params = list(model.parameters())
    ones = torch.ones(cfg.batch, device=device)

    def run():
        for p in params:
            p.grad = None
        if variant == "own":
            model.masked_ce_loss_backward(data["src"], dec_input, data["tgt"], data["tgt_len"], data["src_len"])
            return
        if variant.startswith("fused"):
            l = model.masked_ce_loss(data["src"], dec_input, data["tgt"], data["tgt_len"], data["src_len"])
        else:
            l = loss(model(data["src"], dec_input, data["src_len"])[0], data["tgt"], data["tgt_len"])
        (l * ones if variant == "fused-recompute" else l).sum().backward()

    return run


def _memory_child(variant, config, device, chunk_values):
    from peak_memory import _peak_rss_kib, _rss_kib

    step = _step(variant, config, device, chunk_values)
    before = _rss_kib()
    for _ in range(3):
        step()
    print(json.dumps(dict(variant=variant, step_bytes=max(0, _peak_rss_kib() - before) * 1024,
                          peak_bytes=_peak_rss_kib() * 1024)))


def step_memory(variant, config, device, chunk_values):
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--config", config, "--device", device,
                          "--chunk-values", str(chunk_values), "--memory-child", variant],
                         capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(out.stderr.strip()[-2000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def step_times(config, device, rounds, per_round, chunk_values):
    """{variant: median ms}: the variants interleaved, each round timing per_round steps of each."""
    import torch

    steps = {v: _step(v, config, device, chunk_values) for v in VARIANTS}
    for step in steps.values():
        step()  # warm up: packed weights, block cache
    ms = {v: [] for v in VARIANTS}
    for _ in range(rounds):
        for v, step in steps.items():
            times = []
            for _ in range(per_round):
                if device.startswith("cuda"):
                    torch.cuda.synchronize()
                start = time.perf_counter()
                step()
                if device.startswith("cuda"):
                    torch.cuda.synchronize()
                times.append((time.perf_counter() - start) * 1e3)
            ms[v].append(statistics.median(times))
    return {v: statistics.median(t) for v, t in ms.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="large")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--per-round", type=int, default=3)
    parser.add_argument("--chunk-values", type=int, default=0,
                        help="logits values per chunk of the fused op (default: cpp_ops.LINEAR_LOSS_CHUNK_VALUES)")
    parser.add_argument("--memory-child", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        _memory_child(args.memory_child, args.config, args.device, args.chunk_values)
        return
    result = fused_comparison(args.config, args.device, args.rounds, args.per_round, args.chunk_values)
    print(table(result))
    print(json.dumps(result))


def fused_comparison(config, device, rounds=5, per_round=3, chunk_values=0):
    """Every variant's step memory (a subprocess each) and median time (interleaved)."""
    mem = {v: step_memory(v, config, device, chunk_values) for v in VARIANTS}
    ms = step_times(config, device, rounds, per_round, chunk_values)
    return dict(config=config, device=device, chunk_values=chunk_values,
                step_mib={v: mem[v]["step_bytes"] / 2 ** 20 for v in VARIANTS},
                peak_mib={v: mem[v]["peak_bytes"] / 2 ** 20 for v in VARIANTS}, median_ms=ms)


def table(result):
    mib, ms = result["step_mib"], result["median_ms"]
    lines = [f"{result['config']} train step on {result['device']}: step MiB (peak MiB), median ms"]
    lines += [f"  {v:15s} {mib[v]:8.1f} ({result['peak_mib'][v]:.0f})  {ms[v]:9.1f}" for v in VARIANTS]
    for variant in ("fused", "own"):
        lines.append(f"  {variant} / unfused: memory {mib[variant] / max(mib['unfused'], 1e-9):.2f}, "
                     f"time {ms[variant] / ms['unfused']:.2f}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
