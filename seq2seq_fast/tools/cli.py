"""``python -m seq2seq_fast {bench,demo,train,translate}``.

bench      run the benchmark runner of a source checkout (benchmarks/runner.py)
demo       train on the built-in date task, print translations, BLEU, exact match, save a heatmap
train      train on the date task or a d2l fra.txt, writing a checkpoint with the vocabularies
translate  translate lines from stdin or a file with a checkpoint, greedy or beam search
"""
import argparse
import importlib.util
import os
import sys
import tempfile
import time

import torch

TASK_DEFAULTS = {
    # d2l's chapter settings for fra-eng; a wider single layer for the (easy) date task.
    "nmt": dict(embed_size=32, num_hiddens=32, num_layers=2, dropout=0.1, batch_size=64, num_steps=10, lr=0.005),
    "dates": dict(embed_size=32, num_hiddens=64, num_layers=1, dropout=0.0, batch_size=128, num_steps=12, lr=0.005),
}


# ----------------------------------------------------------------------------------------- data

def _task_data(task, args):
    """``(train_iter, src_vocab, tgt_vocab, num_steps, test_pairs)`` of a task."""
    from seq2seq_fast.tools.data import load_data_nmt
    from seq2seq_fast.tools.tasks import load_date_task

    if task == "nmt":
        train_iter, src_vocab, tgt_vocab = load_data_nmt(
            args["data"], args["batch_size"], args["num_steps"], args["num_examples"], seed=args["seed"])
        return train_iter, src_vocab, tgt_vocab, args["num_steps"], []
    t = load_date_task(args["num_train"], args["num_test"], args["batch_size"], args["num_steps"], seed=args["seed"])
    return t.train_iter, t.src_vocab, t.tgt_vocab, t.num_steps, t.test_pairs


def source_tokens(task, sentence):
    """A raw input line as the source tokens the task's model was trained on."""
    from seq2seq_fast.tools.data import preprocess_nmt

    if task == "nmt":
        return preprocess_nmt(sentence.strip()).split(" ")
    return sentence.strip().lower().replace(",", " , ").split()


def target_text(task, tokens):
    """Output tokens as text: words joined by spaces (nmt) or characters joined (dates)."""
    return ("" if task == "dates" else " ").join(tokens)


def translate_sentences(model, src_vocab, tgt_vocab, sentences, *, task, num_steps, max_len=None, beam=1,
                        length_penalty=0.0, batch_size=256, return_attention=False):
    """Translations (token lists) of ``sentences`` (token lists), batched; with
    ``return_attention`` (greedy only) also each one's attention (steps, T)."""
    from seq2seq_fast.decoding.beam import beam_search
    from seq2seq_fast.tools.data import build_array_nmt
    from seq2seq_fast.decoding.greedy import greedy_decode

    device = next(model.parameters()).device
    bos, eos = tgt_vocab["<bos>"], tgt_vocab["<eos>"]
    max_len = max_len or num_steps
    outputs, attentions = [], []
    for start in range(0, len(sentences), batch_size):
        chunk = sentences[start:start + batch_size]
        src, src_len = build_array_nmt(chunk, src_vocab, num_steps)
        src, src_len = src.to(device), src_len.to(device)
        if beam > 1:
            result = beam_search(model, src, src_len, bos=bos, eos=eos, max_len=max_len, beam_size=beam,
                                 length_penalty=length_penalty)
            tokens, lengths = result.tokens[:, 0], result.lengths[:, 0]
        else:
            result = greedy_decode(model, src, src_len, bos=bos, eos=eos, max_len=max_len,
                                   return_attention=return_attention)
            tokens, lengths = result.tokens, result.lengths
            if return_attention:
                attentions.extend(result.attention.cpu().unbind(0))
        for row, n in zip(tokens.tolist(), lengths.tolist()):
            outputs.append(tgt_vocab.to_tokens(row[:n]))
    return (outputs, attentions) if return_attention else outputs


# ---------------------------------------------------------------------------------------- train

def _build_model(config, backend):
    from seq2seq_fast.tools.checkpoints import build_model

    return build_model(config, backend=backend)


