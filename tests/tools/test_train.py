"""The trainer does d2l's train_seq2seq math, reports progress, saves and resumes exactly."""
import pytest
import torch

import seq2seq_fast as sf
from seq2seq_fast import reference as R
from seq2seq_fast.tools.checkpoints import load_checkpoint
from seq2seq_fast.tools.plots import PLOT_DIR_ENV
from seq2seq_fast.tools.tasks import load_date_task
from seq2seq_fast.tools.train import Seq2SeqTrainer, train_seq2seq, xavier_init_weights

# Triton on a CPU runs under its interpreter: too slow for training loops.
BACKENDS = [b for b in sf.available_backends("cpu") if b != "triton"]


def _task(num_train=48, batch_size=16):
    return load_date_task(num_train=num_train, num_test=4, batch_size=batch_size, num_steps=12, seed=3)


def _model(task, dropout=0.0, dtype=torch.float64, backend="auto", hidden=12, layers=2):
    enc = sf.Seq2SeqEncoder(len(task.src_vocab), 8, hidden, layers, dropout, backend=backend)
    dec = sf.Seq2SeqAttentionDecoder(len(task.tgt_vocab), 8, hidden, layers, dropout, backend=backend)
    return sf.EncoderDecoder(enc, dec).to(dtype)


def _reference_model(task, dtype=torch.float64, hidden=12, layers=2):
    enc = R.Seq2SeqEncoder(len(task.src_vocab), 8, hidden, layers)
    dec = R.Seq2SeqAttentionDecoder(len(task.tgt_vocab), 8, hidden, layers)
    return R.EncoderDecoder(enc, dec).to(dtype)


def _d2l_loop(net, batches, lr, bos):
    """d2l's train_seq2seq body (zh edition), without its initialisation, over ``batches``."""
    optimizer = torch.optim.Adam(net.parameters(), lr=lr)
    loss = R.MaskedSoftmaxCELoss()
    net.train()
    for batch in batches:
        optimizer.zero_grad()
        X, X_valid_len, Y, Y_valid_len = batch
        bos_col = torch.tensor([bos] * Y.shape[0]).reshape(-1, 1)
        dec_input = torch.cat([bos_col, Y[:, :-1]], 1)
        Y_hat, _ = net(X, dec_input, X_valid_len)
        l = loss(Y_hat, Y, Y_valid_len)
        l.sum().backward()
        R.grad_clipping(net, 1)
        optimizer.step()


def test_xavier_init_matches_d2l():
    task = _task()
    ours, ref = _model(task), _reference_model(task)
    ours.load_state_dict(ref.state_dict())  # the embeddings keep their construction-time values
    torch.manual_seed(5)
    ours.apply(xavier_init_weights)
    torch.manual_seed(5)
    ref.apply(R.xavier_init_weights)
    for name, value in ref.state_dict().items():
        assert torch.equal(ours.state_dict()[name], value), name


@pytest.mark.parametrize("backend", BACKENDS)
def test_trainer_steps_equal_d2l_loop(backend):
    task = _task(num_train=32)
    torch.manual_seed(0)
    ours = _model(task, backend=backend)
    trainer = Seq2SeqTrainer(ours, bos=task.tgt_vocab["<bos>"], lr=0.01)
    ref = _reference_model(task)
    ref.load_state_dict(ours.state_dict())  # the same (Xavier) initial weights
    batches = list(task.train_iter.batches(0)) + list(task.train_iter.batches(1))
    result = trainer.fit(task.train_iter, max_steps=len(batches), progress=False)
    _d2l_loop(ref, batches, 0.01, task.tgt_vocab["<bos>"])
    assert result["steps"] == len(batches) == 4 and trainer.epoch == 2
    for name, value in ref.state_dict().items():
        torch.testing.assert_close(ours.state_dict()[name], value, atol=1e-9, rtol=1e-7, msg=f"parameter {name}")


def test_clipping_is_active_in_the_comparison():
    """Guard the parity test: with lr=0.01 d2l's clipping to norm 1 does change the update."""
    task = _task()
    torch.manual_seed(0)
    model = _model(task)
    trainer = Seq2SeqTrainer(model, bos=task.tgt_vocab["<bos>"], lr=0.01)
    X, X_len, Y, Y_len = next(iter(task.train_iter))
    dec_input = torch.cat([torch.full((Y.shape[0], 1), trainer.bos), Y[:, :-1]], 1)
    trainer.loss(model(X, dec_input, X_len)[0], Y, Y_len).sum().backward()
    norm = torch.sqrt(sum((p.grad ** 2).sum() for p in model.parameters()))
    assert norm > 1


@pytest.mark.parametrize("stop_at", [4, 3])  # mid-epoch and at an epoch's end (3 batches per epoch)
def test_resume_continues_identically(tmp_path, stop_at):
    task = _task()
    path = tmp_path / "run.pt"

    def fresh(seed):
        torch.manual_seed(seed)
        model = _model(task, dropout=0.2, dtype=torch.float32)
        return model, Seq2SeqTrainer(model, bos=task.tgt_vocab["<bos>"], lr=0.005,
                                     checkpoint_meta={"note": "hello"})

    torch.manual_seed(1)
    straight, trainer = fresh(0)
    torch.manual_seed(123)
    trainer.fit(task.train_iter, max_steps=8, progress=False)

    first, trainer = fresh(0)
    torch.manual_seed(123)
    trainer.fit(task.train_iter, max_steps=stop_at, progress=False, checkpoint_path=path)
    checkpoint = load_checkpoint(path)
    assert checkpoint["step"] == stop_at and checkpoint["note"] == "hello"
    torch.manual_seed(999)  # the resumed run restores the RNG state it needs
    resumed, trainer = fresh(7)
    trainer.resume(path)
    trainer.fit(task.train_iter, max_steps=8, progress=False)
    assert trainer.step == 8
    for name, value in straight.state_dict().items():
        assert torch.equal(resumed.state_dict()[name], value), name


