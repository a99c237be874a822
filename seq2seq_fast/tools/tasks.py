"""A built-in translation task that needs no download: dates written out in English words to
ISO dates, e.g. ``"the twenty third of march , nineteen ninety"`` -> ``"1990-03-23"``.

The source is words, the target characters; each target digit group is produced from a
few source words (year words -> the year's digits, month -> its number, day -> its two
digits), so the alignment shows in the attention weights. Examples are deterministic given
the seed, and the held-out set's dates never occur in training, in any wording.
"""
import datetime
import random
from typing import List, NamedTuple, Tuple

import torch

from seq2seq_fast.tools.data import RESERVED_TOKENS, BatchIterator, Vocab, build_array_nmt

ONES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
        "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen",
        "nineteen"]
TENS = ["", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]
ORDINALS = ["", "first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth", "ninth",
            "tenth", "eleventh", "twelfth", "thirteenth", "fourteenth", "fifteenth", "sixteenth",
            "seventeenth", "eighteenth", "nineteenth", "twentieth"]
MONTHS = ["january", "february", "march", "april", "may", "june", "july", "august", "september",
          "october", "november", "december"]
FIRST_DAY = datetime.date(1900, 1, 1)
LAST_DAY = datetime.date(2099, 12, 31)


def _two_digits(n):
    """1..99 in words: ``twenty one``, ``seven``, ``ninety``."""
    if n < 20:
        return [ONES[n]]
    tens, ones = divmod(n, 10)
    return [TENS[tens]] + ([ONES[ones]] if ones else [])


def day_words(day):
    """1..31 as an ordinal: ``first``, ``twenty third``, ``thirtieth``."""
    if day <= 20:
        return [ORDINALS[day]]
    tens, ones = divmod(day, 10)
    if ones == 0:
        return [TENS[tens][:-1] + "ieth"]
    return [TENS[tens], ORDINALS[ones]]


def year_words(year):
    """1900..2099 as spoken: ``nineteen oh five``, ``nineteen hundred``, ``two thousand seven``,
    ``twenty twelve``."""
    century, rest = divmod(year, 100)
    if century == 20 and rest < 10:
        return ["two", "thousand"] + ([ONES[rest]] if rest else [])
    head = _two_digits(century)
    if rest == 0:
        return head + ["hundred"]
    if rest < 10:
        return head + ["oh", ONES[rest]]
    return head + _two_digits(rest)


def date_to_words(date, style):
    """One of three wordings (``style`` 0, 1 or 2) of ``date``."""
    day, month, year = day_words(date.day), MONTHS[date.month - 1], year_words(date.year)
    if style == 0:
        words = day + ["of", month] + year
    elif style == 1:
        words = [month] + day + [","] + year
    else:
        words = ["the"] + day + ["of", month, ","] + year
    return " ".join(words)


def date_to_iso(date):
    """``date`` as ISO 8601 characters separated by spaces (the target tokens)."""
    return " ".join(date.isoformat())


def date_pairs(num_examples, seed=0, exclude=()):
    """``num_examples`` (source, target) pairs of distinct random dates in 1900..2099, target
    tokens space-separated (``"1 9 9 0 - 0 3 - 2 3"``), none of whose dates is in ``exclude``."""
    rng = random.Random(seed)
    span = (LAST_DAY - FIRST_DAY).days + 1
    excluded = set(exclude)
    if num_examples > span - len(excluded):
        raise ValueError(f"num_examples must be at most {span - len(excluded)}, got {num_examples}")
    pairs, seen = [], set()
    while len(pairs) < num_examples:
        date = FIRST_DAY + datetime.timedelta(days=rng.randrange(span))
        if date in seen or date in excluded:
            continue
        seen.add(date)
        pairs.append((date_to_words(date, rng.randrange(3)), date_to_iso(date), date))
    return pairs


class DateTask(NamedTuple):
    """The date task's data: training batches, vocabularies and held-out pairs."""

    train_iter: BatchIterator
    src_vocab: Vocab
    tgt_vocab: Vocab
    num_steps: int
    test_pairs: List[Tuple[str, str]]  # (source words, target tokens space-separated)


def load_date_task(num_train=20000, num_test=500, batch_size=128, num_steps=12, seed=0):
    """Generated date-translation data in the shape of d2l's ``load_data_nmt``.

    Training and held-out dates are disjoint; vocabularies come from the training split
    (``min_freq=1``, reserved ``<pad>``, ``<bos>``, ``<eos>``).

    >>> task = load_date_task(num_train=1000, num_test=100, batch_size=32)
    >>> X, X_len, Y, Y_len = next(iter(task.train_iter))
    """
    train = date_pairs(num_train, seed=seed)
    test = date_pairs(num_test, seed=seed + 1, exclude=[date for _, _, date in train])
    source = [src.split(" ") for src, _, _ in train]
    target = [tgt.split(" ") for _, tgt, _ in train]
    src_vocab = Vocab(source, min_freq=1, reserved_tokens=list(RESERVED_TOKENS))
    tgt_vocab = Vocab(target, min_freq=1, reserved_tokens=list(RESERVED_TOKENS))
    src_array, src_len = build_array_nmt(source, src_vocab, num_steps)
    tgt_array, tgt_len = build_array_nmt(target, tgt_vocab, num_steps)
    train_iter = BatchIterator((src_array, src_len, tgt_array, tgt_len), batch_size, seed=seed)
    return DateTask(train_iter, src_vocab, tgt_vocab, num_steps, [(s, t) for s, t, _ in test])


def encode_sources(sentences, vocab, num_steps):
    """Source sentences (strings of space-separated tokens) to ``(src int64 (N, num_steps),
    src_valid_len int64 (N,))`` as ``build_array_nmt`` makes them."""
    array, valid = build_array_nmt([s.split(" ") for s in sentences], vocab, num_steps)
    return array, valid.to(torch.int64)