def _train_run(rank, world_size, args, init_file):
    """Train per ``args``; under DDP (world_size > 1) as process ``rank``. Returns the summary."""
    from seq2seq_fast.tools.train import Seq2SeqTrainer

    ddp = world_size > 1
    if ddp:
        torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                                             world_size=world_size)
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    try:
        train_iter, src_vocab, tgt_vocab, num_steps, _ = _task_data(args["task"], args)
        config = dict(src_vocab_size=len(src_vocab), tgt_vocab_size=len(tgt_vocab), embed_size=args["embed_size"],
                      num_hiddens=args["num_hiddens"], num_layers=args["num_layers"], dropout=args["dropout"])
        torch.manual_seed(args["seed"])
        model = _build_model(config, args["backend"]).to(args.get("device") or "cpu")
        net = torch.nn.parallel.DistributedDataParallel(model) if ddp else model
        meta = dict(model_config=config, src_vocab=src_vocab.idx_to_token, tgt_vocab=tgt_vocab.idx_to_token,
                    task=args["task"], num_steps=num_steps, train_args=args)
        trainer = Seq2SeqTrainer(net, bos=tgt_vocab["<bos>"], lr=args["lr"], checkpoint_meta=meta,
                                 device=args.get("device") or "cpu")
        if args["resume"]:
            trainer.resume(args["out"])
        result = trainer.fit(train_iter, num_epochs=args["epochs"], max_steps=args["steps"],
                             checkpoint_path=args["out"], checkpoint_every=args["checkpoint_every"],
                             progress=not args["quiet"])
        return dict(result, step=trainer.step, epoch=trainer.epoch)
    finally:
        if ddp:
            torch.distributed.destroy_process_group()


def _ddp_worker(rank, world_size, args, init_file):
    _train_run(rank, world_size, args, init_file)


def cmd_train(args):
    from seq2seq_fast.tools.checkpoints import load_checkpoint

    if args.resume:
        if not os.path.exists(args.out):
            sys.exit(f"error: --resume: no checkpoint at {args.out}")
        saved = load_checkpoint(args.out)["train_args"]
        run = dict(saved, resume=True, out=args.out, quiet=args.quiet, backend=args.backend, device=args.device,
                   steps=args.steps if args.steps is not None else saved["steps"],
                   epochs=args.epochs if args.epochs is not None else saved["epochs"])
    else:
        task = "nmt" if args.data else "dates"
        run = dict(TASK_DEFAULTS[task])
        run.update({k: v for k, v in vars(args).items() if k in run and v is not None})
        run.update(task=task, data=args.data, num_examples=args.num_examples, num_train=args.num_train,
                   num_test=args.num_test, seed=args.seed, backend=args.backend, out=args.out,
                   epochs=args.epochs, steps=args.steps, checkpoint_every=args.checkpoint_every,
                   quiet=args.quiet, resume=False, device=args.device)
    if args.nproc > 1 and torch.device(args.device).type != "cpu":
        sys.exit("error: --nproc runs gloo processes on the CPU; use --device cpu")
        if run["epochs"] is None and run["steps"] is None:
            run["steps"] = 300
    if args.nproc > 1:
        with tempfile.TemporaryDirectory() as folder:
            torch.multiprocessing.spawn(_ddp_worker, args=(args.nproc, run, os.path.join(folder, "init")),
                                        nprocs=args.nproc)
        checkpoint = load_checkpoint(run["out"])
        print(f"trained to step {checkpoint['step']} on {args.nproc} processes (gloo); checkpoint: {run['out']}")
        return 0
    summary = _train_run(0, 1, run, None)
    print(f"loss {summary['loss']:.3f}, {summary['tokens_per_s']:.1f} tokens/sec over {summary['steps']} steps "
          f"(step {summary['step']}, epoch {summary['epoch']}); checkpoint: {run['out']}")
    return 0


# ------------------------------------------------------------------------------------ translate

def cmd_translate(args):
    from seq2seq_fast.tools.checkpoints import load_checkpoint, model_from_checkpoint

    checkpoint = load_checkpoint(args.checkpoint)
    model, src_vocab, tgt_vocab = model_from_checkpoint(checkpoint, backend=args.backend)
    model.to(args.device)
    task, num_steps = checkpoint["task"], checkpoint["num_steps"]
    stream = open(args.input, encoding="utf-8") if args.input not in (None, "-") else sys.stdin
    with stream:
        lines = stream.read().splitlines()
    keep = [i for i, line in enumerate(lines) if line.strip()]
    outputs = translate_sentences(model, src_vocab, tgt_vocab, [source_tokens(task, lines[i]) for i in keep],
                                  task=task, num_steps=num_steps, max_len=args.max_len, beam=args.beam,
                                  length_penalty=args.length_penalty)
    texts = [""] * len(lines)
    for i, tokens in zip(keep, outputs):
        texts[i] = target_text(task, tokens)
    out = open(args.output, "w", encoding="utf-8") if args.output else sys.stdout
    try:
        out.write("".join(t + "\n" for t in texts))
    finally:
        if out is not sys.stdout:
            out.close()
    return 0


