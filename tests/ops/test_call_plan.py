"""The decoder's planned calls (seq2seq_fast/ops/call_plan.py): step-by-step decoding through
the module answers as the long path and as d2l's decoder do, the plan runs only the calls it
covers, and every change a caller can make between two calls sends the next call the long way."""
import copy
import gc
import pickle
import weakref

import pytest
import torch
from torch import nn

import seq2seq_fast as sf
from seq2seq_fast.ops import functional
from helpers import assert_close, decoder_inputs, paired_decoders

pytestmark = pytest.mark.skipif("cpp" not in sf.available_backends("cpu"), reason="needs the cpp backend")

V, E, H, L, B, T = 13, 5, 7, 2, 4, 6


def decoders(dtype=torch.float64, dropout=0.0):
    """(d2l's decoder, ours on cpp) in eval mode, identical weights; enc outputs, h0, ragged lens."""
    ref, fast = paired_decoders(V, E, H, L, dropout=dropout, dtype=dtype, backend="cpp", seed=4)
    _, enc, h0, lens = decoder_inputs(B, T, 1, H, L, V, dtype)
    return ref.eval(), fast.eval(), enc, h0, lens


class LongPathCalls:
    """Counts the decoder calls that took the long path (``functional.decoder_forward``)."""

    def __init__(self, monkeypatch):
        self.count = 0
        original = functional.decoder_forward

        def counted(*args, **kwargs):
            self.count += 1
            return original(*args, **kwargs)
        monkeypatch.setattr(functional, "decoder_forward", counted)


def state_after(decoder, X, enc, h0, lens, calls):
    """The state after ``calls`` calls of ``decoder`` on X from ``init_state``, without gradient:
    the first marks the decoder for a plan, the second makes and runs it."""
    with torch.no_grad():
        _, state = decoder(X, decoder.init_state((enc, h0), lens))
        for _ in range(calls - 1):
            _, state = decoder(X, state)
    return state


def decode(decoder, enc, h0, lens, steps, first=None):
    """d2l's predict loop, batched: one step per call, the argmax fed back. Returns the logits,
    the last state and the attention weights of every step."""
    state = decoder.init_state((enc, h0), lens)
    X = torch.zeros(B, 1, dtype=torch.long) if first is None else first
    outs = []
    for _ in range(steps):
        Y, state = decoder(X, state)
        outs.append((Y, state[1], decoder.attention_weights[0]))
        X = Y.argmax(dim=2)
    return outs, state


@pytest.mark.parametrize("mode", [torch.no_grad, torch.inference_mode])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_planned_steps_equal_d2l_and_run_after_the_first(mode, dtype, monkeypatch):
    ref, fast, enc, h0, lens = decoders(dtype)
    calls = LongPathCalls(monkeypatch)
    with mode():
        expected, _ = decode(ref, enc, h0, lens, 7)
        actual, state = decode(fast, enc, h0, lens, 7)
    assert calls.count == 1  # the first step projects the keys and plans; the other six are planned
    assert type(state) is sf.DecoderState and state.key_cache is not None
    for step, ((Y, h, w), (Y_ref, h_ref, w_ref)) in enumerate(zip(actual, expected)):
        assert_close(Y, Y_ref, f"logits of step {step}")
        assert_close(h, h_ref, f"state of step {step}")
        assert_close(w, w_ref, f"attention weights of step {step}")


def test_a_planned_call_returns_what_the_long_path_returns():
    _, fast, enc, h0, lens = decoders()
    X = torch.randint(0, V, (B, 3))
    with torch.no_grad():
        _, state = fast(X, fast.init_state((enc, h0), lens))
        assert fast._call_plan is not None
        planned_Y, planned_state = fast(X, state)
        planned_weights = fast.attention_weights
        long_Y, long_state = nn.Module.__call__(fast, X, state)  # forward, the long path
    torch.testing.assert_close(planned_Y, long_Y, rtol=0, atol=0)
    assert planned_Y.shape == (B, 3, V) and planned_Y.stride() == long_Y.stride()
    assert len(planned_state) == 3 and planned_state[0] is state[0] and planned_state[2] is state[2]
    torch.testing.assert_close(planned_state[1], long_state[1], rtol=0, atol=0)
    assert planned_state.key_cache is state.key_cache
    assert [w.shape for w in planned_weights] == [(B, 1, T)] * 3
    torch.testing.assert_close(torch.cat(planned_weights, 1), torch.cat(fast.attention_weights, 1), rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["grad", "autocast", "torch backend", "float lens"])
