"""The shortcuts of the per-call Python path answer as the long way does: the remembered backend
choice, the lazily built attention-weight list, the contiguous values handed to the backends,
the parameter scan of ``wants_grad``, the loss's cached step positions, and the lengths and
token checks with fewer calls."""
import pickle

import pytest
import torch
from torch import nn

import seq2seq_fast as sf
from seq2seq_fast.ops import dispatch, functional
from seq2seq_fast import reference as R
from seq2seq_fast.ops import validation
from seq2seq_fast.ops.state import DecoderState
from helpers import assert_close, decoder_inputs, paired_decoders

BACKENDS = sf.available_backends("cpu")


def small_decoder(backend):
    """A float64 decoder (V = 11, E = 4, H = 6, 2 layers) on ``backend`` and inputs for it:
    (decoder, X (3, 4), enc outputs (5, 3, 6), h0 (2, 3, 6), ragged lens)."""
    _, decoder = paired_decoders(11, 4, 6, 2, backend=backend)
    return (decoder, *decoder_inputs(3, 5, 4, 6, 2, 11, torch.float64))


@pytest.mark.parametrize("grad_mode", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.int64])
@pytest.mark.parametrize("entry", ["decoder_forward", "encoder_forward", "attention_forward"])
@pytest.mark.parametrize("requested", ["auto", "torch", "cpp", "triton"])
def test_remembered_backend_choice_equals_a_fresh_one(requested, entry, dtype, grad_mode):
    tensor = torch.zeros(1, dtype=dtype)
    fresh = dispatch._choose(requested, entry, "cpu", dtype, grad_mode)
    for _ in range(2):  # the second call answers from the memo
        with torch.set_grad_enabled(grad_mode):
            if fresh[1] is None:
                backend = dispatch.backend_for(requested, entry, tensor)
                # A float16 model on the cpp loop comes wrapped (runs in float32): its inner module.
                assert getattr(backend, "inner", backend) is dispatch.backend_module(fresh[0])
            else:
                with pytest.raises(ValueError) as info:
                    dispatch.backend_for(requested, entry, tensor)
                assert str(info.value) == fresh[1]


def test_backend_name_checked_before_the_memo():
    for bad in (["cpp"], None, "cuda"):
        with pytest.raises(ValueError, match="backend must be one of"):
            dispatch.backend_for(bad, "decoder_forward", torch.zeros(1))


@pytest.mark.parametrize("mode", ["grad", "no_grad", "inference", "autocast"])
def test_each_grad_mode_and_autocast_state_gets_its_answer(mode):
    # Asked in every mode in turn, each answer is the one a fresh process would give: a memo that
    # ignored the mode would hand one mode's answer to another.
    contexts = {"grad": torch.enable_grad, "no_grad": torch.no_grad, "inference": torch.inference_mode,
                "autocast": lambda: torch.autocast("cpu", dtype=torch.bfloat16)}
    tensor = torch.zeros(1)
    for first in (True, False):
        with contexts[mode]():
            grad_mode = torch.is_grad_enabled()
            for requested in ("auto", "torch", "cpp"):
                fresh = dispatch._choose(requested, "decoder_forward", "cpu", torch.float32, grad_mode)
                if fresh[1] is None:
                    assert dispatch.backend_for(requested, "decoder_forward", tensor).NAME == fresh[0]
                else:
                    with pytest.raises(ValueError):
                        dispatch.backend_for(requested, "decoder_forward", tensor)


@pytest.mark.parametrize("backend", BACKENDS)
def test_attention_weights_list_built_on_read(backend):
    fast, X, enc, h0, lens = small_decoder(backend)
    with torch.no_grad():
        fast(X, fast.init_state((enc, h0), lens))
    weights = fast.attention_weights
    assert isinstance(weights, list) and len(weights) == 4
    assert all(w.shape == (3, 1, 5) for w in weights)
    assert fast.attention_weights is weights  # one list per call, as d2l's attribute
    assert_close(torch.cat(weights, dim=1).sum(-1), torch.ones(3, 4, dtype=torch.float64), "weights sum to 1")
    with torch.no_grad():
        fast(X[:, :2], fast.init_state((enc, h0), lens))
    assert len(fast.attention_weights) == 2  # the next call's, not the first one's