def test_fit_reports_loss_and_tokens_per_second_with_progress_bar(capsys):
    task = _task()
    torch.manual_seed(0)
    model = _model(task, dtype=torch.float32)
    trainer = Seq2SeqTrainer(model, bos=task.tgt_vocab["<bos>"], lr=0.01)
    seen = []
    result = trainer.fit(task.train_iter, num_epochs=2, progress=True,
                         callback=lambda t, loss: seen.append(loss) and False)
    assert result["steps"] == 6 == len(seen)
    assert result["tokens_per_s"] > 0 and 0 < result["loss"] < 10
    assert "6/6" in capsys.readouterr().err, "tqdm progress bar"


def test_callback_stops_training():
    task = _task()
    model = _model(task, dtype=torch.float32)
    trainer = Seq2SeqTrainer(model, bos=task.tgt_vocab["<bos>"], lr=0.01)
    result = trainer.fit(task.train_iter, num_epochs=5, progress=False, callback=lambda t, loss: t.step == 2)
    assert result["steps"] == 2 == trainer.step


def test_train_seq2seq_prints_d2l_summary(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv(PLOT_DIR_ENV, str(tmp_path))  # d2l's loss plot, drawn outside a notebook
    task = _task()
    model = _model(task, dtype=torch.float32)
    trainer = train_seq2seq(model, task.train_iter, 0.005, 1, task.tgt_vocab, "cpu", progress=False)
    out = capsys.readouterr().out
    assert out.startswith("loss ") and "tokens/sec on cpu" in out
    assert trainer.step == len(task.train_iter)


def test_trainer_learns_the_date_task_a_little():
    task = _task(num_train=96, batch_size=32)
    torch.manual_seed(0)
    model = _model(task, dtype=torch.float32, hidden=32, layers=1)
    trainer = Seq2SeqTrainer(model, bos=task.tgt_vocab["<bos>"], lr=0.02)
    first = trainer.fit(task.train_iter, num_epochs=1, progress=False)["loss"]
    trainer.fit(task.train_iter, num_epochs=5, progress=False)
    last = trainer.fit(task.train_iter, num_epochs=6, progress=False)["loss"]
    assert last < 0.6 * first


@pytest.mark.parametrize(
    "kwargs,error,name",
    [(dict(lr=0), ValueError, "lr"), (dict(lr=0.1, bos=-1), ValueError, "bos"),
     (dict(lr=0.1, bos=1.5), TypeError, "bos")],
)
def test_trainer_rejects_bad_arguments(kwargs, error, name):
    task = _task()
    args = dict(bos=1)
    args.update(kwargs)
    with pytest.raises(error, match=name):
        Seq2SeqTrainer(_model(task), **args)


def test_fit_needs_a_stopping_rule():
    task = _task()
    trainer = Seq2SeqTrainer(_model(task), bos=1, lr=0.1)
    with pytest.raises(ValueError, match="num_epochs or max_steps"):
        trainer.fit(task.train_iter)
    with pytest.raises(TypeError, match="max_steps"):
        trainer.fit(task.train_iter, max_steps=2.5)
    with pytest.raises(ValueError, match="num_epochs"):
        trainer.fit(task.train_iter, num_epochs=-1)


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_fused_output_layer_and_loss_step_equals_the_logits_step(dropout, monkeypatch):
    """On the cpp backend the trainer runs the whole step in the compiled ops (the output layer
    and the loss fused, no logits, no autograd graph); its loss and update equal those of the
    model's forward + MaskedSoftmaxCELoss (the same dropout draws: the compiled path draws its
    masks as the forward does)."""
    task = _task(num_train=16)
    torch.manual_seed(0)
    fused = _model(task, dropout=dropout, backend="cpp")
    trainer = Seq2SeqTrainer(fused, bos=task.tgt_vocab["<bos>"], lr=0.01)
    plain = _model(task, dropout=dropout, backend="cpp")
    plain.load_state_dict(fused.state_dict())
    optimizer = torch.optim.Adam(plain.parameters(), lr=0.01)
    batch = next(iter(task.train_iter))
    from seq2seq_fast.backends import cpp_ops

    calls = []
    fused_step = cpp_ops.masked_ce_loss_grads
    monkeypatch.setattr(cpp_ops, "masked_ce_loss_grads", lambda *args: calls.append(1) or fused_step(*args))
    torch.manual_seed(4)
    loss, _ = trainer.train_step(batch)
    assert calls, "the trainer took the fused path"
    X, X_len, Y, Y_len = batch
    plain.train()
    torch.manual_seed(4)
    dec_input = torch.cat([torch.full((Y.shape[0], 1), trainer.bos), Y[:, :-1]], 1)
    l = trainer.loss(plain(X, dec_input, X_len)[0], Y, Y_len)
    l.sum().backward()
    R.grad_clipping(plain, 1)
    optimizer.step()
    torch.testing.assert_close(loss, l.detach().sum(), atol=1e-10, rtol=1e-9)
    for name, value in plain.state_dict().items():
        torch.testing.assert_close(fused.state_dict()[name], value, atol=1e-10, rtol=1e-8, msg=f"parameter {name}")