def test_no_plan_is_left_by_calls_it_does_not_cover(kind):
    _, fast, enc, h0, lens = decoders(torch.float32, dropout=0.2)
    X = torch.randint(0, V, (B, 2))
    with torch.no_grad():
        fast(X, fast.init_state((enc, h0), lens))
    assert fast._call_plan is not None
    if kind == "torch backend":
        fast.backend = "torch"
    if kind == "float lens":
        lens = lens.double()
    context = {"grad": torch.enable_grad,
               "autocast": lambda: torch.autocast("cpu", dtype=torch.bfloat16)}.get(kind, torch.no_grad)
    with context():
        state = fast.init_state((enc, h0), lens)
        fast(X, state)
    assert fast._call_plan is None


@pytest.mark.parametrize("lens_kind", ["other lengths", "no lengths", "float lengths", "(B, 1) lengths"])
def test_the_lengths_of_each_call_are_the_ones_it_is_given(lens_kind, monkeypatch):
    # Beam search hands each call a state of its own (reindexed rows and lengths, the keys gathered).
    ref, fast, enc, h0, lens = decoders()
    X = torch.randint(0, V, (B, 2))
    other = {"other lengths": torch.tensor([1, T, 0, 3]), "no lengths": None,
             "float lengths": torch.tensor([1.5, 6.0, 0.0, 2.2], dtype=torch.float64),
             "(B, 1) lengths": torch.tensor([[2], [1], [T + 4], [0]])}[lens_kind]
    with torch.no_grad():
        _, state = fast(X, fast.init_state((enc, h0), lens))
        calls = LongPathCalls(monkeypatch)
        Y, new_state = fast(X, sf.DecoderState([state[0], h0, other], state.key_cache))
        Y_ref, new_ref_state = ref(X, [enc.permute(1, 0, 2), h0, other])
    assert calls.count == (0 if lens_kind in ("other lengths", "no lengths") else 1)
    assert_close(Y, Y_ref, "logits")
    assert_close(new_state[1], new_ref_state[1], "state")


@pytest.mark.parametrize("planned_before", [False, True])
def test_calls_in_training_mode_take_the_long_path_and_its_dropout(planned_before, monkeypatch):
    _, fast, enc, h0, lens = decoders(dropout=0.5)
    X = torch.randint(0, V, (B, 3))
    state = state_after(fast, X, enc, h0, lens, 2 if planned_before else 1)
    with torch.no_grad():
        fast.train()
        calls = LongPathCalls(monkeypatch)
        first, second = fast(X, state)[0], fast(X, state)[0]
    assert calls.count == 2
    assert not torch.equal(first, second)  # dropout masks drawn anew


def test_a_call_needing_gradients_after_planned_ones_gives_every_gradient():
    ref, fast, enc, h0, lens = decoders()
    X = torch.randint(0, V, (B, 2))
    with torch.no_grad():
        _, state = fast(X, fast.init_state((enc, h0), lens))
    state = sf.DecoderState([state[0], h0, state[2]], state.key_cache)  # planned, but for the grad mode
    Y, _ = fast(X, state)  # the keys projected anew, W_k in the graph
    Y_ref, _ = ref(X, ref.init_state((enc, h0), lens))
    grad_out = torch.randn_like(Y)
    (Y * grad_out).sum().backward()
    (Y_ref * grad_out).sum().backward()
    assert isinstance(fast.attention_weights[0], torch.Tensor) and fast.attention_weights[0].requires_grad
    for (name, p), p_ref in zip(fast.named_parameters(), ref.parameters()):
        assert p.grad is not None, name
        assert_close(p.grad, p_ref.grad, f"grad of {name}")