# ----------------------------------------------------------------------------------------- demo

def cmd_demo(args):
    from seq2seq_fast.tools.data import bleu
    from seq2seq_fast.tools.plots import show_heatmaps
    from seq2seq_fast.tools.train import Seq2SeqTrainer

    start = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    run = dict(TASK_DEFAULTS["dates"], num_train=args.num_train, num_test=args.num_test, seed=args.seed,
               batch_size=args.batch_size, num_hiddens=args.num_hiddens)
    train_iter, src_vocab, tgt_vocab, num_steps, test_pairs = _task_data("dates", run)
    config = dict(src_vocab_size=len(src_vocab), tgt_vocab_size=len(tgt_vocab), embed_size=run["embed_size"],
                  num_hiddens=run["num_hiddens"], num_layers=run["num_layers"], dropout=run["dropout"])
    torch.manual_seed(args.seed)
    model = _build_model(config, args.backend).to(args.device)
    from seq2seq_fast.ops.dispatch import backend_for

    backend = backend_for(args.backend, "decoder_forward", model.decoder.dense.weight).NAME
    print(f"seq2seq_fast demo: dates in words -> ISO dates; decoder backend {backend}, "
          f"{torch.get_num_threads()} threads; {args.num_train} training pairs, {args.num_test} held-out")
    trainer = Seq2SeqTrainer(model, bos=tgt_vocab["<bos>"], lr=run["lr"], device=args.device)
    deadline = start + args.time_budget if args.time_budget else None
    result = trainer.fit(train_iter, max_steps=args.steps, progress=not args.quiet,
                         callback=(lambda t, loss: time.perf_counter() > deadline) if deadline else None)
    print(f"trained {trainer.step} steps in {result['seconds']:.1f} s: loss {result['loss']:.4f}, "
          f"{result['tokens_per_s']:.1f} tokens/sec on {trainer.device}")

    model.eval()
    sources = [src.split(" ") for src, _ in test_pairs]
    preds, attentions = translate_sentences(model, src_vocab, tgt_vocab, sources, task="dates",
                                            num_steps=num_steps, return_attention=True)
    if args.beam > 1:
        preds = translate_sentences(model, src_vocab, tgt_vocab, sources, task="dates", num_steps=num_steps,
                                    beam=args.beam)
    hyps = [" ".join(p) for p in preds]
    refs = [tgt for _, tgt in test_pairs]
    for (src, tgt), hyp in list(zip(test_pairs, hyps))[: args.samples]:
        print(f"{src} => {hyp.replace(' ', '')}, bleu {bleu(hyp, tgt, k=2):.3f}")
    d2l_bleu = sum(bleu(h, r, k=2) for h, r in zip(hyps, refs)) / len(refs)
    print(f"d2l BLEU (k=2), mean over {len(refs)} held-out sentences: {d2l_bleu:.3f}")
    try:
        import sacrebleu

        print(f"sacreBLEU: {sacrebleu.corpus_bleu(hyps, [refs]).score:.1f}")
    except ImportError:
        print("sacreBLEU: not installed (pip install sacrebleu)")
    exact = sum(h == r for h, r in zip(hyps, refs)) / len(refs)
    print(f"exact match: {100 * exact:.1f}%")

    src_words, pred = sources[0], preds[0]
    weights = attentions[0][: len(pred) + 1, : len(src_words) + 1]
    show_heatmaps(weights.reshape(1, 1, *weights.shape), xlabel="Key positions (source)",
                  ylabel="Query positions (output)", figsize=(4.5, 4.5),
                  xticklabels=src_words + ["<eos>"], yticklabels=pred + ["<eos>"][: weights.shape[0] - len(pred)],
                  path=args.heatmap)
    print(f"attention heatmap of {' '.join(src_words)!r}: {args.heatmap}")
    print(f"wall time: {time.perf_counter() - start:.1f} s")
    return 0


# ---------------------------------------------------------------------------------------- bench

