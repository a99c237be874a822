"""The chapter's d2l API at the top level: d2l 0.17.6's signatures, the book's numbers (loss curve,
translations, attention weights) against the oracle's train_seq2seq / predict_seq2seq, the
batched and compiled prediction, the plots outside a notebook, and bad input."""
import inspect
import os
import sys

import pytest
import torch

import seq2seq_fast as sf
from helpers import write_fra_corpus
from seq2seq_fast import reference as R
from seq2seq_fast.tools.plots import PLOT_DIR_ENV

# d2l 0.17.6's parameters of each name (d2l/torch.py), in order; ours may add keyword-only ones.
D2L_SIGNATURES = {
    "read_data_nmt": [],
    "preprocess_nmt": ["text"],
    "tokenize_nmt": ["text", "num_examples"],
    "Vocab": ["tokens", "min_freq", "reserved_tokens"],
    "truncate_pad": ["line", "num_steps", "padding_token"],
    "build_array_nmt": ["lines", "vocab", "num_steps"],
    "load_array": ["data_arrays", "batch_size", "is_train"],
    "load_data_nmt": ["batch_size", "num_steps", "num_examples"],
    "sequence_mask": ["X", "valid_len", "value"],
    "grad_clipping": ["net", "theta"],
    "train_seq2seq": ["net", "data_iter", "lr", "num_epochs", "tgt_vocab", "device"],
    "predict_seq2seq": ["net", "src_sentence", "src_vocab", "tgt_vocab", "num_steps", "device",
                        "save_attention_weights"],
    "bleu": ["pred_seq", "label_seq", "k"],
    "show_heatmaps": ["matrices", "xlabel", "ylabel", "titles", "figsize", "cmap"],
    "try_gpu": ["i"],
    "Timer": [],
    "Accumulator": ["n"],
    "Animator": ["xlabel", "ylabel", "legend", "xlim", "ylim", "xscale", "yscale", "fmts", "nrows", "ncols",
                 "figsize"],
}
BOOK = dict(embed=8, hidden=16, layers=2, batch_size=16, num_steps=8, lr=0.01)


@pytest.mark.parametrize("name", sorted(D2L_SIGNATURES))
def test_the_chapter_api_has_d2ls_signatures(name):
    assert name in sf.__all__
    params = inspect.signature(getattr(sf, name)).parameters.values()
    positional = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    extra_positional = positional[len(D2L_SIGNATURES[name]):]
    assert positional[:len(D2L_SIGNATURES[name])] == D2L_SIGNATURES[name]
    # read_data_nmt(path=None) keeps the package's old positional path; every other addition is keyword-only.
    assert extra_positional == (["path"] if name == "read_data_nmt" else [])


