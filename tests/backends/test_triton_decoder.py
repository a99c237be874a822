"""The decoder's ``triton`` backend (the Python step loop with the fused kernel per step) against
the reference decoder: logits, attention weights, final state and every gradient."""

import pytest
import torch


from helpers import assert_decoder_parity, decoder_inputs, paired_decoders  # noqa: E402

pytest.importorskip("triton")
from seq2seq_fast.kernels import additive_attention as K  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def kernel_calls(monkeypatch):
    """Counts forward and backward launches, with every kernel allocation poisoned by NaN."""
    calls = {"fwd": 0, "bwd": 0}
    fwd, bwd = K.additive_attention_fwd, K.additive_attention_bwd

    def counted(name, fn):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)

        return wrapper

    monkeypatch.setattr(K, "additive_attention_fwd", counted("fwd", fwd))
    monkeypatch.setattr(K, "additive_attention_bwd", counted("bwd", bwd))
    monkeypatch.setattr(K, "_empty", lambda shape, dtype, device: torch.full(shape, float("nan"), dtype=dtype, device=device))
    return calls


def to_device(*tensors):
    return [None if t is None else t.to(DEVICE) for t in tensors]


SHAPES = [  # (B, T, S, H, E, L, V)
    (1, 1, 1, 5, 3, 1, 7),
    (3, 7, 4, 33, 6, 2, 11),
    (3, 40, 3, 16, 5, 2, 13),
]


@pytest.mark.parametrize("valid", ["ragged", "none"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}-T{}-S{}-H{}-E{}-L{}-V{}".format(*s))
def test_triton_decoder_matches_reference(shape, valid, kernel_calls):
    B, T, S, H, E, L, V = shape
    ref, fast = paired_decoders(V, E, H, L, dropout=0.2 if L > 1 else 0.0, dtype=torch.float64, backend="triton")
    ref.to(DEVICE).eval(), fast.to(DEVICE).eval()  # eval: the same numbers with dropout configured
    X, enc, h0, lens = to_device(*decoder_inputs(B, T, S, H, L, V, torch.float64, valid))
    assert_decoder_parity(ref, fast, X, enc, h0, lens, torch.float64)
    assert kernel_calls == {"fwd": S, "bwd": S}, kernel_calls


def test_triton_decoder_float32(kernel_calls):
    ref, fast = paired_decoders(20, 8, 12, 2, dtype=torch.float32, backend="triton", seed=2)
    ref.to(DEVICE), fast.to(DEVICE)
    X, enc, h0, lens = to_device(*decoder_inputs(4, 9, 3, 12, 2, 20, torch.float32))
    assert_decoder_parity(ref, fast, X, enc, h0, lens, torch.float32)
    assert kernel_calls["fwd"] == 3


def test_triton_decoder_incremental_calls_match_one_call(kernel_calls):
    """Decoding step by step through the returned state gives the one-call logits and state."""
    _, fast = paired_decoders(11, 4, 6, 2, dtype=torch.float64, backend="triton")
    fast.to(DEVICE).eval()
    X, enc, h0, lens = to_device(*decoder_inputs(2, 5, 3, 6, 2, 11, torch.float64))
    with torch.no_grad():
        whole, state_whole = fast(X, fast.init_state((enc, h0), lens))
        state = fast.init_state((enc, h0), lens)
        steps = []
        for t in range(X.shape[1]):
            Y, state = fast(X[:, t: t + 1], state)
            steps.append(Y)
    torch.testing.assert_close(torch.cat(steps, 1), whole, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(state[1], state_whole[1], atol=1e-12, rtol=1e-10)