def _benchmark_runner():
    """``main`` of benchmarks/runner.py in the source checkout this package runs from, or None."""
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # seq2seq_fast/tools/..
    path = os.path.join(os.path.dirname(package), "benchmarks", "runner.py")
    if not os.path.isfile(path):
        return None
    spec = importlib.util.spec_from_file_location("seq2seq_fast_benchmark_runner", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def cmd_bench(runner_args):
    main = _benchmark_runner()
    if main is None:
        sys.exit("error: bench needs a source checkout of seq2seq_fast (benchmarks/runner.py is not shipped in "
                 "the wheel): git clone the repository and run `python -m seq2seq_fast bench` there")
    return main(list(runner_args))


# ----------------------------------------------------------------------------------------- main

def build_parser():
    parser = argparse.ArgumentParser(prog="python -m seq2seq_fast", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    backend = dict(default="auto", choices=["auto", "torch", "triton", "cpp"], help="decoder backend (default auto)")
    device = dict(default="cpu", help="torch device, e.g. cpu or cuda (default cpu)")

    p = sub.add_parser("bench", help="run the benchmark runner (source checkout only)", add_help=False,
                       description="Runs benchmarks/runner.py; every argument is passed on (try bench --help).")
    p.add_argument("runner_args", nargs=argparse.REMAINDER)
    p.set_defaults(func=lambda args: cmd_bench(args.runner_args))

    p = sub.add_parser("demo", help="train on the built-in date task and show translations, BLEU, a heatmap")
    p.add_argument("--steps", type=int, default=150, help="training steps (default 150)")
    p.add_argument("--time-budget", type=float, default=90.0,
                   help="stop training after this many seconds from the start (default 90; 0: no limit)")
    p.add_argument("--num-train", type=int, default=20000)
    p.add_argument("--num-test", type=int, default=500)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--num-hiddens", type=int, default=64)
    p.add_argument("--beam", type=int, default=1, help="beam size for the translations (1: greedy)")
    p.add_argument("--samples", type=int, default=5, help="translations to print")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    p.add_argument("--heatmap", default="attention_heatmap.png", help="PNG path (default ./attention_heatmap.png)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--backend", **backend)
    p.add_argument("--device", **device)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("train", help="train on the date task or a d2l fra.txt; writes a checkpoint")
    p.add_argument("--data", default=None, help="d2l's fra.txt (or its folder); default: the built-in date task")
    p.add_argument("--num-examples", type=int, default=600, help="fra.txt lines to read, as d2l (default 600)")
    p.add_argument("--num-train", type=int, default=20000, help="date task: training pairs")
    p.add_argument("--num-test", type=int, default=500, help="date task: held-out pairs")
    p.add_argument("--out", default="seq2seq_fast.pt", help="checkpoint path (default seq2seq_fast.pt)")
    p.add_argument("--resume", action="store_true", help="continue the run saved in --out")
    p.add_argument("--epochs", type=int, default=None, help="train this many epochs in all")
    p.add_argument("--steps", type=int, default=None, help="train this many steps in all (default 300)")
    p.add_argument("--checkpoint-every", type=int, default=100, help="steps between checkpoints")
    for name in ("embed-size", "num-hiddens", "num-layers", "batch-size", "num-steps"):
        p.add_argument(f"--{name}", type=int, default=None)
    p.add_argument("--dropout", type=float, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--nproc", type=int, default=1, help="DDP processes on this machine (gloo, CPU)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--backend", **backend)
    p.add_argument("--device", **device)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("translate", help="translate lines from stdin or a file with a train checkpoint")
    p.add_argument("input", nargs="?", default=None, help="text file, one sentence a line (default stdin)")
    p.add_argument("--checkpoint", required=True, help="a checkpoint written by train")
    p.add_argument("--output", default=None, help="write here instead of stdout")
    p.add_argument("--beam", type=int, default=1, help="beam size (1: greedy)")
    p.add_argument("--length-penalty", type=float, default=0.0, help="GNMT length penalty alpha for beam search")
    p.add_argument("--max-len", type=int, default=None, help="longest output (default: the training num_steps)")
    p.add_argument("--backend", **backend)
    p.add_argument("--device", **device)
    p.set_defaults(func=cmd_translate)
    return parser


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"]:  # everything after it, options included, belongs to the runner
        return cmd_bench(argv[1:])
    args = build_parser().parse_args(argv)
    return args.func(args)
