"""d2l's English-French data pipeline (``d2l.torch`` 0.17.6, the chapter's edition) with d2l's
signatures, reading ``fra.txt`` where d2l keeps it or where the user points (nothing is
downloaded), and the batching the trainer resumes from.

The functions keep d2l's names and semantics, quirks included: ``tokenize_nmt`` reads lines
while ``i <= num_examples`` (one line more than asked), keeps only lines of exactly two
tab-separated fields, and ``Vocab`` orders tokens by descending frequency, ties in order of
first appearance, after ``<unk>`` (id 0) and the reserved tokens.
"""
import collections
import math
import os

import torch

RESERVED_TOKENS = ("<pad>", "<bos>", "<eos>")


def preprocess_nmt(text):
    """Lower-case, replace non-breaking spaces by spaces, and put a space before ``,.!?``."""
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")

    def no_space(char, prev_char):
        return char in set(",.!?") and prev_char != " "

    text = text.replace("\u202f", " ").replace("\xa0", " ").lower()
    out = [" " + char if i > 0 and no_space(char, text[i - 1]) else char for i, char in enumerate(text)]
    return "".join(out)


def tokenize_nmt(text, num_examples=None):
    """Split the preprocessed text into (source, target) lists of word lists, one per line of
    two tab-separated fields, reading lines while ``i <= num_examples`` as d2l does."""
    source, target = [], []
    for i, line in enumerate(text.split("\n")):
        if num_examples and i > num_examples:
            break
        parts = line.split("\t")
        if len(parts) == 2:
            source.append(parts[0].split(" "))
            target.append(parts[1].split(" "))
    return source, target


def count_corpus(tokens):
    """Token frequencies of a list of tokens or of a list of token lists."""
    if len(tokens) == 0 or isinstance(tokens[0], list):
        tokens = [token for line in tokens for token in line]
    return collections.Counter(tokens)


class Vocab:
    """d2l's vocabulary: ``<unk>`` is 0, then ``reserved_tokens``, then the tokens seen at least
    ``min_freq`` times by descending frequency (ties in order of first appearance).

    >>> vocab = Vocab([["go", "."], ["hi", "."]], reserved_tokens=["<pad>", "<bos>", "<eos>"])
    >>> vocab.idx_to_token, vocab[["hi", "zzz"]]
    (['<unk>', '<pad>', '<bos>', '<eos>', '.', 'go', 'hi'], [6, 0])
    """

    def __init__(self, tokens=None, min_freq=0, reserved_tokens=None):
        if tokens is None:
            tokens = []
        if reserved_tokens is None:
            reserved_tokens = []
        counter = count_corpus(tokens)
        self._token_freqs = sorted(counter.items(), key=lambda x: x[1], reverse=True)
        self.idx_to_token = ["<unk>"] + list(reserved_tokens)
        self.token_to_idx = {token: idx for idx, token in enumerate(self.idx_to_token)}
        for token, freq in self._token_freqs:
            if freq < min_freq:
                break
            if token not in self.token_to_idx:
                self.idx_to_token.append(token)
                self.token_to_idx[token] = len(self.idx_to_token) - 1

    @classmethod
    def from_idx_to_token(cls, idx_to_token):
        """The vocabulary with exactly this id order (as saved in a checkpoint)."""
        vocab = cls()
        vocab.idx_to_token = list(idx_to_token)
        vocab.token_to_idx = {token: idx for idx, token in enumerate(vocab.idx_to_token)}
        return vocab

    def __len__(self):
        return len(self.idx_to_token)

    def __getitem__(self, tokens):
        if not isinstance(tokens, (list, tuple)):
            return self.token_to_idx.get(tokens, self.unk)
        return [self.__getitem__(token) for token in tokens]

    def to_tokens(self, indices):
        if not isinstance(indices, (list, tuple)):
            return self.idx_to_token[indices]
        return [self.idx_to_token[index] for index in indices]

    @property
    def unk(self):
        return 0

    @property
    def token_freqs(self):
        return self._token_freqs


def truncate_pad(line, num_steps, padding_token):
    """``line`` cut to ``num_steps`` items or padded to it with ``padding_token``."""
    if len(line) > num_steps:
        return line[:num_steps]
    return line + [padding_token] * (num_steps - len(line))


def build_array_nmt(lines, vocab, num_steps):
    """Token lines to an int64 (N, num_steps) array with ``<eos>`` appended, truncated or padded,
    and int64 (N,) valid lengths (the non-``<pad>`` count)."""
    lines = [vocab[line] for line in lines]
    lines = [line + [vocab["<eos>"]] for line in lines]
    array = torch.tensor([truncate_pad(line, num_steps, vocab["<pad>"]) for line in lines])
    valid_len = (array != vocab["<pad>"]).type(torch.int32).sum(1)
    return array, valid_len


NMT_DATA_ENV = "SEQ2SEQ_FAST_NMT_DATA"
NMT_DATA_DEFAULT = os.path.join("..", "data", "fra-eng", "fra.txt")  # where d2l's download_extract puts it
NMT_DATA_URL = "http://d2l-data.s3-accelerate.amazonaws.com/fra-eng.zip"