def test_a_call_under_autocast_after_planned_ones_returns_autocast_dtypes():
    ref, fast, enc, h0, lens = decoders(torch.float32)
    X = torch.randint(0, V, (B, 2))
    with torch.no_grad():
        _, state = fast(X, fast.init_state((enc, h0), lens))
        state = sf.DecoderState([state[0], h0, state[2]], state.key_cache)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            Y, new_state = fast(X, state)
            Y_ref, new_ref_state = ref(X, ref.init_state((enc, h0), lens))
    assert Y.dtype == Y_ref.dtype == torch.bfloat16
    assert new_state[1].dtype == new_ref_state[1].dtype
    torch.testing.assert_close(Y.float(), Y_ref.float(), atol=0.05, rtol=0.05)


def outcome(call):
    """What ``call()`` gave: ("returned", its logits) or ("raised", the error's type and text)."""
    try:
        return "returned", call()[0]
    except Exception as error:  # noqa: BLE001  (compared, whatever it is)
        return "raised", (type(error), str(error))


def test_a_model_cast_between_calls_answers_as_the_long_path():
    # The parameters' dtype decides the backend (a bfloat16 model runs cast to float32): a state
    # kept from before the cast must not reach the float32 plan.
    _, fast, enc, h0, lens = decoders(torch.float32)
    X = torch.randint(0, V, (B, 1))
    with torch.no_grad():
        _, state = fast(X, fast.init_state((enc, h0), lens))
        _, state = fast(X, state)
        other = copy.deepcopy(fast).to(torch.bfloat16)
        fast.to(torch.bfloat16)
        planned, long_path = outcome(lambda: fast(X, state)), outcome(lambda: nn.Module.__call__(other, X, state))
    assert planned[0] == long_path[0]
    if planned[0] == "raised":
        assert planned[1] == long_path[1]
    else:
        torch.testing.assert_close(planned[1], long_path[1], rtol=0, atol=0)


class PlansMade:
    """Counts the plans made (``call_plan._plan``)."""

    def __init__(self, monkeypatch):
        from seq2seq_fast.ops import call_plan

        self.count = 0
        original = call_plan._plan

        def counted(decoder):
            self.count += 1
            return original(decoder)
        monkeypatch.setattr(call_plan, "_plan", counted)


def fresh_state(decoder, kind, enc, h0, lens):
    """A decoder state no call has seen: init_state's, or d2l's own tuple or list."""
    state = decoder.init_state((enc, h0), lens)
    return {"init_state": state, "d2l's tuple": tuple(state), "list": list(state)}[kind]


@pytest.mark.parametrize("kind", ["init_state", "d2l's tuple", "list"])
def test_sentence_after_sentence_from_fresh_states_is_planned_once(kind, monkeypatch):
    # predict_seq2seq's pattern, and EncoderDecoder's forward under no_grad: every sentence starts
    # from a fresh state, whose keys the planned call projects.
    ref, fast, *_ = decoders()
    calls, plans = LongPathCalls(monkeypatch), PlansMade(monkeypatch)
    with torch.no_grad():
        for sentence in range(3):
            _, enc, h0, lens = decoder_inputs(B, T + sentence, 1, H, L, V, torch.float64)
            state, ref_state = fresh_state(fast, kind, enc, h0, lens), ref.init_state((enc, h0), lens)
            X = torch.randint(0, V, (B, 2))
            for step in range(3):
                Y, state = fast(X, state)
                Y_ref, ref_state = ref(X, ref_state)
                assert type(state) is sf.DecoderState and state.key_cache is not None
                assert_close(Y, Y_ref, f"logits of sentence {sentence}, step {step}")
                assert_close(state[1], ref_state[1], f"state of sentence {sentence}, step {step}")
                assert_close(torch.cat(fast.attention_weights, 1), torch.cat(ref.attention_weights, 1),
                             f"attention weights of sentence {sentence}, step {step}")
                X = Y[:, -1:].argmax(dim=2)
    assert calls.count == 1 and plans.count == 1