@pytest.mark.parametrize("backend", BACKENDS)
def test_attention_weights_of_a_graph_keep_their_gradient(backend):
    fast, X, enc, h0, lens = small_decoder(backend)
    enc = enc.requires_grad_()
    fast(X, fast.init_state((enc, h0), lens))
    with torch.no_grad():  # read under no_grad: still the views made in the call's grad mode
        weights = fast.attention_weights
    assert all(w.requires_grad for w in weights)
    torch.cat(weights, dim=1).square().sum().backward()
    assert enc.grad is not None and enc.grad.abs().sum() > 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_attention_weights_read_in_inference_mode_and_pickled(backend):
    fast, X, enc, h0, lens = small_decoder(backend)
    with torch.inference_mode():
        fast(X, fast.init_state((enc, h0), lens))
    assert len(fast.attention_weights) == 4
    fast(X, fast.init_state((enc, h0), lens))  # weights pending, then pickled: dropped
    copy = pickle.loads(pickle.dumps(fast))
    assert copy.attention_weights == []


@pytest.mark.parametrize("backend", BACKENDS)
def test_backends_read_contiguous_values_state_keeps_the_callers(backend):
    dec, X, enc, h0, lens = small_decoder(backend)
    state = dec.init_state((enc, h0), lens)
    assert not state[0].is_contiguous()  # d2l's permuted view of (T, B, H)
    with torch.no_grad():
        _, values, _, _, key_proj, cache = functional.prepare_decoder_call(dec, X, state)
        assert values.is_contiguous() and torch.equal(values, state[0])
        assert_close(key_proj, dec.attention.W_k(state[0]), "key_proj")
        Y, new_state = dec(X, state)
        assert new_state[0] is state[0] and new_state[2] is state[2]
        # the next step reuses the cached contiguous values and keys
        _, values2, _, _, key_proj2, _ = functional.prepare_decoder_call(dec, X[:, :1], new_state)
        assert values2 is new_state.key_cache.values and key_proj2 is new_state.key_cache.key_proj


def _reference_wants_grad(*tensors, module=None):
    if not torch.is_grad_enabled():
        return False
    if any(t is not None and t.requires_grad for t in tensors):
        return True
    return module is not None and any(p.requires_grad for p in module.parameters())


def test_wants_grad_scans_every_parameter():
    dec = sf.Seq2SeqAttentionDecoder(7, 3, 4, 2)
    x = torch.zeros(1)
    params = list(dec.parameters())
    for trainable in [[], [0], [len(params) - 1], list(range(len(params)))]:  # none, first, last, all
        for i, p in enumerate(params):
            p.requires_grad_(i in trainable)
        for grad_mode in (False, True):
            with torch.set_grad_enabled(grad_mode):
                for args in [(), (x,), (x.clone().requires_grad_(),), (None, x)]:
                    assert dispatch.wants_grad(*args, module=dec) == _reference_wants_grad(*args, module=dec)
                    assert dispatch.wants_grad(*args) == _reference_wants_grad(*args)
    shared = nn.Linear(2, 2)
    outer = nn.Sequential(shared, nn.Sequential(shared))
    assert dispatch.wants_grad(module=outer)


@pytest.mark.parametrize("layout", ["batch-major", "step-major view"])
def test_loss_with_cached_positions_over_changing_lengths(layout):
    loss = sf.MaskedSoftmaxCELoss()
    for S in (1, 4, 7, 4):  # 4 twice: the second answer comes from the cache
        base = torch.randn(3, S, 5, dtype=torch.float64)
        pred = base if layout == "batch-major" else base.transpose(0, 1).contiguous().transpose(0, 1)
        label = torch.randint(0, 5, (3, S))
        valid = torch.tensor([0, S, S + 2])
        expected = R.MaskedSoftmaxCELoss()(pred, label, valid)
        assert_close(loss(pred, label, valid), expected, f"loss S={S}")


