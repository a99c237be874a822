"""Every public entry point rejects bad input with the right exception, naming the argument."""
import subprocess
import sys

import pytest
import torch

import seq2seq_fast as sf
from helpers import paired_models

BACKENDS = sf.available_backends("cpu")
V, E, H, L, B, T = 9, 4, 6, 2, 3, 5


@pytest.fixture(params=BACKENDS)
def decoder_and_state(request):
    _, model = paired_models(V, E, H, L, dtype=torch.float32, backend=request.param)
    dec = model.decoder
    state = dec.init_state((torch.randn(T, B, H), torch.randn(L, B, H)), torch.tensor([5, 2, 0]))
    return dec, state


def _bad_calls(dec, state):
    enc, hidden, lens = state
    X = torch.zeros(B, 2, dtype=torch.long)
    return [
        ("X", TypeError, lambda: dec(X.float(), state)),
        ("X", TypeError, lambda: dec(X.bool(), state)),
        ("X", ValueError, lambda: dec(torch.zeros(B, dtype=torch.long), state)),
        ("token id 9", IndexError, lambda: dec(torch.full((B, 2), V), state)),
        ("token id -1", IndexError, lambda: dec(torch.full((B, 2), -1), state)),
        ("X must have the state's batch", ValueError, lambda: dec(X[:2], state)),
        ("batch of at least one", ValueError, lambda: dec(X[:0], state)),
        ("state", TypeError, lambda: dec(X, [enc, hidden])),
        ("hidden_state", ValueError, lambda: dec(X, [enc, hidden[:1], lens])),
        ("hidden_state", ValueError, lambda: dec(X, [enc, hidden[:, :, :3], lens])),
        ("enc_outputs", ValueError, lambda: dec(X, [enc[:, :, :2], hidden, lens])),
        ("enc_outputs", ValueError, lambda: dec(X, [enc[:, :0], hidden, lens])),
        ("enc_outputs", TypeError, lambda: dec(X, [enc.double(), hidden, lens])),
        ("enc_valid_lens", ValueError, lambda: dec(X, [enc, hidden, torch.tensor([1, -1, 2])])),
        ("enc_valid_lens", ValueError, lambda: dec(X, [enc, hidden, torch.tensor([1, 2])])),
        ("enc_valid_lens", ValueError, lambda: dec(X, [enc, hidden, torch.ones(B, 2)])),
        ("enc_valid_lens", TypeError, lambda: dec(X, [enc, hidden, torch.ones(B, dtype=torch.bool)])),
        ("enc_valid_lens", ValueError, lambda: dec(X, [enc, hidden, torch.tensor([1.0, float("nan"), 2.0])])),
    ]


def test_decoder_rejects_bad_input(decoder_and_state):
    dec, state = decoder_and_state
    for needle, error, call in _bad_calls(dec, state):
        with pytest.raises(error) as info:
            call()
        assert needle.split()[0] in str(info.value), f"{needle}: message was {info.value}"


def test_valid_lens_beyond_T_and_float_are_legal(decoder_and_state):
    dec, (enc, hidden, _) = decoder_and_state
    X = torch.zeros(B, 2, dtype=torch.long)
    Y1, _ = dec(X, [enc, hidden, torch.tensor([50, 5, 7])])
    Y2, _ = dec(X, [enc, hidden, None])
    torch.testing.assert_close(Y1, Y2)
    Y3, _ = dec(X, [enc, hidden, torch.tensor([[1.5], [2.0], [0.2]])])  # (B, 1) per query, as d2l allows
    Y4, _ = dec(X, [enc, hidden, torch.tensor([2, 2, 1])])
    torch.testing.assert_close(Y3, Y4)


def test_encoder_and_loss_reject_bad_input():
    _, model = paired_models(V, E, H, L)
    with pytest.raises(IndexError, match="X"):
        model.encoder(torch.full((2, 3), V))
    with pytest.raises(TypeError, match="X"):
        model.encoder(torch.zeros(2, 3))
    loss = sf.MaskedSoftmaxCELoss()
    pred = torch.randn(2, 3, V)
    with pytest.raises(IndexError, match="label"):
        loss(pred, torch.full((2, 3), V), torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="label"):
        loss(pred, torch.zeros(2, 4, dtype=torch.long), torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="valid_len"):
        loss(pred, torch.zeros(2, 3, dtype=torch.long), torch.tensor([1, -2]))


def test_attention_rejects_bad_input():
    attn = sf.AdditiveAttention(4, 4, 8, 0.0)
    q, k, v = torch.randn(2, 1, 4), torch.randn(2, 5, 4), torch.randn(2, 5, 3)
    with pytest.raises(ValueError, match="keys"):
        attn(q, k[:, :3], v, None)
    with pytest.raises(ValueError, match="valid_lens"):
        attn(q, k, v, torch.tensor([1, 2, 3]))
    with pytest.raises(TypeError, match="queries"):
        attn(q.long(), k, v, None)
    with pytest.raises(ValueError, match="queries"):
        attn(q[0], k, v, None)
    with pytest.raises(ValueError, match="X"):
        sf.masked_softmax(torch.randn(2, 3), None)


def test_backend_names_are_checked():
    with pytest.raises(ValueError, match="backend"):
        sf.Seq2SeqAttentionDecoder(5, 2, 3, 1, backend="cuda")
    with pytest.raises(ValueError, match="backend"):
        sf.AdditiveAttention(2, 2, 2, 0.0, backend=None)


def test_unavailable_backend_says_why(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    if torch.cuda.is_available():
        pytest.skip("triton can run on this machine's GPU")
    _, model = paired_models(V, E, H, L, backend="triton")
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        model(torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 2, dtype=torch.long), torch.tensor([3, 1]))


@pytest.mark.parametrize("error, reason", [
    ("ImportError('hidden by the test')", "not built"),
    ("RuntimeError('registration failed in the test')", "RuntimeError: registration failed in the test"),
    ("OSError('undefined symbol in the test')", "OSError: undefined symbol in the test"),
])
def test_package_imports_without_the_extension(error, reason):
    # _C fails to load with any exception: the package must import, run the torch backend and
    # say why cpp is off.
    code = (
        "import sys, importlib.abc\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path, target=None):\n"
        f"        if name == 'seq2seq_fast._C': raise {error}\n"
        "sys.meta_path.insert(0, Block())\n"
        "import torch, seq2seq_fast as sf\n"
        "assert 'cpp' not in sf.available_backends(), sf.available_backends()\n"
        "print(sf.unavailable_reason('cpp'))\n"
        "dec = sf.Seq2SeqAttentionDecoder(5, 2, 3, 1)\n"
        "s = dec.init_state((torch.randn(4, 2, 3), torch.randn(1, 2, 3)), None)\n"
        "print(dec(torch.zeros(2, 1, dtype=torch.long), s)[0].shape)\n"
        "print(float(sf.MaskedSoftmaxCELoss()(torch.zeros(2, 1, 5), torch.zeros(2, 1, dtype=torch.long), torch.ones(2))[0]))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert reason in out and "torch.Size([2, 1, 5])" in out, out