def test_a_hooked_key_projection_is_called_for_each_fresh_state(monkeypatch):
    _, fast, enc, h0, lens = decoders()
    X = torch.randint(0, V, (B, 1))
    plans = PlansMade(monkeypatch)
    with torch.no_grad():
        _, state = fast(X, fast.init_state((enc, h0), lens))
        fast(X, state)  # planned: the plan is made
        seen = []
        fast.attention.W_k.register_forward_hook(lambda module, args, out: seen.append(out.shape))
        calls = LongPathCalls(monkeypatch)
        Y, state = fast(X, fast.init_state((enc, h0), lens))
        fast(X, state)  # its keys cached: no projection, no hook
        Y_long, _ = nn.Module.__call__(fast, X, fast.init_state((enc, h0), lens))
    assert seen == [(B, T, H), (B, T, H)] and calls.count == 2
    assert plans.count == 1  # the long-path calls left the plan as it was
    torch.testing.assert_close(Y, Y_long, rtol=0, atol=0)


@pytest.mark.parametrize("bad", ["encoder width", "encoder dtype", "not a tensor", "no source steps"])
def test_a_bad_fresh_state_raises_as_the_long_path(bad):
    _, fast, enc, h0, lens = decoders()
    X = torch.randint(0, V, (B, 1))
    with torch.no_grad():
        _, state = fast(X, fast.init_state((enc, h0), lens))
        fast(X, state)  # planned: the plan is made
        enc_outputs = {"encoder width": torch.randn(B, T, H + 1, dtype=torch.float64),
                       "encoder dtype": enc.permute(1, 0, 2).float(), "not a tensor": [[0.0]] * B,
                       "no source steps": torch.randn(B, 0, H, dtype=torch.float64)}[bad]
        bad_state = [enc_outputs, h0, lens]
        planned = outcome(lambda: fast(X, bad_state))
        long_path = outcome(lambda: nn.Module.__call__(fast, X, bad_state))
    assert planned[0] == long_path[0] == "raised"
    assert planned[1] == long_path[1]


@pytest.mark.parametrize("planned_before", [False, True])
def test_a_backend_requested_between_calls_runs_the_next(planned_before, monkeypatch):
    _, fast, enc, h0, lens = decoders()
    X = torch.randint(0, V, (B, 1))
    state = state_after(fast, X, enc, h0, lens, 2 if planned_before else 1)
    fast.backend = "torch"
    calls = LongPathCalls(monkeypatch)
    with torch.no_grad():
        fast(X, state)
    assert calls.count == 1 and fast._call_plan is None


def _replace_dense_weight(dec, ref):
    dec.dense.weight = nn.Parameter(torch.randn_like(dec.dense.weight))
    ref.dense.weight = nn.Parameter(dec.dense.weight.detach().clone())


def _replace_dense(dec, ref):
    dec.dense = nn.Linear(H, V).double()
    ref.dense = copy.deepcopy(dec.dense)


def _replace_rnn_weight(dec, ref):
    dec.rnn.weight_hh_l1 = nn.Parameter(torch.randn_like(dec.rnn.weight_hh_l1))
    ref.rnn.weight_hh_l1 = nn.Parameter(dec.rnn.weight_hh_l1.detach().clone())


def _replace_attention_query(dec, ref):
    dec.attention.W_q = nn.Linear(H, H, bias=False).double()
    ref.attention.W_q = copy.deepcopy(dec.attention.W_q)


def _change_key_weight_in_place(dec, ref):
    with torch.no_grad():
        dec.attention.W_k.weight.mul_(-1.5)
        ref.attention.W_k.weight.mul_(-1.5)


def _swap_parameter_in_its_dict(dec, ref):
    # What torch.func.functional_call does: a direct write into _parameters, which no hook sees.
    dec.attention.w_v._parameters["weight"] = torch.randn_like(dec.attention.w_v.weight)
    ref.attention.w_v._parameters["weight"] = dec.attention.w_v.weight.clone()


# Changes between two calls that must reach the next call: each still answers as d2l's decoder.
CHANGES = {"dense weight replaced": _replace_dense_weight, "dense layer replaced": _replace_dense,
           "GRU weight replaced": _replace_rnn_weight, "attention's W_q replaced": _replace_attention_query,
           "W_k changed in place": _change_key_weight_in_place,
           "parameter swapped in its dict": _swap_parameter_in_its_dict}


