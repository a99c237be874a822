"""The commands of ``python -m seq2seq_fast`` (parsed by ``cli``): ``cmd_train``, ``cmd_translate``,
``cmd_demo`` and ``cmd_bench`` each take the parsed arguments and return the exit status; a user's
mistake raises ``CliError`` with a message that names the argument."""
import importlib.util
import os
import sys
import tempfile
import time

import torch

from seq2seq_fast.tools.extras import optional_import
from seq2seq_fast.tools.translation import source_tokens, target_text, translate_sentences, unknown_tokens

TASK_DEFAULTS = {
    # d2l's chapter settings for fra-eng; a wider single layer for the (easy) date task.
    "nmt": dict(embed_size=32, num_hiddens=32, num_layers=2, dropout=0.1, batch_size=64, num_steps=10, lr=0.005),
    "dates": dict(embed_size=32, num_hiddens=64, num_layers=1, dropout=0.0, batch_size=128, num_steps=12, lr=0.005),
}
TRAIN_STEPS = 300  # train's length when neither --steps nor --epochs is given
# What translate needs from a checkpoint (train writes all of it; Seq2SeqTrainer alone writes "model").
TRANSLATE_KEYS = ("model", "model_config", "src_vocab", "tgt_vocab", "task", "num_steps")


class CliError(Exception):
    """A mistake of the user's, reported as one line; the message names the argument."""


def _checkpoint(path, option, keys):
    """The checkpoint at ``path`` (given as ``option``), which must hold ``keys``."""
    from seq2seq_fast.tools.checkpoints import load_checkpoint

    try:
        checkpoint = load_checkpoint(path)
    except ValueError as exc:
        raise CliError(f"{option}: {exc}") from exc
    missing = [key for key in keys if key not in checkpoint]
    if missing:
        raise CliError(f"{option}: {path!r} was not written by `train`: it lacks {', '.join(missing)}")
    return checkpoint


# ----------------------------------------------------------------------------------------- data

def _task_data(task, args):
    """``(train_iter, src_vocab, tgt_vocab, num_steps, test_pairs)`` of a task."""
    from seq2seq_fast.tools.data import load_data_nmt
    from seq2seq_fast.tools.tasks import load_date_task

    if task == "nmt":
        try:
            train_iter, src_vocab, tgt_vocab = load_data_nmt(
                args["batch_size"], args["num_steps"], args["num_examples"], path=args["data"], seed=args["seed"])
        except (OSError, ValueError) as exc:
            raise CliError(f"--data: {exc}") from exc
        return train_iter, src_vocab, tgt_vocab, args["num_steps"], []
    try:
        t = load_date_task(args["num_train"], args["num_test"], args["batch_size"], args["num_steps"],
                           seed=args["seed"])
    except ValueError as exc:
        raise CliError(f"--num-train, --num-test: {exc}") from exc
    return t.train_iter, t.src_vocab, t.tgt_vocab, t.num_steps, t.test_pairs


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
            raise CliError(f"--resume: no checkpoint at --out {args.out!r}")
        saved = _checkpoint(args.out, "--out", ("train_args",))["train_args"]
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
    if run["epochs"] is None and run["steps"] is None:
        run["steps"] = TRAIN_STEPS
    if args.nproc > 1 and torch.device(args.device).type != "cpu":
        raise CliError("--nproc: the processes train with gloo on the CPU; use --device cpu")
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

def _read_lines(path):
    """The lines of ``path`` (the ``input`` argument; None or ``-``: stdin)."""
    if path in (None, "-"):
        return sys.stdin.read().splitlines()
    try:
        with open(path, encoding="utf-8") as f:
            return f.read().splitlines()
    except UnicodeDecodeError as exc:
        raise CliError(f"input: {path!r} is not UTF-8 text ({exc.reason} at byte {exc.start})") from exc


def _write_lines(path, lines):
    """``lines`` to ``path`` (the ``--output`` argument; None: stdout)."""
    text = "".join(line + "\n" for line in lines)
    if path is None:
        sys.stdout.write(text)
        return
    try:
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
    except OSError as exc:
        raise CliError(f"--output: cannot write {path!r}: {exc.strerror}") from exc


def cmd_translate(args):
    from seq2seq_fast.tools.checkpoints import model_from_checkpoint

    checkpoint = _checkpoint(args.checkpoint, "--checkpoint", TRANSLATE_KEYS)
    lines = _read_lines(args.input)
    task, num_steps = checkpoint["task"], checkpoint["num_steps"]
    model, src_vocab, tgt_vocab = model_from_checkpoint(checkpoint, backend=args.backend)
    model.to(args.device)
    keep = [i for i, line in enumerate(lines) if line.strip()]
    sentences = [source_tokens(task, lines[i]) for i in keep]
    unknown = unknown_tokens(sentences, src_vocab)
    if unknown:
        listed = ", ".join(map(repr, unknown[:20])) + (f" and {len(unknown) - 20} more" if len(unknown) > 20 else "")
        print(f"warning: source words not in the checkpoint's vocabulary, read as <unk>: {listed}", file=sys.stderr)
    outputs = translate_sentences(model, src_vocab, tgt_vocab, sentences, task=task, num_steps=num_steps,
                                  max_len=args.max_len, beam=args.beam, length_penalty=args.length_penalty)
    texts = [""] * len(lines)
    for i, tokens in zip(keep, outputs):
        texts[i] = target_text(task, tokens)
    _write_lines(args.output, texts)
    return 0


# ----------------------------------------------------------------------------------------- demo

def cmd_demo(args):
    from seq2seq_fast.tools.data import bleu
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
    sacrebleu = optional_import("sacrebleu", "no sacreBLEU score is printed")
    if sacrebleu is not None:
        print(f"sacreBLEU: {sacrebleu.corpus_bleu(hyps, [refs]).score:.1f}")
    exact = sum(h == r for h, r in zip(hyps, refs)) / len(refs)
    print(f"exact match: {100 * exact:.1f}%")

    if args.heatmap and optional_import("matplotlib", "no attention heatmap is drawn") is not None:
        from seq2seq_fast.tools.plots import show_heatmaps

        src_words, pred = sources[0], preds[0]
        weights = attentions[0][: len(pred) + 1, : len(src_words) + 1]
        try:
            show_heatmaps(weights.reshape(1, 1, *weights.shape), xlabel="Key positions (source)",
                          ylabel="Query positions (output)", figsize=(4.5, 4.5), xticklabels=src_words + ["<eos>"],
                          yticklabels=pred + ["<eos>"][: weights.shape[0] - len(pred)], path=args.heatmap)
        except OSError as exc:
            raise CliError(f"--heatmap: cannot write {args.heatmap!r}: {exc.strerror or exc}") from exc
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
        raise CliError("bench needs a source checkout of seq2seq_fast (benchmarks/runner.py is not shipped in "
                       "the wheel): git clone the repository and run `python -m seq2seq_fast bench` there")
    return main(list(runner_args))