def nmt_data_path(path=None):
    """The ``fra.txt`` to read: ``path`` (the file or a folder holding it), else the environment
    variable ``SEQ2SEQ_FAST_NMT_DATA`` (same), else d2l's ``../data/fra-eng/fra.txt``.

    Raises ``FileNotFoundError`` saying where it looked, where to put the file and where it comes
    from (nothing is downloaded).
    """
    if path is not None and not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a file or folder path, got {type(path).__name__}")
    env = os.environ.get(NMT_DATA_ENV) if path is None else None
    found = path if path is not None else env or NMT_DATA_DEFAULT
    if os.path.isdir(found):
        found = os.path.join(found, "fra.txt")
    if os.path.isfile(found):
        return found
    origin = f"it comes from {NMT_DATA_URL} (unzip it into ../data, as d2l does); nothing is downloaded"
    if path is not None:
        raise FileNotFoundError(f"{os.fspath(found)!r} does not exist: name d2l's fra.txt or a folder holding it; "
                                + origin)
    if env:
        raise FileNotFoundError(f"{found!r} (${NMT_DATA_ENV}) does not exist: name d2l's fra.txt or a folder "
                                f"holding it; {origin}")
    raise FileNotFoundError(
        f"d2l's English-French data is not at {found!r} ({os.path.abspath(found)}): put fra.txt there, or name "
        f"the file or its folder with path= or ${NMT_DATA_ENV}; {origin}")


def read_data_nmt(path=None):
    """d2l's ``read_data_nmt()``: the text of the English-French ``fra.txt``, found by
    ``nmt_data_path(path)`` (d2l's ``../data/fra-eng/fra.txt`` unless told otherwise)."""
    with open(nmt_data_path(path), "r", encoding="utf-8") as f:
        return f.read()