@pytest.mark.parametrize("change", list(CHANGES))
def test_a_change_between_calls_reaches_the_next_call(change, monkeypatch):
    ref, fast, enc, h0, lens = decoders()
    X = torch.randint(0, V, (B, 2))
    with torch.no_grad():
        _, state = fast(X, fast.init_state((enc, h0), lens))
        fast(X, state)  # planned: the plan is made
        assert not isinstance(fast._call_plan, str)
        _, ref_state = ref(X, ref.init_state((enc, h0), lens))
        CHANGES[change](fast, ref)
        calls = LongPathCalls(monkeypatch)
        for call in ("first", "second"):  # the first takes the long path, which plans the second
            Y, state = fast(X, state)
            Y_ref, ref_state = ref(X, ref_state)
            assert_close(Y, Y_ref, f"logits of the {call} call after the change")
            assert_close(state[1], ref_state[1], f"state after the {call} call")
    assert calls.count == 1 and type(fast._call_plan) is tuple


def test_functional_call_runs_the_parameters_it_is_given():
    ref, fast, enc, h0, lens = decoders()
    X = torch.randint(0, V, (B, 1))
    other = {name: torch.randn_like(p) for name, p in fast.named_parameters()}
    with torch.no_grad():
        _, state = fast(X, fast.init_state((enc, h0), lens))
        _, ref_state = ref(X, ref.init_state((enc, h0), lens))
        state = sf.DecoderState([state[0], ref_state[1], state[2]], state.key_cache)
        Y, _ = torch.func.functional_call(fast, other, (X, state))
        Y_ref, _ = torch.func.functional_call(ref, other, (X, ref_state))
        Y_own, _ = fast(X, state)  # the module's own parameters again afterwards
        Y_ref_own, _ = ref(X, ref_state)
    assert_close(Y, Y_ref, "logits with the given parameters")
    assert_close(Y_own, Y_ref_own, "logits with the module's parameters")


def test_hooks_registered_after_a_plan_are_called():
    _, fast, enc, h0, lens = decoders()
    X = torch.randint(0, V, (B, 1))
    with torch.no_grad():
        _, state = fast(X, fast.init_state((enc, h0), lens))
        _, state = fast(X, state)  # planned
        seen = []
        fast.register_forward_pre_hook(lambda module, args: seen.append("pre"))
        fast.register_forward_hook(lambda module, args, out: seen.append("post"))
        _, state = fast(X, state)
        assert seen == ["pre", "post"]
        handle = nn.modules.module.register_module_forward_hook(lambda module, args, out: seen.append(module))
        try:
            fast(X, state)
        finally:
            handle.remove()
    assert fast in seen


def test_an_instance_forward_and_a_compiled_call_are_honoured():
    _, fast, enc, h0, lens = decoders()
    X = torch.randint(0, V, (B, 1))
    with torch.no_grad():
        _, state = fast(X, fast.init_state((enc, h0), lens))
        fast.forward = lambda X, state: "instance forward"
        assert fast(X, state) == "instance forward"
        del fast.forward
        _, state = fast(X, state)
        fast._compiled_call_impl = lambda X, state: "compiled call"  # what Module.compile() sets
        assert fast(X, state) == "compiled call"


@pytest.mark.parametrize("planned_before", [False, True])
def test_a_deleted_parameter_fails_as_on_the_long_path(planned_before):
    _, fast, enc, h0, lens = decoders()
    X = torch.randint(0, V, (B, 1))
    state = state_after(fast, X, enc, h0, lens, 2 if planned_before else 1)
    with torch.no_grad():
        other = copy.deepcopy(fast)
        del fast.dense._parameters["bias"], other.dense._parameters["bias"]
        with pytest.raises(Exception) as long_path:
            nn.Module.__call__(other, X, state)
        with pytest.raises(type(long_path.value)) as planned:
            fast(X, state)
    assert str(planned.value) == str(long_path.value)