def test_loss_over_many_lengths_on_the_torch_path():
    # Class weights send the loss to ATen's path, whose step positions are remembered per length.
    weights = torch.rand(5, dtype=torch.float64)
    loss = sf.MaskedSoftmaxCELoss(weight=weights)
    for S in list(range(1, 80)) + [3, 1]:
        pred = torch.randn(2, S, 5, dtype=torch.float64)
        label = torch.randint(0, 5, (2, S))
        valid = torch.tensor([S // 2, S + 1])
        kept = (torch.arange(S) < valid[:, None]).double()
        ce = torch.nn.functional.cross_entropy(pred.reshape(-1, 5), label.reshape(-1), weight=weights,
                                               reduction="none").view(2, S)
        assert_close(loss(pred, label, valid), (ce * kept).mean(dim=1), f"loss S={S}")


def test_plain_list_state_and_decoder_state_give_the_same_logits():
    _, dec = paired_decoders(11, 4, 6, 1)
    X, enc, h0, lens = decoder_inputs(2, 5, 3, 6, 1, 11, torch.float64)
    with torch.no_grad():
        state = dec.init_state((enc, h0), lens)
        assert isinstance(state, DecoderState)
        Y1, _ = dec(X, state)
        Y2, _ = dec(X, list(state))
    assert torch.equal(Y1, Y2)


@pytest.mark.parametrize("lens, expected", [
    (torch.tensor([1, 0, 7]), [1, 0, 7]),
    (torch.tensor([1, 0, 7], dtype=torch.int32), [1, 0, 7]),
    (torch.tensor([1, 0, 7], dtype=torch.uint8), [1, 0, 7]),
    (torch.tensor([0.5, 2.0, 3.2]), [1, 2, 4]),  # d2l compares j < len: a float length counts up
    (torch.tensor([[1.0], [0.0], [7.0]], dtype=torch.float64), [[1], [0], [7]]),
])
def test_normalized_lengths_are_int64_counts(lens, expected):
    out = validation.normalize_valid_lens(lens, "valid_lens", 3, queries=1)
    assert out.dtype == torch.int64 and out.tolist() == expected
    if lens.dtype == torch.int64:
        assert out is lens  # no copy, as .to() of a matching dtype


@pytest.mark.parametrize("lens, expected", [
    (torch.tensor([1, 0, 7]), [1, 0, 7]),
    (torch.tensor([1, 0, 7], dtype=torch.int32), [1, 0, 7]),
    (torch.tensor([0.5, 2.0, 3.2]), [1, 2, 4]),
    (torch.tensor([[1.0], [0.0], [7.0]], dtype=torch.float64), [1, 0, 7]),  # (B, 1): one query per step
    (torch.tensor([[1, 2], [0, 0], [7, 7]]), [[1, 2], [0, 0], [7, 7]]),  # left for the shape check
])
def test_decoder_lengths_normalized_without_reading_them(lens, expected):
    out = validation.normalize_lengths(lens, "enc_valid_lens")
    assert out.dtype == torch.int64 and out.tolist() == expected
    if lens.dtype == torch.int64 and lens.dim() == 1:
        assert out is lens
    with pytest.raises(ValueError, match="enc_valid_lens"):
        validation.normalize_lengths(torch.tensor([1.0, float("nan")]), "enc_valid_lens")


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.int16, torch.uint8])
def test_token_range_checked_in_every_integer_dtype(dtype):
    validation.check_tokens(torch.tensor([[0, 4]], dtype=dtype), "X", 5)
    with pytest.raises(IndexError, match="X holds token id 5, outside the vocabulary"):
        validation.check_tokens(torch.tensor([[0, 5]], dtype=dtype), "X", 5)
    if dtype != torch.uint8:
        with pytest.raises(IndexError, match="X holds token id -1, outside"):
            validation.check_tokens(torch.tensor([[-1, 5]], dtype=dtype), "X", 5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_functional_call_runs_the_parameters_it_is_given(backend):
    # torch.func.functional_call writes the given tensors into each module's _parameters, which
    # nn.GRU's _flat_weights list does not follow until the GRU's own forward: the backends read
    # the GRU's weights from _parameters, as that forward does.
    ref, fast = paired_decoders(11, 4, 6, 2, backend=backend)
    X, enc, h0, lens = decoder_inputs(3, 5, 4, 6, 2, 11, torch.float64)
    given = {name: torch.randn_like(p) for name, p in fast.named_parameters()}
    with torch.no_grad():
        Y, state = torch.func.functional_call(fast, given, (X, fast.init_state((enc, h0), lens)))
        Y_ref, ref_state = torch.func.functional_call(ref, given, (X, ref.init_state((enc, h0), lens)))
    assert_close(Y, Y_ref, "logits")
    assert_close(state[1], ref_state[1], "state")
