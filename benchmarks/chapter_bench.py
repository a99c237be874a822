"""The book, end to end (the chapter section of the runner): what a d2l reader's notebook runs,
timed whole, the reference and the package alternating in one process.

Rows (d2l zh book setting: embed 32, hidden 32, 2 layers, dropout 0.1, batch 64, 10 steps,
lr 0.005, 600 sentence pairs, source/target vocabularies of 184/201 words):
  train_seq2seq    reference     d2l's ``train_seq2seq`` with d2l's modules (seq2seq_fast.reference)
                   d2l-loop      the same loop with the package's modules (a one-import swap of the classes)
                   package       the package's ``train_seq2seq`` with its modules
  predict_seq2seq  reference     d2l's ``predict_seq2seq``, one sentence per call
                   package       the package's ``predict_seq2seq``

Both loops read the same d2l ``DataLoader`` (reshuffled per epoch) over generated token arrays
with the book's shapes (no corpus needed); plots are off in both. The untrained decoders never
emit ``<eos>``, so every prediction decodes all ``num_steps`` steps, the same steps for both.

    python benchmarks/chapter_bench.py --epochs 250 --rounds 3
"""
import argparse
import contextlib
import io
import statistics
import sys
import time

import torch

import seq2seq_fast as sf
from seq2seq_fast import reference as R

BOOK = dict(embed=32, hidden=32, layers=2, dropout=0.1, batch=64, steps=10, lr=0.005, examples=600,
            src_vocab=184, tgt_vocab=201)
RESERVED = ["<pad>", "<bos>", "<eos>"]


def book_vocab(size):
    """A d2l ``Vocab`` of ``size`` tokens: the reserved ones, ``<unk>`` and words w0, w1, ..."""
    words = [f"w{i}" for i in range(size - 1 - len(RESERVED))]
    return sf.Vocab([words], reserved_tokens=RESERVED)


def book_arrays(src_vocab, tgt_vocab, seed=0):
    """(X, X_valid_len, Y, Y_valid_len) of the book's shapes: 600 pairs of 10 steps, sentences of
    2-8 tokens ending in ``<eos>`` and padded, as ``build_array_nmt`` returns them."""
    g = torch.Generator().manual_seed(seed)
    n, steps = BOOK["examples"], BOOK["steps"]
    arrays = []
    for vocab in (src_vocab, tgt_vocab):
        lengths = torch.randint(2, 9, (n,), generator=g)
        tokens = torch.randint(4, len(vocab), (n, steps), generator=g)
        positions = torch.arange(steps)[None, :]
        tokens[positions == (lengths - 1)[:, None]] = vocab["<eos>"]
        tokens[positions >= lengths[:, None]] = vocab["<pad>"]
        arrays += [tokens, lengths]
    return arrays


def book_model(package, vocab_sizes):
    make = sf if package else R
    src, tgt = vocab_sizes
    size = (BOOK["embed"], BOOK["hidden"], BOOK["layers"], BOOK["dropout"])
    return make.EncoderDecoder(make.Seq2SeqEncoder(src, *size), make.Seq2SeqAttentionDecoder(tgt, *size))


class _NoPlot:
    def add(self, *args):
        pass


def trainers(epochs, loader, tgt_vocab, vocab_sizes):
    """{row: a callable that trains a fresh model for ``epochs`` epochs}."""
    def reference():
        R.train_seq2seq(book_model(False, vocab_sizes), loader, BOOK["lr"], epochs, tgt_vocab, "cpu")

    def d2l_loop():
        R.train_seq2seq(book_model(True, vocab_sizes), loader, BOOK["lr"], epochs, tgt_vocab, "cpu")

    def package():
        with contextlib.redirect_stdout(io.StringIO()):  # its closing "loss ..., tokens/sec" line
            sf.train_seq2seq(book_model(True, vocab_sizes), loader, BOOK["lr"], epochs, tgt_vocab, "cpu",
                             animator=_NoPlot(), progress=False)

    return {"reference": reference, "d2l-loop": d2l_loop, "package": package}


def predictors(src_vocab, tgt_vocab, vocab_sizes, sentences):
    """{row: a callable that translates every sentence, one call each}."""
    torch.manual_seed(0)
    reference = book_model(False, vocab_sizes)
    reference.apply(R.xavier_init_weights)
    package = book_model(True, vocab_sizes)
    package.load_state_dict(reference.state_dict())

    def run(net, predict):
        def translate():
            for sentence in sentences:
                predict(net, sentence, src_vocab, tgt_vocab, BOOK["steps"], "cpu")
        return translate

    return {"reference": run(reference, R.predict_seq2seq), "package": run(package, sf.predict_seq2seq)}


def alternate(fns, rounds):
    """{name: [seconds of one call per round]}, the callables taking turns in each round."""
    samples = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - start)
    return samples


def _rows(workload, samples, per, note):
    base = statistics.median(samples["reference"]) / per
    rows = []
    for impl, times in samples.items():
        seconds = statistics.median(times) / per
        rows.append(dict(section="chapter", config="zh", dtype="float32", workload=workload, impl=impl,
                         median_s=seconds, speedup=base / seconds, over_floor=None, note=note,
                         spread=f"{min(times) / per * 1e3:.3f}-{max(times) / per * 1e3:.3f} ms"))
    return rows


def chapter_rows(epochs, rounds, sentences=20, log=print):
    """Rows of the chapter section: ``train_seq2seq`` per epoch (``epochs`` epochs a call) and
    ``predict_seq2seq`` per sentence, medians over ``rounds`` alternating rounds."""
    src_vocab, tgt_vocab = book_vocab(BOOK["src_vocab"]), book_vocab(BOOK["tgt_vocab"])
    sizes = (len(src_vocab), len(tgt_vocab))
    loader = R.load_array(book_arrays(src_vocab, tgt_vocab), BOOK["batch"])
    fns = trainers(epochs, loader, tgt_vocab, sizes)
    for fn in trainers(1, loader, tgt_vocab, sizes).values():  # warm: first calls pay one-time set-up
        fn()
    train = _rows("train_seq2seq", alternate(fns, rounds), epochs,
                  f"per epoch of {len(loader)} batches; {epochs} epochs a call, median of {rounds} rounds")
    log(train)
    g = torch.Generator().manual_seed(1)
    words = src_vocab.idx_to_token[len(RESERVED) + 1:]
    lines = [" ".join(words[int(i)] for i in torch.randint(0, len(words), (int(n),), generator=g))
             for n in torch.randint(2, 7, (sentences,), generator=g)]
    predict_fns = predictors(src_vocab, tgt_vocab, sizes, lines)
    for fn in predict_fns.values():
        fn()
    predict = _rows("predict_seq2seq", alternate(predict_fns, max(rounds, 5)), sentences,
                    f"per sentence, {BOOK['steps']} steps each; {sentences} sentences a call")
    log(predict)
    return train + predict


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=250)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    for row in chapter_rows(args.epochs, args.rounds, log=lambda rows: None):
        print(f"{row['workload']:16} {row['impl']:10} {row['median_s'] * 1e3:9.3f} ms  "
              f"{row['speedup']:6.2f}x  ({row['spread']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
