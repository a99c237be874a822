"""d2l's small general helpers that the chapter's code calls: ``Timer``, ``Accumulator``, ``try_gpu``."""
import itertools
import time

import torch

from seq2seq_fast.ops.validation import check_int


class Timer:
    """d2l's ``Timer``: started on creation; ``stop()`` records and returns the seconds since the
    last ``start()``; ``avg``, ``sum`` and ``cumsum`` of the recorded times.

    >>> timer = Timer(); work(); seconds = timer.stop()
    """

    def __init__(self):
        self.times = []
        self.start()

    def start(self):
        self.tik = time.time()

    def stop(self):
        self.times.append(time.time() - self.tik)
        return self.times[-1]

    def avg(self):
        return sum(self.times) / len(self.times)

    def sum(self):
        return sum(self.times)

    def cumsum(self):
        return list(itertools.accumulate(self.times))


class Accumulator:
    """d2l's ``Accumulator``: running float sums of ``n`` quantities.

    >>> metric = Accumulator(2); metric.add(loss.sum(), num_tokens); metric[0] / metric[1]
    """

    def __init__(self, n):
        self.data = [0.0] * check_int(n, "n", minimum=0)

    def add(self, *args):
        if len(args) != len(self.data):
            raise ValueError(f"add takes {len(self.data)} values, got {len(args)}")
        self.data = [a + float(b) for a, b in zip(self.data, args)]

    def reset(self):
        self.data = [0.0] * len(self.data)

    def __getitem__(self, idx):
        return self.data[idx]


def try_gpu(i=0):
    """d2l's ``try_gpu``: ``cuda:i`` if that GPU exists, else the CPU.

    >>> net.to(try_gpu())
    """
    check_int(i, "i", minimum=0)
    if torch.cuda.device_count() >= i + 1:
        return torch.device(f"cuda:{i}")
    return torch.device("cpu")