@pytest.mark.parametrize("bad", ["ids out of range", "batch size", "float ids", "not a tensor"])
def test_bad_input_to_a_planned_call_raises_as_the_long_path(bad):
    _, fast, enc, h0, lens = decoders()
    with torch.no_grad():
        _, state = fast(torch.zeros(B, 1, dtype=torch.long), fast.init_state((enc, h0), lens))
        X = {"ids out of range": torch.full((B, 1), V), "batch size": torch.zeros(B + 1, 1, dtype=torch.long),
             "float ids": torch.zeros(B, 1), "not a tensor": [[0]] * B}[bad]
        assert fast._call_plan is not None
        with pytest.raises((TypeError, ValueError, IndexError)) as planned:
            fast(X, state)
        with pytest.raises(type(planned.value)) as long_path:
            nn.Module.__call__(fast, X, state)
    assert str(planned.value) == str(long_path.value)


def test_copies_and_pickles_carry_no_plan():
    _, fast, enc, h0, lens = decoders()
    X = torch.randint(0, V, (B, 1))
    with torch.no_grad():
        Y, state = fast(X, fast.init_state((enc, h0), lens))
        for copied in (copy.deepcopy(fast), pickle.loads(pickle.dumps(fast)), copy.copy(fast)):
            assert copied._call_plan is None
            Y_copy, _ = copied(X, copied.init_state((enc, h0), lens))
            torch.testing.assert_close(Y_copy, Y, rtol=0, atol=0)


def test_a_planned_decoder_is_freed_without_the_garbage_collector():
    # The plan lives in the decoder: it must not hold the decoder (a cycle would keep the model
    # and what hangs off its weights alive until a collection).
    _, fast, enc, h0, lens = decoders()
    with torch.no_grad():
        _, state = fast(torch.zeros(B, 1, dtype=torch.long), fast.init_state((enc, h0), lens))
        fast(torch.zeros(B, 1, dtype=torch.long), state)
    assert fast._call_plan is not None
    alive = weakref.ref(fast)
    gc.disable()
    try:
        del fast, state
        assert alive() is None
    finally:
        gc.enable()


def test_torch_compile_of_a_step_after_planned_eager_calls():
    ref, fast, enc, h0, lens = decoders(torch.float32)
    X = torch.randint(0, V, (B, 1))
    with torch.no_grad():
        _, state = fast(X, fast.init_state((enc, h0), lens))
        _, ref_state = ref(X, ref.init_state((enc, h0), lens))
        assert fast._call_plan is not None

        def step(X, state):
            Y, new_state = fast(X, state)
            return Y, new_state[1]

        with torch._dynamo.config.patch(allow_rnn=True):
            Y, h = torch.compile(step, fullgraph=True)(X, state)
        Y_ref, ref_state = ref(X, ref_state)
    assert_close(Y, Y_ref, "compiled logits", torch.float32)
    assert_close(h, ref_state[1], "compiled state", torch.float32)


# ---- calls under CPU autocast ----

BF16_AUTOCAST = {"bfloat16 autocast": lambda: torch.autocast("cpu", dtype=torch.bfloat16)}
CONTEXTS = {**BF16_AUTOCAST, "float16 autocast": lambda: torch.autocast("cpu", dtype=torch.float16),
            "no autocast": lambda: torch.autocast("cpu", enabled=False)}


def long_path_steps(decoder, X, state, steps):
    """What ``steps`` calls through ``forward`` (the long path) return: logits, state, weights."""
    outs = []
    for _ in range(steps):
        Y, state = nn.Module.__call__(decoder, X, state)
        outs.append((Y, state[1], torch.cat(decoder.attention_weights, 1)))
    return outs


