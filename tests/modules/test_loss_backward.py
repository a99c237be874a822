"""EncoderDecoder.masked_ce_loss_backward: the compiled ops' whole training step, without
autograd's graph, gives the gradients autograd gives, and autograd runs wherever that path does
not apply."""
import pytest
import torch

import seq2seq_fast as sf
from seq2seq_fast.backends import cpp_ops
from helpers import assert_close, paired_models, ragged_lens

pytestmark = pytest.mark.skipif(sf.unavailable_reason("cpp", "cpu") is not None, reason="no C++ extension")

VOCAB, EMBED, HIDDEN = 13, 6, 10


def _batch(B=5, T=7, S=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    X = torch.randint(0, VOCAB, (B, T), generator=g)
    dec_X = torch.randint(0, VOCAB, (B, S), generator=g)
    label = torch.randint(0, VOCAB, (B, S), generator=g)
    valid_len = torch.randint(0, S + 3, (B,), generator=g)
    valid_len[0] = 0
    return X, dec_X, label, valid_len, ragged_lens(B, T, g)


def _model(layers=2, dropout=0.0, dtype=torch.float64, backend="cpp"):
    return paired_models(VOCAB, EMBED, HIDDEN, layers, dropout, dtype, backend)[1].train()


def _autograd_step(net, X, dec_X, label, valid_len, lens, seed):
    net.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    loss = net.masked_ce_loss(X, dec_X, label, valid_len, lens)
    loss.sum().backward()
    return loss.detach(), {name: p.grad for name, p in net.named_parameters()}


def _own_step(net, X, dec_X, label, valid_len, lens, seed):
    net.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    loss = net.masked_ce_loss_backward(X, dec_X, label, valid_len, lens)
    return loss, {name: p.grad for name, p in net.named_parameters()}


@pytest.fixture
def own_path_calls(monkeypatch):
    """The calls that took the compiled path (cpp_ops.masked_ce_loss_grads)."""
    calls = []
    real = cpp_ops.masked_ce_loss_grads
    monkeypatch.setattr(cpp_ops, "masked_ce_loss_grads", lambda *args: calls.append(1) or real(*args))
    return calls


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("layers,dropout", [(1, 0.0), (2, 0.3), (3, 0.5)])
def test_own_step_equals_autograd(own_path_calls, dtype, layers, dropout):
    """The same ops in the same order, the same dropout draws: the same loss and gradients,
    bit for bit, with ragged lengths (0, T, beyond T) and a target length of 0."""
    net = _model(layers, dropout, dtype)
    batch = _batch()
    expected_loss, expected = _autograd_step(net, *batch, seed=3)
    loss, grads = _own_step(net, *batch, seed=3)
    assert own_path_calls == [1]
    assert loss.dtype == dtype and not loss.requires_grad
    assert torch.equal(loss, expected_loss)
    assert grads.keys() == expected.keys()
    for name, grad in expected.items():
        assert torch.equal(grads[name], grad), name


def test_own_step_matches_the_reference_model(own_path_calls):
    """Against d2l's modules and loss through autograd (float64, no dropout)."""
    ref, net = paired_models(VOCAB, EMBED, HIDDEN, 2, 0.0, torch.float64, "cpp")
    X, dec_X, label, valid_len, lens = _batch(B=6, T=5, S=8, seed=7)
    ref.train()
    net.train()
    expected = sf.reference.MaskedSoftmaxCELoss()(ref(X, dec_X, lens)[0], label, valid_len)
    expected.sum().backward()
    loss = net.masked_ce_loss_backward(X, dec_X, label, valid_len, lens)
    assert own_path_calls == [1]
    assert_close(loss, expected.detach(), "loss")
    grads = dict(net.named_parameters())
    for name, p in ref.named_parameters():
        assert_close(grads[name].grad, p.grad, f"grad {name}")


def test_gradients_accumulate_and_batch_of_one(own_path_calls):
    net = _model()
    X, dec_X, label, valid_len, lens = _batch(B=1, T=1, S=1)
    first = net.masked_ce_loss_backward(X, dec_X, label, valid_len + 1, lens)
    once = {name: p.grad.clone() for name, p in net.named_parameters()}
    second = net.masked_ce_loss_backward(X, dec_X, label, valid_len + 1, lens)
    assert torch.equal(first, second) and own_path_calls == [1, 1]
    for name, p in net.named_parameters():
        torch.testing.assert_close(p.grad, 2 * once[name], msg=name)


def _hook_on_encoder(net):
    net.encoder.register_forward_hook(lambda *args: None)


def _hook_on_parameter(net):
    net.decoder.dense.weight.register_hook(lambda g: g * 2)


def _hook_on_nested_module(net):
    net.decoder.attention.W_k.register_forward_pre_hook(lambda *args: None)


def _post_accumulate_hook(net):
    net.encoder.rnn.weight_hh_l0.register_post_accumulate_grad_hook(lambda p: None)


def _frozen_embedding(net):
    net.decoder.embedding.weight.requires_grad_(False)


@pytest.mark.parametrize("change", [_hook_on_encoder, _hook_on_nested_module, _hook_on_parameter,
                                    _post_accumulate_hook, _frozen_embedding],
                         ids=["module hook", "nested module hook", "parameter hook", "post-accumulate hook",
                              "frozen parameter"])
def test_autograd_runs_where_a_hook_or_frozen_parameter_needs_it(own_path_calls, change):
    """Hooks run and a frozen parameter keeps no gradient, as with loss.sum().backward()."""
    net = _model(dropout=0.2)
    change(net)
    batch = _batch()
    expected_loss, expected = _autograd_step(net, *batch, seed=2)
    loss, grads = _own_step(net, *batch, seed=2)
    assert own_path_calls == []
    assert torch.equal(loss, expected_loss)
    for name, grad in expected.items():
        assert (grads[name] is None) == (grad is None), name
        assert grad is None or torch.equal(grads[name], grad), name


def test_under_autocast_matches_autograd(own_path_calls):
    """A float32 model under CPU bfloat16 autocast: the ops run as autograd's path runs them (the
    same GEMM precision), the loss float32 as d2l's under autocast. Not bit for bit: a backward
    called inside the autocast region runs the key projection's GEMMs in bfloat16 (torch's mm is
    on autocast's list), where this path keeps them float32."""
    net = _model(layers=2, dropout=0.2, dtype=torch.float32)
    batch = _batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected_loss, expected = _autograd_step(net, *batch, seed=4)
        loss, grads = _own_step(net, *batch, seed=4)
    assert own_path_calls == [1]
    assert loss.dtype == expected_loss.dtype == torch.float32 and torch.equal(loss, expected_loss)
    for name, grad in expected.items():
        assert grads[name].dtype == torch.float32, name
        scale = grad.abs().max().item()
        torch.testing.assert_close(grads[name], grad, rtol=0, atol=1e-2 * scale + 1e-9, msg=name)


def test_autograd_runs_on_other_backends_and_for_bfloat16_models(own_path_calls):
    batch = _batch()
    _model(backend="torch").masked_ce_loss_backward(*batch)
    net = _model(dtype=torch.bfloat16)  # run cast to float32 on every call
    loss = net.masked_ce_loss_backward(*batch)
    assert own_path_calls == []
    assert net.encoder.embedding.weight.grad.dtype == torch.bfloat16


def test_bad_input_raises_as_the_autograd_path_does():
    net = _model()
    X, dec_X, label, valid_len, lens = _batch()
    with pytest.raises(IndexError, match="label"):
        net.masked_ce_loss_backward(X, dec_X, torch.full_like(label, VOCAB), valid_len, lens)
    with pytest.raises(TypeError, match="X"):
        net.masked_ce_loss_backward(X.double(), dec_X, label, valid_len, lens)
    with pytest.raises(ValueError, match="valid_len"):
        net.masked_ce_loss_backward(X, dec_X, label, -valid_len - 1, lens)
    with pytest.raises(TypeError, match="label"):
        net.masked_ce_loss_backward(X, dec_X, "label", valid_len, lens)
    assert all(p.grad is None for p in net.parameters())
