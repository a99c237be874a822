"""Drop-in contract of the attention, encoder, loss and whole model against d2l's modules."""
import pickle

import pytest
import torch
from torch import nn
import torch.nn.functional as F

import seq2seq_fast as sf
from seq2seq_fast import reference as R
from helpers import assert_close, paired_models




def _attention_pair(key_size, query_size, hidden, dropout=0.0, backend="torch", dtype=torch.float64):
    torch.manual_seed(0)
    ref = R.AdditiveAttention(key_size, query_size, hidden, dropout).to(dtype)
    fast = sf.AdditiveAttention(key_size, query_size, hidden, dropout, backend=backend).to(dtype)
    fast.load_state_dict(ref.state_dict())
    return ref, fast


@pytest.mark.parametrize("lens", [None, "1d", "2d", "float"])
@pytest.mark.parametrize("B,Q,T,H", [(1, 1, 1, 5), (3, 4, 7, 33), (2, 2, 33, 8)], ids=lambda v: str(v))
def test_masked_softmax_matches_reference(lens, B, Q, T, H):
    X = torch.randn(B, Q, T, dtype=torch.float64)
    valid = {
        None: None,
        "1d": torch.tensor([0, T + 2, T // 2][:B]),
        "2d": torch.randint(0, T + 2, (B, Q)),
        "float": torch.tensor([0.5, 2.0, 3.7][:B], dtype=torch.float64),
    }[lens]
    expected = R.masked_softmax(X.clone(), valid)
    actual = sf.masked_softmax(X, valid)
    assert_close(actual, expected, "masked_softmax")


def test_masked_softmax_does_not_write_into_its_input():
    X = torch.randn(2, 3, 4)
    before = X.clone()
    sf.masked_softmax(X, torch.tensor([1, 2]))
    assert torch.equal(X, before)


def test_masked_softmax_half_precision_keeps_empty_rows_uniform():
    X = torch.randn(2, 1, 5).half()
    out = sf.masked_softmax(X, torch.tensor([0, 2]))
    assert torch.isfinite(out).all()
    assert torch.allclose(out[0].float(), torch.full((1, 5), 0.2), atol=1e-3)


@pytest.mark.parametrize("backend", sf.available_backends("cpu"))
@pytest.mark.parametrize("lens", [None, "1d", "2d"])
def test_additive_attention_matches_reference(backend, lens):
    try:
        ref, fast = _attention_pair(6, 10, 7, backend=backend)
        B, Q, T = 3, 4, 9
        queries = torch.randn(B, Q, 10, dtype=torch.float64, requires_grad=True)
        keys = torch.randn(B, T, 6, dtype=torch.float64, requires_grad=True)
        values = torch.randn(B, T, 5, dtype=torch.float64, requires_grad=True)
        valid = {None: None, "1d": torch.tensor([0, 4, 12]), "2d": torch.randint(0, T + 2, (B, Q))}[lens]
        grad_out = torch.randn(B, Q, 5, dtype=torch.float64)
        results = []
        for module in (ref, fast):
            module.zero_grad(set_to_none=True)
            inputs = [t.detach().clone().requires_grad_() for t in (queries, keys, values)]
            out = module(*inputs, valid)
            (out * grad_out).sum().backward()
            grads = {n: p.grad for n, p in module.named_parameters()}
            grads.update({n: t.grad for n, t in zip(("queries", "keys", "values"), inputs)})
            results.append((out.detach(), module.attention_weights.detach(), grads))
    except ValueError as exc:
        if "provides no attention_forward" in str(exc):
            pytest.skip(f"{backend} has no standalone attention op")
        raise
    (out_r, w_r, g_r), (out_f, w_f, g_f) = results
    assert_close(out_f, out_r, "context")
    assert_close(w_f, w_r, "attention weights")
    for name in g_r:
        assert_close(g_f[name], g_r[name], f"grad {name}")


def test_attention_dropout_statistics():
    # Values = identity makes the context the dropped-out weights themselves.
    torch.manual_seed(0)
    p, T = 0.3, 6
    fast = sf.AdditiveAttention(4, 4, 8, p, backend="torch").double().train()
    queries, keys = torch.randn(64, 1, 4).double(), torch.randn(64, T, 4).double()
    values = torch.eye(T, dtype=torch.float64).expand(64, T, T)
    contexts = torch.stack([fast(queries, keys, values, None) for _ in range(50)])
    weights = fast.attention_weights.expand_as(contexts)
    dropped = contexts == 0
    assert abs(dropped.double().mean().item() - p) < 0.02
    assert_close(contexts[~dropped], weights[~dropped] / (1 - p), "kept weights scaled by 1/(1-p)")


def test_encoder_matches_reference():
    ref_model, fast_model = paired_models(23, 7, 11, 3)
    X = torch.randint(0, 23, (4, 9))
    out_r, state_r = ref_model.encoder(X)
    out_f, state_f = fast_model.encoder(X)
    assert_close(out_f, out_r, "encoder outputs")
    assert_close(state_f, state_r, "encoder state")


@pytest.mark.parametrize("layout", ["batch-major", "step-major view", "strided"])
def test_loss_matches_reference(layout):
    torch.manual_seed(0)
    base = torch.randn(3, 5, 10, dtype=torch.float64)
    pred = {
        "batch-major": base,
        "step-major view": base.transpose(0, 1).contiguous().transpose(0, 1),  # as the cpp backend returns
        "strided": torch.randn(3, 5, 20, dtype=torch.float64)[:, :, ::2],
    }[layout].requires_grad_()
    label = torch.randint(0, 10, (3, 5))
    valid = torch.tensor([5, 0, 3])
    expected = R.MaskedSoftmaxCELoss()(pred, label, valid)
    actual = sf.MaskedSoftmaxCELoss()(pred, label, valid)
    smoothed = sf.MaskedSoftmaxCELoss(label_smoothing=0.1)(pred, label, valid)
    reference_smoothed = F.cross_entropy(pred.transpose(1, 2), label, reduction="none", label_smoothing=0.1)
    assert_close(smoothed, (reference_smoothed * (torch.arange(5) < valid[:, None])).mean(1), "smoothed loss")
    assert_close(actual, expected, "loss")
    (g_r,) = torch.autograd.grad(expected.sum(), pred)
    (g_f,) = torch.autograd.grad(actual.sum(), pred)
    assert_close(g_f, g_r, "grad pred")
    assert isinstance(sf.MaskedSoftmaxCELoss(), nn.CrossEntropyLoss)


def test_whole_model_forward_matches_reference():
    ref_model, fast_model = paired_models(31, 8, 12, 2)
    src, tgt = torch.randint(0, 31, (5, 7)), torch.randint(0, 31, (5, 6))
    valid = torch.tensor([7, 1, 0, 4, 9])
    Y_r, state_r = ref_model(src, tgt, valid)
    Y_f, state_f = fast_model(src, tgt, valid)
    assert_close(Y_f, Y_r, "logits")
    assert_close(state_f[1], state_r[1], "final state")
    assert state_f[2] is valid


def test_state_dict_keys_and_round_trip():
    ref_model, fast_model = paired_models(31, 8, 12, 2)
    assert list(ref_model.state_dict()) == list(fast_model.state_dict())
    # Load both ways, strictly: no extra parameters or persistent buffers.
    R.EncoderDecoder(R.Seq2SeqEncoder(31, 8, 12, 2), R.Seq2SeqAttentionDecoder(31, 8, 12, 2)).load_state_dict(
        fast_model.state_dict()
    )
    other = sf.EncoderDecoder(sf.Seq2SeqEncoder(31, 8, 12, 2), sf.Seq2SeqAttentionDecoder(31, 8, 12, 2))
    other.load_state_dict(ref_model.state_dict())


def test_submodule_types_are_d2ls():
    dec = sf.Seq2SeqAttentionDecoder(10, 4, 6, 2)
    assert type(dec.rnn) == nn.GRU and type(dec.embedding) == nn.Embedding and type(dec.dense) == nn.Linear
    assert all(type(m) == nn.Linear for m in (dec.attention.W_q, dec.attention.W_k, dec.attention.w_v))
    seen = []
    dec.apply(lambda m: seen.append(type(m)) if type(m) in (nn.Linear, nn.GRU) else None)
    assert seen.count(nn.GRU) == 1 and seen.count(nn.Linear) == 4
    dec.apply(R.xavier_init_weights)  # d2l's initialiser runs unchanged


def test_modules_survive_deepcopy_and_pickle():
    _, fast_model = paired_models(11, 4, 6, 2)
    src, tgt, valid = torch.randint(0, 11, (2, 5)), torch.randint(0, 11, (2, 3)), torch.tensor([5, 2])
    expected = fast_model(src, tgt, valid)[0]
    copied = pickle.loads(pickle.dumps(fast_model))
    assert_close(copied(src, tgt, valid)[0], expected, "pickled model")
    state = fast_model.decoder.init_state(fast_model.encoder(src), valid)
    assert len(pickle.loads(pickle.dumps(state))) == 3


def test_version_and_backends():
    assert isinstance(sf.__version__, str)
    assert "torch" in sf.available_backends()
    assert set(sf.available_backends()) <= {"torch", "triton", "cpp"}
