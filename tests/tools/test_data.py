"""d2l's fra-eng pipeline on a 5-line file, against arrays worked out by hand; the date task."""
import datetime

import pytest
import torch

from seq2seq_fast import reference as R
from seq2seq_fast.tools.data import (NMT_DATA_ENV, NMT_DATA_URL, BatchIterator, Vocab, build_array_nmt,
                                     load_data_nmt, preprocess_nmt, read_data_nmt, tensor_loader_batches,
                                     tokenize_nmt, truncate_pad)
from seq2seq_fast.tools.tasks import (date_pairs, date_to_words, day_words, encode_sources, load_date_task,
                                year_words)

FRA = (
    "Go.\tVa !\n"
    "Hi.\tSalut !\n"
    "Run!\tCours\u202f!\n"
    "Go now.\tVa maintenant.\n"
    "Who?\tQui ?\n"
)


def test_preprocess_nmt_spaces_punctuation_and_lowers():
    assert preprocess_nmt("Go.\tVa !") == "go .\tva !"
    assert preprocess_nmt("Run!\tCours\u202f!") == "run !\tcours !"
    assert preprocess_nmt("I'm OK,\xa0really?") == "i'm ok , really ?"
    with pytest.raises(TypeError, match="text"):
        preprocess_nmt(b"bytes")


def test_tokenize_nmt_reads_one_line_more_than_num_examples_as_d2l():
    text = preprocess_nmt(FRA)
    source, target = tokenize_nmt(text)
    assert source == [["go", "."], ["hi", "."], ["run", "!"], ["go", "now", "."], ["who", "?"]]
    assert target == [["va", "!"], ["salut", "!"], ["cours", "!"], ["va", "maintenant", "."], ["qui", "?"]]
    source, _ = tokenize_nmt(text, num_examples=2)
    assert len(source) == 3  # d2l breaks only when i > num_examples
    assert tokenize_nmt("a\tb\tc\nx\ty")[0] == [["x"]], "lines need exactly two fields"


def test_vocab_order_min_freq_and_reserved_tokens():
    source, target = tokenize_nmt(preprocess_nmt(FRA))
    vocab = Vocab(source, min_freq=1, reserved_tokens=["<pad>", "<bos>", "<eos>"])
    # counts: . 3, go 2, then once each in order of appearance: hi run ! now who ?
    assert vocab.idx_to_token == ["<unk>", "<pad>", "<bos>", "<eos>", ".", "go", "hi", "run", "!", "now", "who", "?"]
    assert vocab["go"] == 5 and vocab["zebra"] == 0 and vocab.unk == 0
    assert vocab[["who", "?", "nope"]] == [10, 11, 0]
    assert vocab.to_tokens([4, 5]) == [".", "go"] and vocab.to_tokens(9) == "now"
    assert vocab.token_freqs[:2] == [(".", 3), ("go", 2)]
    tgt = Vocab(target, min_freq=2, reserved_tokens=["<pad>", "<bos>", "<eos>"])
    assert tgt.idx_to_token == ["<unk>", "<pad>", "<bos>", "<eos>", "!", "va"]
    assert len(tgt) == 6
    again = Vocab.from_idx_to_token(tgt.idx_to_token)
    assert again.idx_to_token == tgt.idx_to_token and again["va"] == 5


def test_truncate_pad():
    assert truncate_pad([1, 2, 3], 5, 0) == [1, 2, 3, 0, 0]
    assert truncate_pad([1, 2, 3], 2, 0) == [1, 2]
    assert truncate_pad([], 2, 9) == [9, 9]


def test_build_array_nmt_appends_eos_pads_and_counts():
    source, _ = tokenize_nmt(preprocess_nmt(FRA))
    vocab = Vocab(source, min_freq=2, reserved_tokens=["<pad>", "<bos>", "<eos>"])
    assert vocab.idx_to_token == ["<unk>", "<pad>", "<bos>", "<eos>", ".", "go"]
    array, valid = build_array_nmt(source, vocab, 3)
    expected = torch.tensor([
        [5, 4, 3],  # go . <eos>
        [0, 4, 3],  # hi(unk) . <eos>
        [0, 0, 3],  # run ! <eos>
        [5, 0, 4],  # go now . (eos cut)
        [0, 0, 3],  # who ? <eos>
    ])
    assert torch.equal(array, expected)
    assert valid.dtype == torch.int64 and valid.tolist() == [3, 3, 3, 3, 3]
    array, valid = build_array_nmt([["go"], []], vocab, 4)
    assert array.tolist() == [[5, 3, 1, 1], [3, 1, 1, 1]] and valid.tolist() == [2, 1]