@pytest.mark.parametrize("sizes", [(V, E, H, L), (201, 32, 32, 2)], ids=["tiny", "zh: bfloat16 GEMMs"])
def test_steps_under_autocast_are_planned_and_return_what_the_long_path_returns(sizes, monkeypatch):
    # At zh's sizes the op's GEMMs take bfloat16 operands where the CPU has bfloat16 units: the
    # planned call must run the op in the backend's GEMM precision too.
    vocab, _, hidden, layers = sizes
    ref, fast = paired_decoders(*sizes, dtype=torch.float32, backend="cpp", seed=4)
    ref.eval(), fast.eval()
    _, enc, h0, lens = decoder_inputs(B, T, 1, hidden, layers, vocab, torch.float32)
    X = torch.randint(0, vocab, (B, 2))
    calls, plans = LongPathCalls(monkeypatch), PlansMade(monkeypatch)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        expected = long_path_steps(fast, X, fast.init_state((enc, h0), lens), 3)
        assert calls.count == 3 and fast._call_plan == "cpp"  # marked for a plan
        for sentence in range(2):  # each from a fresh state: its keys projected as the long path does
            state = fast.init_state((enc, h0), lens)
            for step in range(3):
                Y, state = fast(X, state)
                for got, want in zip((Y, state[1], torch.cat(fast.attention_weights, 1)), expected[step]):
                    assert got.dtype == want.dtype and got.shape == want.shape
                    torch.testing.assert_close(got, want, rtol=0, atol=0)
        Y_ref, ref_state = ref(X, ref.init_state((enc, h0), lens))
    assert calls.count == 3 and plans.count == 1  # one plan serves every call after the long path's
    assert (Y.dtype, state[1].dtype) == (Y_ref.dtype, ref_state[1].dtype) == (torch.bfloat16, torch.float32)


@pytest.mark.parametrize("planned_in, then", [("bfloat16 autocast", "no autocast"), ("no autocast", "bfloat16 autocast"),
                                              ("bfloat16 autocast", "float16 autocast")])
def test_a_call_in_another_autocast_state_takes_the_long_path_and_the_plan_stays(planned_in, then, monkeypatch):
    _, fast, enc, h0, lens = decoders(torch.float32)
    X = torch.randint(0, V, (B, 2))
    with torch.no_grad():
        with CONTEXTS[planned_in]():
            state = state_after(fast, X, enc, h0, lens, 2)
        plan = fast._call_plan
        assert type(plan) is tuple
        calls = LongPathCalls(monkeypatch)
        with CONTEXTS[then]():
            Y, new_state = fast(X, state)
            expected = long_path_steps(fast, X, state, 1)[0]
        assert calls.count == 1 + 1 and fast._call_plan is plan
    for got, want in zip((Y, new_state[1], torch.cat(fast.attention_weights, 1)), expected):
        assert got.dtype == want.dtype
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("hidden_dtype, error", [(torch.bfloat16, None), (torch.float64, TypeError)])
def test_an_autocast_plan_leaves_other_hidden_dtypes_to_the_long_path(hidden_dtype, error, monkeypatch):
    # The long path casts a bfloat16 hidden state (autocast's) up and rejects a float64 one.
    _, fast, enc, h0, lens = decoders(torch.float32)
    X = torch.randint(0, V, (B, 2))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        state = state_after(fast, X, enc, h0, lens, 2)
        odd = sf.DecoderState([state[0], state[1].to(hidden_dtype), state[2]], state.key_cache)
        calls = LongPathCalls(monkeypatch)
        if error is not None:
            with pytest.raises(error, match="hidden_state"):
                fast(X, odd)
            return
        Y, _ = fast(X, odd)
        expected = long_path_steps(fast, X, odd, 1)[0][0]
    assert calls.count == 2
    torch.testing.assert_close(Y, expected, rtol=0, atol=0)


def test_an_output_layer_run_after_the_op_is_not_planned_under_autocast(monkeypatch):
    # Where autocast runs the output layer as a bfloat16 GEMM after the op, no plan covers it.
    from seq2seq_fast.backends import autocast

    if not autocast._cpu_has_bf16_units():
        pytest.skip("no bfloat16 units: the output layer runs in the op")
    ref, fast = paired_decoders(2100, 5, 130, 1, dtype=torch.float32, backend="cpp", seed=4)
    _, enc, h0, _ = decoder_inputs(B, T, 1, 130, 1, 2100, torch.float32)
    calls = LongPathCalls(monkeypatch)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        state_after(fast.eval(), torch.randint(0, 2100, (B, 1)), enc, h0, None, 3)
    assert calls.count == 3 and fast._call_plan is None