class BatchIterator:
    """Mini-batches of a tuple of equally long tensors, reshuffled each epoch from ``seed``.

    The order of epoch ``e`` depends only on ``(seed, e)``, so a trainer can resume in the middle
    of an epoch: ``batches(epoch, start)`` yields that epoch's batches from number ``start`` on.
    Iterating the object itself yields the next epoch each time, as a ``DataLoader`` does.
    """

    def __init__(self, arrays, batch_size, shuffle=True, seed=0):
        arrays = tuple(arrays)
        if not arrays or not all(isinstance(a, torch.Tensor) for a in arrays):
            raise TypeError("arrays must be a non-empty sequence of tensors")
        n = arrays[0].shape[0]
        if any(a.shape[0] != n for a in arrays):
            raise ValueError(f"arrays must share their first dimension, got {[a.shape[0] for a in arrays]}")
        from seq2seq_fast.ops.validation import check_int

        self.batch_size = check_int(batch_size, "batch_size", minimum=1)
        self.arrays, self.shuffle, self.seed = arrays, bool(shuffle), int(seed)
        self.epochs_iterated = 0  # passes made by iterating the object itself

    def __len__(self):
        return -(-self.arrays[0].shape[0] // self.batch_size)

    def order(self, epoch):
        n = self.arrays[0].shape[0]
        if not self.shuffle:
            return torch.arange(n)
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(n, generator=generator)

    def batches(self, epoch=0, start=0):
        order = self.order(epoch)
        for i in range(start, len(self)):
            index = order[i * self.batch_size: (i + 1) * self.batch_size]
            yield tuple(a[index] for a in self.arrays)

    def __iter__(self):
        """The next epoch's batches: epoch 0 on the first pass, 1 on the second, and so on,
        reshuffled each time as a ``DataLoader`` is."""
        epoch, self.epochs_iterated = self.epochs_iterated, self.epochs_iterated + 1
        return self.batches(epoch)


def tensor_loader_batches(loader):
    """The batches of ``loader`` as iterating it yields them, gathered with one index per tensor,
    when ``loader`` is d2l's kind of ``DataLoader``: over a ``TensorDataset``, in the calling
    process, with the default collation and no pinning; else None.

    Iterating such a loader indexes the dataset once per sample and stacks the samples (about
    0.4 ms of a 4 ms book-setting step). This draws what its iterator draws from torch's
    generators, in the same order (the iterator's base seed, then the sampler's shuffle), so
    the batches and every later random number are the loader's own."""
    data = torch.utils.data
    if not (isinstance(loader, data.DataLoader) and type(loader.dataset) is data.TensorDataset
            and loader.batch_sampler is not None and loader.collate_fn is data.default_collate
            and loader.num_workers == 0 and not loader.pin_memory):
        return None
    tensors = loader.dataset.tensors
    indices = iter(loader.batch_sampler)
    torch.empty((), dtype=torch.int64).random_(generator=loader.generator)  # the iterator's base seed

    def batches():
        for index in indices:
            index = torch.as_tensor(index, dtype=torch.int64)
            yield [t[index] for t in tensors]

    return batches()


def load_array(data_arrays, batch_size, is_train=True, *, seed=None):
    """d2l's ``load_array``: mini-batches of the tensors ``data_arrays``, shuffled when ``is_train``.

    Without ``seed`` it is d2l's own: a ``DataLoader`` over a ``TensorDataset`` that reshuffles
    each epoch from torch's global generator, so ``torch.manual_seed`` gives d2l's batches. With
    ``seed`` it is a ``BatchIterator`` whose order depends on ``(seed, epoch)`` only, from which
    a ``Seq2SeqTrainer`` resumes mid-epoch.

    >>> data_iter = load_array((torch.arange(10), torch.arange(10) * 2), batch_size=4)
    """
    if seed is not None:
        return BatchIterator(data_arrays, batch_size, shuffle=is_train, seed=seed)
    from seq2seq_fast.ops.validation import check_int

    arrays = tuple(data_arrays)
    if not arrays or not all(isinstance(a, torch.Tensor) for a in arrays):
        raise TypeError("data_arrays must be a non-empty sequence of tensors")
    if any(a.shape[0] != arrays[0].shape[0] for a in arrays):
        raise ValueError(f"data_arrays must share their first dimension, got {[a.shape[0] for a in arrays]}")
    dataset = torch.utils.data.TensorDataset(*arrays)
    return torch.utils.data.DataLoader(dataset, check_int(batch_size, "batch_size", minimum=1), shuffle=is_train)


def load_data_nmt(batch_size, num_steps, num_examples=600, *, path=None, min_freq=2, seed=None):
    """d2l's ``load_data_nmt(batch_size, num_steps, num_examples=600)`` on the ``fra.txt`` that
    ``nmt_data_path(path)`` finds: ``path`` (the file or its folder), else
    ``$SEQ2SEQ_FAST_NMT_DATA``, else d2l's ``../data/fra-eng/fra.txt``. Nothing is downloaded.

    Returns ``(data_iter, src_vocab, tgt_vocab)``: batches of ``(X int64 (B, num_steps),
    X_valid_len int64 (B,), Y, Y_valid_len)`` from ``load_array(..., seed=seed)`` (d2l's
    ``DataLoader`` unless ``seed`` is given); vocabularies with ``min_freq`` (d2l: 2) and the
    reserved tokens ``<pad>``, ``<bos>``, ``<eos>``.

    >>> train_iter, src_vocab, tgt_vocab = load_data_nmt(64, 10)                      # ../data/fra-eng/fra.txt
    >>> train_iter, src_vocab, tgt_vocab = load_data_nmt(64, 10, path="fra-eng/fra.txt")
    """
    from seq2seq_fast.ops.validation import check_int

    if isinstance(batch_size, (str, os.PathLike)):
        raise TypeError(f"batch_size must be an int, got {type(batch_size).__name__} {os.fspath(batch_size)!r}: "
                        "load_data_nmt takes d2l's (batch_size, num_steps, num_examples); name the file with path=")
    check_int(batch_size, "batch_size", minimum=1)
    check_int(num_steps, "num_steps", minimum=1)
    if num_examples is not None:
        check_int(num_examples, "num_examples", minimum=0)
    path = nmt_data_path(path)
    source, target = tokenize_nmt(preprocess_nmt(read_data_nmt(path)), num_examples)
    if not source:
        raise ValueError(f"{os.fspath(path)!r} holds no line of two tab-separated fields (English<TAB>French)")
    src_vocab = Vocab(source, min_freq=min_freq, reserved_tokens=list(RESERVED_TOKENS))
    tgt_vocab = Vocab(target, min_freq=min_freq, reserved_tokens=list(RESERVED_TOKENS))
    src_array, src_valid_len = build_array_nmt(source, src_vocab, num_steps)
    tgt_array, tgt_valid_len = build_array_nmt(target, tgt_vocab, num_steps)
    data_arrays = (src_array, src_valid_len, tgt_array, tgt_valid_len)
    return load_array(data_arrays, batch_size, seed=seed), src_vocab, tgt_vocab


def bleu(pred_seq, label_seq, k):
    """d2l's BLEU of one predicted sentence against one label (space-separated tokens): the
    brevity penalty times the n-gram precisions p_n ** (1 / 2**n) for n = 1..k. A prediction
    with no n-gram of some n <= k scores 0 (where d2l's division by zero raises)."""
    pred_tokens, label_tokens = pred_seq.split(" "), label_seq.split(" ")
    len_pred, len_label = len(pred_tokens), len(label_tokens)
    score = math.exp(min(0, 1 - len_label / len_pred))
    for n in range(1, k + 1):
        num_matches, label_subs = 0, collections.defaultdict(int)
        for i in range(len_label - n + 1):
            label_subs[" ".join(label_tokens[i: i + n])] += 1
        for i in range(len_pred - n + 1):
            if label_subs[" ".join(pred_tokens[i: i + n])] > 0:
                num_matches += 1
                label_subs[" ".join(pred_tokens[i: i + n])] -= 1
        if len_pred - n + 1 <= 0:
            return 0.0
        score *= math.pow(num_matches / (len_pred - n + 1), math.pow(0.5, n))
    return score