def test_load_data_nmt_on_a_file_and_a_folder(tmp_path):
    (tmp_path / "fra.txt").write_text(FRA, encoding="utf-8")
    for path in (tmp_path / "fra.txt", tmp_path, str(tmp_path)):
        data_iter, src_vocab, tgt_vocab = load_data_nmt(2, 4, path=path, seed=0)
        assert src_vocab.idx_to_token == ["<unk>", "<pad>", "<bos>", "<eos>", ".", "go"]
        assert tgt_vocab.idx_to_token == ["<unk>", "<pad>", "<bos>", "<eos>", "!", "va"]
        batches = list(data_iter)
        assert [b[0].shape[0] for b in batches] == [2, 2, 1]
        X = torch.cat([b[0] for b in batches])
        order = data_iter.order(0)
        expected = torch.tensor([[5, 4, 3, 1], [0, 4, 3, 1], [0, 0, 3, 1], [5, 0, 4, 3], [0, 0, 3, 1]])
        assert torch.equal(X, expected[order])
        Y_len = torch.cat([b[3] for b in batches])
        assert torch.equal(Y_len, torch.tensor([3, 3, 3, 4, 3])[order])


def test_load_data_nmt_without_a_seed_is_d2ls_dataloader(tmp_path):
    """d2l's load_array: a DataLoader reshuffled from torch's generator, so a seed gives d2l's batches."""
    (tmp_path / "fra.txt").write_text(FRA, encoding="utf-8")
    data_iter, _, _ = load_data_nmt(2, 4, path=tmp_path)
    assert isinstance(data_iter, torch.utils.data.DataLoader)
    arrays = data_iter.dataset.tensors
    torch.manual_seed(7)
    ours = [[b[0] for b in data_iter] for _ in range(2)]
    torch.manual_seed(7)
    theirs = [[b[0] for b in R.load_array(arrays, 2)] for _ in range(2)]
    assert all(torch.equal(a, b) for epoch_a, epoch_b in zip(ours, theirs) for a, b in zip(epoch_a, epoch_b))
    assert [len(epoch) for epoch in ours] == [3, 3]


def test_load_data_nmt_finds_the_file_where_d2l_keeps_it_or_the_environment_says(tmp_path, monkeypatch):
    folder = tmp_path / "data" / "fra-eng"
    folder.mkdir(parents=True)
    (folder / "fra.txt").write_text(FRA, encoding="utf-8")
    notebooks = tmp_path / "notebooks"
    notebooks.mkdir()
    monkeypatch.chdir(notebooks)
    monkeypatch.delenv(NMT_DATA_ENV, raising=False)
    assert len(load_data_nmt(2, 4)[1]) == 6  # ../data/fra-eng/fra.txt, as d2l
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError) as error:
        load_data_nmt(2, 4)
    message = str(error.value)
    assert "fra-eng/fra.txt" in message and NMT_DATA_URL in message and NMT_DATA_ENV in message
    assert "\n" not in message
    monkeypatch.setenv(NMT_DATA_ENV, str(folder))
    assert len(load_data_nmt(2, 4)[1]) == 6
    assert read_data_nmt() == FRA
    monkeypatch.setenv(NMT_DATA_ENV, str(tmp_path / "nowhere.txt"))
    with pytest.raises(FileNotFoundError, match=NMT_DATA_ENV):
        load_data_nmt(2, 4)


def test_load_data_nmt_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        load_data_nmt(2, 4, path=tmp_path / "missing.txt")
    (tmp_path / "fra.txt").write_text("one\ttwo\tthree\n", encoding="utf-8")
    with pytest.raises(ValueError, match="two tab-separated"):
        load_data_nmt(2, 4, path=tmp_path)
    with pytest.raises(TypeError, match="batch_size.*path="):  # the signature before d2l's
        load_data_nmt(str(tmp_path), 2, 4)
    with pytest.raises(ValueError, match="num_steps"):
        load_data_nmt(2, 0, path=tmp_path)
    with pytest.raises(TypeError, match="path"):
        load_data_nmt(2, 4, path=3)


def test_batch_iterator_resumes_mid_epoch_and_reshuffles():
    arrays = (torch.arange(10), torch.arange(10) * 2)
    it = BatchIterator(arrays, 3, seed=4)
    assert len(it) == 4
    full = [b[0].tolist() for b in it.batches(1)]
    assert [b[0].tolist() for b in it.batches(1, start=2)] == full[2:]
    assert sorted(sum(full, [])) == list(range(10))
    assert full != [b[0].tolist() for b in it.batches(2)]
    passes = [[b[0].tolist() for b in it] for _ in range(3)]  # iterating reshuffles, as a DataLoader
    assert passes == [[b[0].tolist() for b in it.batches(e)] for e in range(3)]
    assert [b[0].tolist() for b in BatchIterator(arrays, 4, shuffle=False)] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]


