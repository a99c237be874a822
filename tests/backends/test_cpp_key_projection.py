"""The compiled key projection (``torch.ops.seq2seq_fast.project_keys``) that a decoder call
without gradient on the cpp backend uses for the state's keys: its values and keys against
torch's, and where the decoder uses it or leaves the projection to torch."""
from unittest import mock

import pytest
import torch
import torch.nn.functional as F

from helpers import assert_close, decoder_inputs, paired_decoders
from seq2seq_fast.backends import cpp_ops
from seq2seq_fast.backends.extension import extension_error

pytestmark = pytest.mark.skipif(extension_error() is not None, reason=f"{extension_error()}")


def _enc_outputs(B, T, H, dtype, layout):
    """enc_outputs (B, T, H) as d2l's state holds them (a permuted view of (T, B, H)), contiguous,
    or with every other value of a wider last dimension."""
    if layout == "permuted":
        return torch.randn(T, B, H, dtype=dtype).permute(1, 0, 2)
    if layout == "strided":
        return torch.randn(B, T, 2 * H, dtype=dtype)[..., ::2]
    return torch.randn(B, T, H, dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("B, T, H", [(1, 1, 1), (3, 7, 5), (64, 10, 32), (2, 9, 17), (5, 3, 40)])
@pytest.mark.parametrize("layout", ["permuted", "contiguous", "strided"])
def test_project_keys_matches_torch(dtype, B, T, H, layout):
    torch.manual_seed(B * 100 + H)
    enc = _enc_outputs(B, T, H, dtype, layout)
    W_k = torch.randn(H, H, dtype=dtype)
    values, key_proj = torch.ops.seq2seq_fast.project_keys(enc, W_k)
    assert values.is_contiguous() and key_proj.is_contiguous()
    assert torch.equal(values, enc.contiguous())
    assert_close(key_proj, F.linear(enc, W_k), "key_proj")


def _step_by_step(decoder, X, enc, h0, lens):
    state = decoder.init_state((enc, h0), lens)
    logits = []
    for t in range(X.shape[1]):
        Y, state = decoder(X[:, t:t + 1], state)
        logits.append(Y)
    return torch.cat(logits, 1), state


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_step_by_step_decoding_projects_once_in_the_op_and_matches_reference(dtype):
    ref, fast = paired_decoders(13, 5, 9, 2, dtype=dtype, backend="cpp")
    ref.eval(), fast.eval()
    X, enc, h0, lens = decoder_inputs(4, 6, 5, 9, 2, 13, dtype)
    with torch.no_grad(), mock.patch.object(cpp_ops, "project_keys", wraps=cpp_ops.project_keys) as spy:
        actual, state = _step_by_step(fast, X, enc, h0, lens)
        expected, ref_state = _step_by_step(ref, X, enc, h0, lens)
        values, key_proj = torch.ops.seq2seq_fast.project_keys(state[0], fast.attention.W_k.weight)
    assert spy.call_count == 1, "the keys are projected once per sentence, by the op"
    assert torch.equal(state.key_cache.key_proj, key_proj) and torch.equal(state.key_cache.values, values)
    assert_close(actual, expected, "logits")
    assert_close(state[1], ref_state[1], "final hidden state")


def test_gradients_and_hooks_leave_the_projection_to_torch():
    _, fast = paired_decoders(13, 5, 9, 1, backend="cpp")
    X, enc, h0, lens = decoder_inputs(2, 6, 1, 9, 1, 13, torch.float64)
    calls = []
    with mock.patch.object(cpp_ops, "project_keys", wraps=cpp_ops.project_keys) as spy:
        Y, _ = fast(X, fast.init_state((enc, h0), lens))  # W_k's weight needs a gradient
        Y.sum().backward()
        assert spy.call_count == 0
        assert fast.attention.W_k.weight.grad.abs().sum() > 0
        fast.attention.W_k.register_forward_hook(lambda *args: calls.append(1))
        with torch.no_grad():
            fast(X, fast.init_state((enc, h0), lens))
        assert spy.call_count == 0 and calls == [1], "a forward hook on W_k still sees its call"