def _models(src_vocab, tgt_vocab):
    """d2l's net and ours with the same weights."""
    b = BOOK
    torch.manual_seed(0)
    ref = R.EncoderDecoder(R.Seq2SeqEncoder(len(src_vocab), b["embed"], b["hidden"], b["layers"]),
                           R.Seq2SeqAttentionDecoder(len(tgt_vocab), b["embed"], b["hidden"], b["layers"]))
    ours = sf.EncoderDecoder(sf.Seq2SeqEncoder(len(src_vocab), b["embed"], b["hidden"], b["layers"]),
                             sf.Seq2SeqAttentionDecoder(len(tgt_vocab), b["embed"], b["hidden"], b["layers"]))
    ours.load_state_dict(ref.state_dict())
    return ref, ours


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Both nets trained 20 epochs by train_seq2seq (ours, with its plot) on a generated fra.txt."""
    folder = tmp_path_factory.mktemp("fra-eng")
    write_fra_corpus(folder / "fra.txt", lines=48)  # 3 batches an epoch
    data_iter, src_vocab, tgt_vocab = sf.load_data_nmt(BOOK["batch_size"], BOOK["num_steps"], path=folder)
    ref, ours = _models(src_vocab, tgt_vocab)
    animator = sf.Animator(xlabel="epoch", ylabel="loss", xlim=[10, 20], path=str(folder / "loss.png"))
    torch.manual_seed(1)
    trainer = sf.train_seq2seq(ours, data_iter, BOOK["lr"], 20, tgt_vocab, "cpu", animator=animator, progress=False)
    torch.manual_seed(1)
    ref_losses = R.train_seq2seq(ref, R.load_array(data_iter.dataset.tensors, BOOK["batch_size"]), BOOK["lr"], 20,
                                 tgt_vocab, "cpu")
    return dict(ref=ref, ours=ours, trainer=trainer, ref_losses=ref_losses, animator=animator, folder=folder,
                src_vocab=src_vocab, tgt_vocab=tgt_vocab)


def test_train_seq2seq_records_d2ls_loss_curve(trained):
    ours = [record.loss for record in trained["trainer"].history]
    ref = trained["ref_losses"]
    assert len(ours) == len(ref) == 20 and ref[-1] < 0.5 * ref[0], "the run must learn for the check to mean much"
    for epoch, (a, b) in enumerate(zip(ours, ref), 1):
        tolerance = 1e-3 * b if epoch <= 10 else max(0.02 * b, 1e-3)
        assert abs(a - b) <= tolerance, f"epoch {epoch}: loss {a} vs d2l's {b}"
    animator = trained["animator"]
    assert animator.X == [[10, 20]] and animator.Y == [[ours[9], ours[19]]], "d2l plots epochs 10, 20, ..."
    assert (trained["folder"] / "loss.png").stat().st_size > 0


def test_train_seq2seq_under_autocast_keeps_the_float32_loss_curve(trained, tmp_path):
    # Issue #15: the same run under CPU autocast (bfloat16) stays within 2 % of the float32 run's
    # loss, epoch by epoch.
    data_iter = sf.load_data_nmt(BOOK["batch_size"], BOOK["num_steps"], path=trained["folder"])[0]
    _, ours = _models(trained["src_vocab"], trained["tgt_vocab"])
    animator = sf.Animator(xlabel="epoch", ylabel="loss", xlim=[10, 20], path=str(tmp_path / "loss.png"))
    torch.manual_seed(1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        trainer = sf.train_seq2seq(ours, data_iter, BOOK["lr"], 20, trained["tgt_vocab"], "cpu", animator=animator,
                                   progress=False)
    float32 = [record.loss for record in trained["trainer"].history]
    for epoch, (a, b) in enumerate(zip([record.loss for record in trainer.history], float32), 1):
        assert abs(a - b) <= 0.02 * b, f"epoch {epoch}: loss {a} under autocast vs {b} in float32"
    assert all(p.dtype == torch.float32 for p in ours.parameters())
    # predict_seq2seq under autocast: the attention in d2l's dtype there, the float32 loop's tokens.
    src_vocab, tgt_vocab = trained["src_vocab"], trained["tgt_vocab"]
    for sentence in ("go .", "i lost .", "the big dog ?"):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got, weights = sf.predict_seq2seq(ours, sentence, src_vocab, tgt_vocab, BOOK["num_steps"], "cpu", True)
        assert got == sf.predict_seq2seq(ours, sentence, src_vocab, tgt_vocab, BOOK["num_steps"], "cpu")[0]
        assert all(step[0].dtype == torch.bfloat16 for step in weights)


def test_predict_seq2seq_returns_d2ls_translation_and_attention(trained):
    ref, ours, src_vocab, tgt_vocab = trained["ref"], trained["ours"], trained["src_vocab"], trained["tgt_vocab"]
    num_steps = BOOK["num_steps"]
    sentences = ["go .", "i lost .", "he's calm .", "i'm home .", "the big dog ?", "zzz cat",
                 "i see the small cat now i see the dog ."]  # unknown words; longer than num_steps
    lengths = set()
    for sentence in sentences:
        expected, expected_weights = R.predict_seq2seq(ref, sentence, src_vocab, tgt_vocab, num_steps, "cpu", True)
        got, weights = sf.predict_seq2seq(ours, sentence, src_vocab, tgt_vocab, num_steps, "cpu", True)
        assert got == expected, sentence
        assert sf.predict_seq2seq(ours, sentence, src_vocab, tgt_vocab, num_steps, "cpu") == (expected, [])
        assert len(weights) == len(expected_weights)
        lengths.add(len(weights))
        # The book's heatmap reshape works on both and gives the same matrix.
        book = [torch.cat([step[0][0][0] for step in w], 0).reshape((1, 1, -1, num_steps))
                for w in (weights, expected_weights)]
        torch.testing.assert_close(book[0], book[1].detach(), atol=1e-5, rtol=1e-4, msg=sentence)
    assert len(lengths) > 1, "outputs of several lengths (stopped at <eos>)"
    assert not ours.training, "predict_seq2seq leaves the net in eval mode, as d2l"
    batch = sf.predict_seq2seq_batch(ours, sentences, src_vocab, tgt_vocab, num_steps, "cpu", batch_size=3)
    assert batch == [R.predict_seq2seq(ref, s, src_vocab, tgt_vocab, num_steps, "cpu")[0] for s in sentences]


@pytest.mark.skipif("cpp" not in sf.available_backends(), reason="the compiled greedy loop needs seq2seq_fast._C")
def test_predict_seq2seq_runs_the_compiled_loop_not_a_step_per_call(trained, monkeypatch):
    ours = trained["ours"]
    calls = []
    monkeypatch.setattr(ours.decoder, "forward", lambda *args: calls.append(args))
    translation, _ = sf.predict_seq2seq(ours, "i lost .", trained["src_vocab"], trained["tgt_vocab"],
                                        BOOK["num_steps"], "cpu", save_attention_weights=True)
    assert translation and calls == []


def test_train_seq2seq_prints_d2ls_line_and_the_plot_file(tmp_path, monkeypatch, capsys):
    write_fra_corpus(tmp_path / "fra.txt", lines=32)
    monkeypatch.setenv(PLOT_DIR_ENV, str(tmp_path))
    data_iter, src_vocab, tgt_vocab = sf.load_data_nmt(16, 6, path=tmp_path)
    _, net = _models(src_vocab, tgt_vocab)
    trainer = sf.train_seq2seq(net, data_iter, 0.005, 12, tgt_vocab, torch.device("cpu"))
    captured = capsys.readouterr()
    assert captured.out.startswith("loss ") and captured.out.endswith(" tokens/sec on cpu\n")
    assert f"{trainer.history[-1].loss:.3f}" in captured.out  # the last epoch's, as d2l
    drawn = [line for line in captured.err.splitlines() if line.startswith("Animator: drawing to")]
    assert len(drawn) == 1 and os.path.isfile(drawn[0].split()[3])
    assert "24/24" in captured.err, "progress bar over all steps"


def test_show_heatmaps_writes_a_png_outside_a_notebook(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(PLOT_DIR_ENV, str(tmp_path))
    sf.show_heatmaps(torch.eye(10).reshape((1, 1, 10, 10)), xlabel="Keys", ylabel="Queries")
    path = capsys.readouterr().err.strip().split("drawn to ")[1]
    assert os.path.dirname(path) == str(tmp_path) and os.path.getsize(path) > 0
    with pytest.raises(ValueError, match="matrices"):
        sf.show_heatmaps(torch.eye(3), "k", "q")


def test_plots_without_matplotlib_note_it_once_and_draw_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib.* raises ImportError
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    assert sf.show_heatmaps(torch.eye(2).reshape(1, 1, 2, 2), "k", "q") is None
    animator = sf.Animator(xlabel="epoch")
    animator.add(1, (0.5, 0.7))
    assert animator.Y == [[0.5], [0.7]] and os.listdir(tmp_path) == []
    notes = capsys.readouterr().err.splitlines()
    assert len(notes) == 2, notes and all(n.startswith("note: matplotlib is not installed") for n in notes)


def test_timer_accumulator_try_gpu():
    timer = sf.Timer()
    assert timer.stop() >= 0 and len(timer.cumsum()) == 1 and timer.sum() == timer.avg()
    metric = sf.Accumulator(2)
    metric.add(torch.tensor(1.5), 3)
    metric.add(0.5, 1)
    assert metric[0] / metric[1] == 0.5
    assert sf.try_gpu(10_000) == torch.device("cpu")
    assert sf.try_gpu().type == ("cuda" if torch.cuda.is_available() else "cpu")
    X = torch.ones(2, 3, 2)
    assert sf.sequence_mask(X, torch.tensor([1, 2]), value=-1) is X
    torch.testing.assert_close(X, R.sequence_mask(torch.ones(2, 3, 2), torch.tensor([1, 2]), value=-1))


def test_grad_clipping_is_d2ls(trained):
    net = trained["ours"]
    clipped = []
    for clip in (R.grad_clipping, sf.grad_clipping):
        for p in net.parameters():
            p.grad = torch.full_like(p, 0.5)
        clip(net, 1)
        clipped.append([p.grad.clone() for p in net.parameters()])
    net.zero_grad(set_to_none=True)
    assert clipped[1][0].abs().max() < 0.5, "the norm is above 1: clipping must act"
    for got, want in zip(*reversed(clipped)):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("call,error,name", [
    (lambda t: sf.predict_seq2seq(t["ours"], ["go", "."], t["src_vocab"], t["tgt_vocab"], 8, "cpu"),
     TypeError, "src_sentence"),
    (lambda t: sf.predict_seq2seq(t["ours"], "go .", t["src_vocab"], t["tgt_vocab"], 0, "cpu"),
     ValueError, "num_steps"),
    (lambda t: sf.predict_seq2seq_batch(t["ours"], "go .", t["src_vocab"], t["tgt_vocab"], 8, "cpu"),
     TypeError, "src_sentences.*predict_seq2seq"),
    (lambda t: sf.predict_seq2seq_batch(t["ours"], ["go .", 3], t["src_vocab"], t["tgt_vocab"], 8, "cpu"),
     TypeError, r"src_sentences\[1\]"),
    (lambda t: sf.train_seq2seq(t["ours"], [], 0.005, 0, t["tgt_vocab"], "cpu"), ValueError, "num_epochs"),
    (lambda t: sf.train_seq2seq(t["ours"], [], -1.0, 1, t["tgt_vocab"], "cpu"), ValueError, "lr"),
    (lambda t: sf.grad_clipping(t["ours"], 0), ValueError, "theta"),
    (lambda t: sf.grad_clipping("net", 1), TypeError, "net"),
    (lambda t: sf.try_gpu(-1), ValueError, "i"),
    (lambda t: sf.Accumulator(2).add(1), ValueError, "2 values"),
    (lambda t: sf.sequence_mask(torch.ones(2, 3), torch.tensor([1])), ValueError, "valid_len"),
], ids=["sentence-list", "num-steps", "batch-str", "batch-item", "epochs", "lr", "theta", "net", "gpu",
        "accumulator", "mask"])
def test_bad_input_names_the_argument(trained, call, error, name):
    with pytest.raises(error, match=name):
        call(trained)