def _tensor_loader(n=23, **kwargs):
    g = torch.Generator().manual_seed(n)
    arrays = (torch.randint(0, 9, (n, 4), generator=g), torch.arange(n), torch.randn(n, generator=g).double())
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(*arrays), **kwargs)


@pytest.mark.parametrize("kwargs", [dict(batch_size=5, shuffle=True), dict(batch_size=4, shuffle=False),
                                    dict(batch_size=6, shuffle=True, drop_last=True),
                                    dict(batch_size=5, shuffle=True, generator=torch.Generator().manual_seed(3))],
                         ids=["shuffle", "in-order", "drop-last", "own-generator"])
def test_tensor_loader_batches_are_the_loaders_and_draw_what_it_draws(kwargs):
    loader = _tensor_loader(**kwargs)
    states = []
    passes = []
    for fast in (False, True):
        torch.manual_seed(11)
        if "generator" in kwargs:
            loader.generator.manual_seed(3)
        passes.append([list(b) for _ in range(3) for b in (tensor_loader_batches(loader) if fast else loader)])
        states.append((torch.get_rng_state(), loader.generator.get_state() if loader.generator else None))
        states[-1] += (torch.rand(3),)  # the next random numbers too
    (slow, fast) = passes
    assert len(slow) == len(fast) == 3 * len(loader)
    for a, b in zip(slow, fast):
        assert len(a) == len(b) == 3
        for x, y in zip(a, b):
            assert x.dtype == y.dtype and torch.equal(x, y)
    assert torch.equal(states[0][0], states[1][0]) and torch.equal(states[0][2], states[1][2])
    if "generator" in kwargs:
        assert torch.equal(states[0][1], states[1][1])


def test_tensor_loader_batches_leaves_other_loaders_alone():
    dataset = _tensor_loader().dataset
    DataLoader = torch.utils.data.DataLoader
    assert tensor_loader_batches(DataLoader(dataset, 4, collate_fn=lambda b: b)) is None
    assert tensor_loader_batches(DataLoader(list(range(5)), 2)) is None  # not a TensorDataset
    assert tensor_loader_batches(DataLoader(dataset, batch_size=None)) is None  # no batching
    assert tensor_loader_batches(BatchIterator((torch.arange(4),), 2)) is None
    assert tensor_loader_batches([(torch.zeros(2),)]) is None


def test_date_words():
    assert day_words(1) == ["first"] and day_words(23) == ["twenty", "third"] and day_words(30) == ["thirtieth"]
    assert year_words(1990) == ["nineteen", "ninety"] and year_words(1905) == ["nineteen", "oh", "five"]
    assert year_words(1900) == ["nineteen", "hundred"] and year_words(2000) == ["two", "thousand"]
    assert year_words(2007) == ["two", "thousand", "seven"] and year_words(2012) == ["twenty", "twelve"]
    date = datetime.date(1990, 3, 23)
    assert date_to_words(date, 0) == "twenty third of march nineteen ninety"
    assert date_to_words(date, 1) == "march twenty third , nineteen ninety"
    assert date_to_words(date, 2) == "the twenty third of march , nineteen ninety"


def test_date_pairs_deterministic_and_split_disjoint():
    a, b = date_pairs(50, seed=1), date_pairs(50, seed=1)
    assert a == b and a != date_pairs(50, seed=2)
    for src, tgt, date in a:
        assert tgt.replace(" ", "") == date.isoformat()
        assert src in {date_to_words(date, s) for s in range(3)}
    task = load_date_task(num_train=300, num_test=60, batch_size=32, seed=5)
    train_sources = set()
    for X, X_len, Y, Y_len in task.train_iter:
        assert X.shape[1] == Y.shape[1] == task.num_steps
        assert (Y_len == 11).all(), "10 characters and <eos>"
        for row in Y.tolist():
            train_sources.add("".join(task.tgt_vocab.to_tokens(row[:10])))
    assert len(train_sources) == 300
    held_out = {tgt.replace(" ", "") for _, tgt in task.test_pairs}
    assert len(held_out) == 60 and not held_out & train_sources
    src, src_len = encode_sources([s for s, _ in task.test_pairs[:3]], task.src_vocab, task.num_steps)
    assert src.shape == (3, task.num_steps) and src_len.dtype == torch.int64
