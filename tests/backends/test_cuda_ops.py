"""The CUDA implementations of the step-loop ops (csrc/cuda) against the CPU ops and the d2l
reference: every output and saved activation, every gradient, the final state, greedy tokens,
half precision under the "at most twice the framework's own error" rule, host syncs, CUDA graphs.

Everything but the build check needs a GPU and skips without one; the build check runs everywhere
and proves that a CUDA build of the extension compiled and registered the CUDA kernels.
"""
import glob
import os
import sys
import warnings

import pytest
import torch

from seq2seq_fast.backends import cpp_ops  # noqa: F401  (registers the ops' autograd formulas)
from seq2seq_fast import reference as R
from seq2seq_fast.backends.extension import extension_error

pytestmark = pytest.mark.skipif(extension_error() is not None, reason=f"{extension_error()}")


def gpu(test):
    """Marks a test that needs a CUDA device (skipped without one)."""
    return pytest.mark.cuda(pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")(test))


OPS = ("decoder_forward", "decoder_backward", "greedy_decode", "encoder_forward", "encoder_backward",
       "masked_ce_loss", "masked_ce_loss_backward", "linear_masked_ce", "linear_masked_ce_backward", "keep_mask")
VOCAB, EMBED, BOS, EOS = 13, 6, 1, 2
# dtype: (atol, rtol) of the CUDA op against the CPU op / the reference in the same dtype.
TOLERANCES = {torch.float64: (1e-10, 1e-8), torch.float32: (2e-4, 1e-3)}
# (B, T, S, H, L): tiny, odd and ragged sizes; T = 33 keys and H = 33 units cross a warp.
SHAPES = [(1, 1, 1, 5, 1), (3, 7, 5, 5, 2), (8, 7, 5, 33, 3), (3, 33, 4, 32, 2), (8, 7, 1, 33, 1)]


def shape_id(shape):
    return "B{}-T{}-S{}-H{}-L{}".format(*shape)


def ops():
    return torch.ops.seq2seq_fast


def backend():
    from seq2seq_fast.backends import cpp_ops as backend_cpp

    return backend_cpp


def assert_close(actual, expected, name, dtype):
    atol, rtol = TOLERANCES[dtype]
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    torch.testing.assert_close(actual.cpu(), expected.cpu(), atol=atol, rtol=rtol, msg=lambda m: f"{name}: {m}")


def to_device(value, device):
    if isinstance(value, (list, tuple)):
        return type(value)(to_device(v, device) for v in value)
    if isinstance(value, torch.Tensor):
        return value.to(device)
    return value


def poison_cuda_cache():
    """Leaves NaN in the blocks the caching allocator hands out next, so that an output element
    a kernel never wrote reads NaN (the ops allocate their outputs themselves)."""
    blocks = [torch.full((n,), float("nan"), device="cuda") for n in [1 << 10] * 64 + [1 << 18] * 16 + [1 << 22] * 4]
    del blocks


def keep_mask(shape, p, dtype, generator):
    return (torch.rand(shape, generator=generator, dtype=torch.float64) >= p).to(dtype) / (1 - p)


def ragged(B, T, generator):
    lens = torch.randint(0, T + 1, (B,), generator=generator)
    special = torch.tensor([0, T, T + 3])[:B]
    lens[: len(special)] = special
    return lens


def decoder_args(shape, dtype, dropout, valid="ragged", seed=0):
    """decoder_forward's arguments on the CPU, in schema order, from random weights."""
    B, T, S, H, L = shape
    g = torch.Generator().manual_seed(seed)

    def rnd(*size):
        return (torch.randn(*size, generator=g, dtype=torch.float64) * 0.5).to(dtype)

    X = torch.randint(0, VOCAB, (B, S), generator=g)
    enc, hidden, kp = rnd(B, T, H), rnd(L, B, H), rnd(B, T, H)
    lens = ragged(B, T, g) if valid == "ragged" else None
    w_ih = [rnd(3 * H, H + EMBED if k == 0 else H) for k in range(L)]
    w_hh = [rnd(3 * H, H) for _ in range(L)]
    b_ih = [rnd(3 * H) for _ in range(L)]
    b_hh = [rnd(3 * H) for _ in range(L)]
    attn_mask = keep_mask((S, B, T), 0.3, dtype, g) if dropout else None
    layer_mask = keep_mask((L - 1, S, B, H), 0.3, dtype, g) if dropout and L > 1 else None
    params = [rnd(VOCAB, EMBED), rnd(H, H), rnd(1, H), *w_ih, *w_hh, *b_ih, *b_hh, rnd(VOCAB, H), rnd(VOCAB)]
    return [X, enc, hidden, lens, kp, params, attn_mask, layer_mask, True]


def backward_args(args, outputs, grads):
    X, enc, _hidden, lens, kp, params, am, lm, _keep = args
    _, attention, states, inputs, layer_inputs, gates = outputs
    return (*grads, X, enc, lens, kp, params, am, lm, attention, states, inputs, layer_inputs, gates)


FORWARD_NAMES = ("logits", "attention", "states", "inputs", "layer_inputs", "gates")


def backward_names(L):
    names = ["enc_outputs", "hidden", "key_proj", "embedding", "W_q", "w_v"]
    for group in ("w_ih", "w_hh", "b_ih", "b_hh"):
        names += [f"{group}[{k}]" for k in range(L)]
    return names + ["dense_weight", "dense_bias"]


def flat(items):
    for item in items:
        if isinstance(item, (list, tuple)):
            yield from item
        else:
            yield item


# ---- runs everywhere: the build ------------------------------------------------------------------


def _cuda_toolkit_present():
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return True
    return any(os.path.exists(os.path.join(p, "bin", "nvcc")) for p in ["/usr/local/cuda"] + glob.glob("/usr/local/cuda-*"))


def test_cuda_build_registers_cuda_kernels_for_every_op():
    info = torch.ops.seq2seq_fast.build_info()
    assert info in ("cpu", "cpu+cuda"), f"unexpected build_info {info!r}"
    skip_requested = os.environ.get("SEQ2SEQ_FAST_SKIP_CUDA_BUILD", "0") == "1"
    if torch.version.cuda is not None and _cuda_toolkit_present() and not skip_requested:
        assert info == "cpu+cuda", (
            "torch is a CUDA build and a CUDA toolkit is present, so setup.py must compile csrc/cuda; "
            f"the extension reports {info!r} (rebuild without SEQ2SEQ_FAST_SKIP_CUDA_BUILD=1, or set it "
            "for the test run too)"
        )
    for op in OPS:
        has_cuda = torch._C._dispatch_has_kernel_for_dispatch_key(f"seq2seq_fast::{op}", "CUDA")
        assert has_cuda == (info == "cpu+cuda"), f"{op}: CUDA kernel registered = {has_cuda}, build {info!r}"
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"seq2seq_fast::{op}", "CPU"), f"{op}: no CPU kernel"


# ---- decoder ops: CUDA == CPU ---------------------------------------------------------------------


@gpu
@pytest.mark.parametrize("dropout", [False, True], ids=["no-dropout", "dropout"])
@pytest.mark.parametrize("valid", ["ragged", "none"])
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_decoder_ops_match_cpu_ops(shape, dtype, valid, dropout):
    L = shape[4]
    args = decoder_args(shape, dtype, dropout, valid)
    expected = ops().decoder_forward(*args)
    cuda_args = to_device(args, "cuda")
    poison_cuda_cache()
    actual = ops().decoder_forward(*cuda_args)
    for name, a, e in zip(FORWARD_NAMES, actual, expected):
        assert a.is_cuda, f"{name}: not on the GPU"
        assert_close(a, e, name, dtype)
    g = torch.Generator().manual_seed(7)
    grads = [torch.randn(t.shape, generator=g, dtype=torch.float64).to(dtype) for t in expected[:3]]
    expected_grads = ops().decoder_backward(*backward_args(args, expected, grads))
    poison_cuda_cache()
    actual_grads = ops().decoder_backward(*backward_args(cuda_args, actual, to_device(grads, "cuda")))
    for name, a, e in zip(backward_names(L), flat(actual_grads), flat(expected_grads)):
        assert_close(a, e, f"grad {name}", dtype)


@gpu
@pytest.mark.parametrize("given", ["logits", "attention", "states"])
def test_decoder_backward_with_one_gradient_given(given):
    shape = (3, 7, 5, 5, 2)
    dtype = torch.float64
    args = decoder_args(shape, dtype, dropout=True)
    cuda_args = to_device(args, "cuda")
    expected = ops().decoder_forward(*args)
    actual = ops().decoder_forward(*cuda_args)
    g = torch.Generator().manual_seed(8)
    index = ("logits", "attention", "states").index(given)
    grads = [None, None, None]
    grads[index] = torch.randn(expected[index].shape, generator=g, dtype=dtype)
    expected_grads = ops().decoder_backward(*backward_args(args, expected, grads))
    actual_grads = ops().decoder_backward(*backward_args(cuda_args, actual, to_device(grads, "cuda")))
    for name, a, e in zip(backward_names(shape[4]), flat(actual_grads), flat(expected_grads)):
        assert_close(a, e, f"grad {name} (only grad_{given})", dtype)


@gpu
def test_decoder_forward_without_kept_activations_matches():
    args = decoder_args((8, 7, 5, 33, 3), torch.float32, dropout=True)
    args[-1] = False
    expected = ops().decoder_forward(*args)
    actual = ops().decoder_forward(*to_device(args, "cuda"))
    assert actual[5].numel() == 0, "gates must be empty without keep_activations"
    for name, a, e in zip(FORWARD_NAMES[:5], actual, expected):
        assert_close(a, e, name, torch.float32)


@gpu
def test_gradcheck_float64_on_cuda_with_dropout_and_masked_rows():
    args = to_device(decoder_args((2, 3, 3, 3, 2), torch.float64, dropout=True), "cuda")
    (X, enc, hidden, lens, kp, params, am, lm, _) = args
    lens = torch.tensor([0, 2], device="cuda")
    leaves = [t.detach().clone().requires_grad_() for t in [enc, hidden, kp, *params]]

    def fn(enc, hidden, kp, *params):
        logits, attention, states, *_ = ops().decoder_forward(X, enc, hidden, lens, kp, list(params), am, lm, True)
        return logits, attention, states

    assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-6)


@gpu
def test_opcheck_decoder_ops_on_cuda():
    args = to_device(decoder_args((2, 3, 3, 3, 2), torch.float64, dropout=True), "cuda")
    for i in (1, 2, 4):
        args[i] = args[i].requires_grad_()
    args[5] = [w.requires_grad_() for w in args[5]]
    torch.library.opcheck(torch.ops.seq2seq_fast.decoder_forward.default, tuple(args))
    with torch.no_grad():
        outputs = ops().decoder_forward(*args)
    detached = [[w.detach() for w in a] if isinstance(a, list) else (a.detach() if isinstance(a, torch.Tensor) else a)
                for a in args]
    g = torch.Generator().manual_seed(5)
    grads = [torch.randn(t.shape, generator=g, dtype=t.dtype).cuda() for t in outputs[:3]]
    torch.library.opcheck(torch.ops.seq2seq_fast.decoder_backward.default,
                          backward_args(detached, outputs, grads))


# ---- decoder module: CUDA == reference -------------------------------------------------------------


def paired(H, L, dtype, dropout=0.0, seed=0):
    torch.manual_seed(seed)
    ref = R.Seq2SeqAttentionDecoder(VOCAB, EMBED, H, L, dropout).to(dtype)
    fast = R.Seq2SeqAttentionDecoder(VOCAB, EMBED, H, L, dropout).to(dtype)
    fast.load_state_dict(ref.state_dict())
    return ref, fast


def module_inputs(B, T, S, H, L, dtype, valid="ragged", seed=1, min_len=0):
    g = torch.Generator().manual_seed(seed)
    enc = torch.randn(B, T, H, generator=g, dtype=torch.float64).to(dtype)
    hidden = torch.randn(L, B, H, generator=g, dtype=torch.float64).to(dtype)
    X = torch.randint(0, VOCAB, (B, S), generator=g)
    lens = ragged(B, T, g).clamp(min=min_len) if valid == "ragged" else None
    return X, enc, hidden, lens


def run_reference(module, X, enc, hidden, lens):
    Y, state = module(X, [enc, hidden, lens])
    return Y, state[1], torch.cat(module.attention_weights, dim=1)


def run_fast(module, X, enc, hidden, lens):
    return backend().decoder_forward(module, X, enc, hidden, lens, module.attention.W_k(enc))


def run_fast_any_dtype(module, X, enc, hidden, lens):
    """The op through its autograd registration, in any dtype (the backend's dtype gate aside)."""
    params = backend().decoder_params(module)
    return backend().decoder_apply(X, enc, hidden, lens, module.attention.W_k(enc), params)


def outputs_and_grads(module, run, X, enc, hidden, lens, grads_out):
    enc = enc.clone().requires_grad_()
    hidden = hidden.clone().requires_grad_()
    module.zero_grad(set_to_none=True)
    outs = run(module, X, enc, hidden, lens)
    sum((o.double() * g).sum() for o, g in zip(outs, grads_out)).backward()
    grads = {name: p.grad for name, p in module.named_parameters()}
    grads["enc_outputs"] = enc.grad
    grads["initial hidden"] = hidden.grad
    return [o.detach() for o in outs], grads


def grads_for(B, S, H, L, T, seed=2):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, S, VOCAB, generator=g, dtype=torch.float64),
            torch.randn(L, B, H, generator=g, dtype=torch.float64),
            torch.randn(B, S, T, generator=g, dtype=torch.float64)]


@gpu
@pytest.mark.parametrize("valid", ["ragged", "none"])
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_decoder_on_cuda_matches_reference_outputs_state_and_every_gradient(shape, dtype, valid):
    B, T, S, H, L = shape
    ref, fast = paired(H, L, dtype)
    ref, fast = ref.cuda(), fast.cuda()
    X, enc, hidden, lens = to_device(module_inputs(B, T, S, H, L, dtype, valid), "cuda")
    grads_out = to_device(grads_for(B, S, H, L, T), "cuda")
    expected, expected_grads = outputs_and_grads(ref, run_reference, X, enc, hidden, lens, grads_out)
    actual, actual_grads = outputs_and_grads(fast, run_fast, X, enc, hidden, lens, grads_out)
    for name, a, e in zip(("logits", "final hidden state", "attention weights"), actual, expected):
        assert_close(a, e, name, dtype)
    assert expected_grads.keys() == actual_grads.keys()
    for name, grad in expected_grads.items():
        assert actual_grads[name] is not None, f"grad {name}: missing"
        assert_close(actual_grads[name], grad, f"grad {name}", dtype)


def max_errors(outs, grads, ref_outs, ref_grads):
    errors = {}
    for name, a, e in zip(("logits", "final hidden state", "attention weights"), outs, ref_outs):
        errors[name] = (a.double() - e.double()).abs().max().item()
    for name, e in ref_grads.items():
        errors[f"grad {name}"] = (grads[name].double() - e.double()).abs().max().item()
    return errors


@gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(3, 7, 5, 32, 2), (8, 33, 6, 33, 1)], ids=shape_id)
def test_half_precision_error_at_most_twice_the_frameworks_own(shape, dtype):
    B, T, S, H, L = shape
    ref64, fast = paired(H, L, torch.float64)
    ref_low = R.Seq2SeqAttentionDecoder(VOCAB, EMBED, H, L, 0.0)
    ref_low.load_state_dict(ref64.state_dict())
    fast.load_state_dict(ref64.state_dict())
    ref64, ref_low, fast = ref64.cuda(), ref_low.to("cuda", dtype), fast.to("cuda", dtype)
    # Rows of valid length 0 are checked against fp32 below (fp16's -1e6 fill overflows).
    X, enc, hidden, lens = to_device(module_inputs(B, T, S, H, L, torch.float64, min_len=1), "cuda")
    grads_out = to_device(grads_for(B, S, H, L, T), "cuda")
    exact = outputs_and_grads(ref64, run_reference, X, enc, hidden, lens, grads_out)
    low_args = (X, enc.to(dtype), hidden.to(dtype), lens)
    framework = outputs_and_grads(ref_low, run_reference, *low_args, grads_out)
    ours = outputs_and_grads(fast, run_fast_any_dtype, *low_args, grads_out)
    for out in ours[0]:
        assert out.dtype == dtype and torch.isfinite(out).all()
    framework_err = max_errors(*framework, *exact)
    our_err = max_errors(*ours, *exact)
    for name, err in our_err.items():
        assert err <= 2 * framework_err[name] + 1e-6, (
            f"{name}: error {err:.3g} vs fp64, more than twice the framework's {framework_err[name]:.3g} in {dtype}")


@gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_precision_rows_of_valid_length_zero_match_fp32_reference(dtype):
    B, T, S, H, L = 3, 7, 4, 32, 2
    ref32, fast = paired(H, L, torch.float32)
    ref32, fast = ref32.cuda(), fast.to("cuda", dtype)
    X, enc, hidden, _ = to_device(module_inputs(B, T, S, H, L, torch.float32), "cuda")
    lens = torch.tensor([0, 3, 0], device="cuda")
    with torch.no_grad():
        expected = run_reference(ref32, X, enc, hidden, lens)
        actual = run_fast_any_dtype(fast, X, enc.to(dtype), hidden.to(dtype), lens)
    tol = {torch.float16: 2e-2, torch.bfloat16: 1e-1}[dtype]
    rows = [0, 2]
    checks = {
        "logits": (actual[0][rows], expected[0][rows]),
        "final hidden state": (actual[1][:, rows], expected[1][:, rows]),
        "attention weights": (actual[2][rows], expected[2][rows]),
    }
    for name, (a, e) in checks.items():
        torch.testing.assert_close(a.float(), e, atol=tol, rtol=tol, msg=lambda m: f"{name}, valid length 0 rows: {m}")
    uniform = torch.full((2, S, T), 1.0 / T, device="cuda")
    torch.testing.assert_close(actual[2][[0, 2]].float(), uniform, atol=1e-3, rtol=0,
                               msg=lambda m: f"valid length 0 rows must attend uniformly: {m}")


# ---- greedy decoding --------------------------------------------------------------------------------


def greedy_model(H, L, eos_bias, dtype, seed=0):
    torch.manual_seed(seed)
    p = 0.2 if L > 1 else 0.0
    net = R.EncoderDecoder(R.Seq2SeqEncoder(VOCAB, EMBED, H, L, p),
                           R.Seq2SeqAttentionDecoder(VOCAB, EMBED, H, L, p)).to(dtype).eval()
    with torch.no_grad():
        net.apply(R.xavier_init_weights)
        net.decoder.dense.weight.mul_(4)
        net.decoder.embedding.weight.mul_(3)
        net.decoder.dense.bias[EOS] += eos_bias
    return net


def greedy_args(net, B, T, max_len, return_attention=True, seed=1, masks=False):
    g = torch.Generator().manual_seed(seed)
    src = torch.randint(3, VOCAB, (B, T), generator=g)
    src_len = torch.randint(1, T + 1, (B,), generator=g)
    src_len[0] = T
    dtype = net.decoder.dense.weight.dtype
    with torch.no_grad():
        out, state = net.encoder(src)
        values = out.permute(1, 0, 2).contiguous()
        kp = net.decoder.attention.W_k(values)
    params = [p.detach() for p in backend().decoder_params(net.decoder)]
    L, H = state.shape[0], state.shape[2]
    attn_mask = keep_mask((max_len, B, T), 0.2, dtype, g) if masks else None
    layer_mask = keep_mask((L - 1, max_len, B, H), 0.2, dtype, g) if masks and L > 1 else None
    return [values, state.detach(), src_len, kp, params, attn_mask, layer_mask, BOS, EOS, max_len,
            return_attention]


@gpu
@pytest.mark.parametrize("masks", [False, True], ids=["eval", "dropout-masks"])
@pytest.mark.parametrize("eos_bias", [-100.0, 0.0, 1.0, 100.0], ids=["never-eos", "random", "mixed", "eos-first"])
@pytest.mark.parametrize("shape", [(1, 1, 5, 1), (3, 7, 33, 2), (16, 6, 32, 3)],
                         ids=lambda s: "B{}-T{}-H{}-L{}".format(*s))
def test_greedy_cuda_equals_cpu_op(shape, eos_bias, masks):
    B, T, H, L = shape
    net = greedy_model(H, L, eos_bias, torch.float64)
    for max_len in (1, 9, 23):
        args = greedy_args(net, B, T, max_len, masks=masks)
        expected = ops().greedy_decode(*args)
        actual = ops().greedy_decode(*to_device(args, "cuda"))
        assert actual[0].is_cuda and actual[0].dtype == torch.int64 and actual[1].dtype == torch.int64
        assert torch.equal(actual[0].cpu(), expected[0]), f"max_len {max_len}: tokens differ"
        assert torch.equal(actual[1].cpu(), expected[1]), f"max_len {max_len}: lengths differ"
        assert_close(actual[2], expected[2], f"max_len {max_len}: attention", torch.float64)


@gpu
def test_greedy_cuda_float32_and_without_attention():
    net = greedy_model(32, 2, 1.0, torch.float32)
    args = greedy_args(net, 8, 6, 12)
    expected = ops().greedy_decode(*args)
    actual = ops().greedy_decode(*to_device(args, "cuda"))
    assert torch.equal(actual[0].cpu(), expected[0]) and torch.equal(actual[1].cpu(), expected[1])
    assert_close(actual[2], expected[2], "attention", torch.float32)
    args[-1] = False
    tokens, lengths, attention = ops().greedy_decode(*to_device(args, "cuda"))
    assert attention.numel() == 0
    assert torch.equal(tokens.cpu(), expected[0]) and torch.equal(lengths.cpu(), expected[1])


def count_syncs(fn):
    """(result, number of synchronizing CUDA calls torch detected while fn ran). torch's C++
    warning reaches Python's warnings inside some calls and is printed on stderr (fd 2) in
    others (seen on an H200, torch 2.11): both are counted."""
    import tempfile

    torch.cuda.synchronize()
    with tempfile.TemporaryFile() as printed, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(printed.fileno(), 2)
        torch.cuda.set_sync_debug_mode("warn")
        try:
            result = fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
            os.dup2(saved, 2)
            os.close(saved)
        printed.seek(0)
        text = printed.read().decode(errors="replace")
    message = "called a synchronizing CUDA operation"
    return result, sum(message in str(w.message) for w in caught) + text.count(message)


@gpu
@pytest.mark.parametrize("max_len", [4, 40, 200])
def test_greedy_makes_one_host_sync_whatever_the_number_of_steps(max_len):
    net = greedy_model(32, 2, -100.0, torch.float32)  # never eos: every step runs
    args = to_device(greedy_args(net, 8, 6, max_len), "cuda")
    (tokens, _, _), syncs = count_syncs(lambda: ops().greedy_decode(*args))
    assert tokens.shape == (8, max_len)
    assert syncs == 1, f"{syncs} host syncs in one greedy call of {max_len} steps (expected the final one only)"


@gpu
def test_greedy_stops_early_when_every_row_finished():
    net = greedy_model(32, 2, 100.0, torch.float32)  # eos first: every row ends at step 0
    args = to_device(greedy_args(net, 8, 6, 500), "cuda")
    tokens, lengths, attention = ops().greedy_decode(*args)
    assert tokens.shape == (8, 1) and torch.all(tokens == EOS)
    assert torch.all(lengths == 0) and attention.shape == (8, 1, 6)


@gpu
@pytest.mark.parametrize("op", ["decoder_forward", "decoder_backward"])
def test_decoder_loops_make_one_host_sync_whatever_the_number_of_steps(op):
    counts = []
    for S in (2, 30):
        args = to_device(decoder_args((4, 7, S, 16, 2), torch.float32, dropout=True), "cuda")
        if op == "decoder_forward":
            _, syncs = count_syncs(lambda: ops().decoder_forward(*args))
        else:
            outputs = ops().decoder_forward(*args)
            grads = [torch.ones_like(t) for t in outputs[:3]]
            _, syncs = count_syncs(lambda: ops().decoder_backward(*backward_args(args, outputs, grads)))
        counts.append(syncs)
    assert counts[0] == counts[1] <= 1, f"{op}: host syncs {counts} for S = 2 and 30 (the token check only)"


@gpu
def test_decoder_forward_and_backward_capture_in_a_cuda_graph():
    args = to_device(decoder_args((4, 7, 5, 16, 2), torch.float32, dropout=True), "cuda")
    eager = ops().decoder_forward(*args)
    grads = [torch.randn_like(t) for t in eager[:3]]
    eager_grads = ops().decoder_backward(*backward_args(args, eager, grads))
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        ops().decoder_forward(*args)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = ops().decoder_forward(*args)
        captured_grads = ops().decoder_backward(*backward_args(args, captured, grads))
    for out in captured:
        out.fill_(float("nan"))
    graph.replay()
    for name, a, e in zip(FORWARD_NAMES, captured, eager):
        assert_close(a, e, f"replayed {name}", torch.float32)
    for name, a, e in zip(backward_names(2), flat(captured_grads), flat(eager_grads)):
        assert_close(a, e, f"replayed grad {name}", torch.float32)


# ---- encoder ----------------------------------------------------------------------------------------


def encoder_args(B, T, H, L, dtype, dropout, seed=0):
    g = torch.Generator().manual_seed(seed)

    def rnd(*size):
        return (torch.randn(*size, generator=g, dtype=torch.float64) * 0.5).to(dtype)

    X = torch.randint(0, VOCAB, (B, T), generator=g)
    w_ih = [rnd(3 * H, EMBED if k == 0 else H) for k in range(L)]
    w_hh = [rnd(3 * H, H) for _ in range(L)]
    b_ih = [rnd(3 * H) for _ in range(L)]
    b_hh = [rnd(3 * H) for _ in range(L)]
    mask = keep_mask((L - 1, T, B, H), 0.3, dtype, g) if dropout and L > 1 else None
    return [X, [rnd(VOCAB, EMBED), *w_ih, *w_hh, *b_ih, *b_hh], mask, True]


@gpu
@pytest.mark.parametrize("dropout", [False, True], ids=["no-dropout", "dropout"])
@pytest.mark.parametrize("shape", [(1, 1, 5, 1), (3, 7, 5, 2), (8, 7, 33, 3), (3, 10, 32, 2)],
                         ids=lambda s: "B{}-T{}-H{}-L{}".format(*s))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_encoder_ops_match_cpu_ops(shape, dtype, dropout):
    B, T, H, L = shape
    args = encoder_args(B, T, H, L, dtype, dropout)
    expected = ops().encoder_forward(*args)
    cuda_args = to_device(args, "cuda")
    poison_cuda_cache()
    actual = ops().encoder_forward(*cuda_args)
    for name, a, e in zip(("states", "layer_inputs", "gates"), actual, expected):
        assert_close(a, e, name, dtype)
    grad = torch.randn(expected[0].shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64).to(dtype)
    X, params, mask, _ = args
    expected_grads = ops().encoder_backward(grad, X, params, mask, *expected)
    cX, cparams, cmask, _ = cuda_args
    poison_cuda_cache()
    actual_grads = ops().encoder_backward(grad.cuda(), cX, cparams, cmask, *actual)
    names = ["embedding"] + [f"{g}[{k}]" for g in ("w_ih", "w_hh", "b_ih", "b_hh") for k in range(L)]
    for name, a, e in zip(names, flat(actual_grads), flat(expected_grads)):
        assert_close(a, e, f"grad {name}", dtype)


@gpu
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_encoder_on_cuda_matches_reference_outputs_state_and_every_gradient(dtype):
    torch.manual_seed(0)
    B, T, H, L = 5, 9, 33, 2
    ref = R.Seq2SeqEncoder(VOCAB, EMBED, H, L, 0.0).to("cuda", dtype)
    fast = R.Seq2SeqEncoder(VOCAB, EMBED, H, L, 0.0).to("cuda", dtype)
    fast.load_state_dict(ref.state_dict())
    X = torch.randint(0, VOCAB, (B, T), device="cuda")
    g = torch.Generator().manual_seed(1)
    g_out = torch.randn(T, B, H, generator=g, dtype=torch.float64).to("cuda", dtype)
    g_state = torch.randn(L, B, H, generator=g, dtype=torch.float64).to("cuda", dtype)
    results = []
    for module, run in ((ref, lambda m: m(X)), (fast, lambda m: backend().encoder_forward(m, X))):
        module.zero_grad(set_to_none=True)
        out, state = run(module)
        ((out * g_out).sum() + (state * g_state).sum()).backward()
        results.append((out.detach(), state.detach(), {n: p.grad for n, p in module.named_parameters()}))
    (e_out, e_state, e_grads), (a_out, a_state, a_grads) = results
    assert_close(a_out, e_out, "outputs", dtype)
    assert_close(a_state, e_state, "final state", dtype)
    for name, grad in e_grads.items():
        assert_close(a_grads[name], grad, f"grad {name}", dtype)


@gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_encoder_half_precision_error_at_most_twice_the_frameworks_own(dtype):
    B, T, H, L = 4, 9, 32, 2
    args64 = to_device(encoder_args(B, T, H, L, torch.float64, dropout=False), "cuda")
    X, params, _, _ = args64
    emb = params[0]
    w_ih, w_hh, b_ih, b_hh = (params[1 + i * L:1 + (i + 1) * L] for i in range(4))
    g = torch.Generator().manual_seed(2)
    grad = torch.randn(L, T + 1, B, H, generator=g, dtype=torch.float64).cuda()

    def framework(dt):
        gru = torch.nn.GRU(EMBED, H, L).to("cuda", dt)
        with torch.no_grad():
            for k in range(L):
                for name, src in (("weight_ih", w_ih), ("weight_hh", w_hh), ("bias_ih", b_ih), ("bias_hh", b_hh)):
                    getattr(gru, f"{name}_l{k}").copy_(src[k])
        e = emb.detach().to(dt).requires_grad_()  # a leaf of its own in every dtype
        out, state = gru(torch.nn.functional.embedding(X.t(), e))
        loss = (out.double() * grad[L - 1, 1:]).sum() + (state.double() * grad[:, T]).sum()
        loss.backward()
        grads = [e.grad] + [getattr(gru, f"{n}_l{k}").grad for n in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")
                            for k in range(L)]
        return [out.detach(), state.detach()] + grads

    def ours(dt):
        leaves = [emb.to(dt)] + [w.to(dt) for w in (*w_ih, *w_hh, *b_ih, *b_hh)]
        leaves = [t.detach().requires_grad_() for t in leaves]
        states, _, _ = ops().encoder_forward(X, leaves, None, True)
        out, state = states[L - 1, 1:], states[:, T]
        ((out.double() * grad[L - 1, 1:]).sum() + (state.double() * grad[:, T]).sum()).backward()
        return [out.detach(), state.detach()] + [t.grad for t in leaves]

    exact = framework(torch.float64)
    theirs, mine = framework(dtype), ours(dtype)
    names = ["outputs", "final state", "grad embedding"] + [
        f"grad {n}[{k}]" for n in ("w_ih", "w_hh", "b_ih", "b_hh") for k in range(L)]
    for name, m, t, e in zip(names, mine, theirs, exact):
        err, ref_err = (m.double() - e).abs().max().item(), (t.double() - e).abs().max().item()
        assert err <= 2 * ref_err + 1e-6, f"{name}: error {err:.3g}, more than twice the framework's {ref_err:.3g}"


# ---- bad inputs --------------------------------------------------------------------------------------


@gpu
def test_cuda_ops_raise_named_errors():
    args = to_device(decoder_args((3, 7, 5, 5, 2), torch.float32, dropout=False), "cuda")

    def call(**changes):
        names = ["X", "enc", "hidden", "lens", "kp"]
        changed = list(args)
        for name, value in changes.items():
            changed[names.index(name)] = value
        return ops().decoder_forward(*changed)

    X, enc, hidden, lens, kp = args[:5]
    with pytest.raises(IndexError, match="X holds token id 13"):
        call(X=torch.full_like(X, VOCAB))
    with pytest.raises(IndexError, match="X holds token id -1"):
        call(X=torch.full_like(X, -1))
    with pytest.raises(TypeError, match="X must hold int64"):
        call(X=X.int())
    with pytest.raises(ValueError, match="X must be on device"):
        call(X=X.cpu())
    with pytest.raises(TypeError, match="hidden_state must have dtype"):
        call(hidden=hidden.double())
    with pytest.raises(ValueError, match="hidden_state must be on enc_outputs's device"):
        call(hidden=hidden.cpu())
    with pytest.raises(ValueError, match="key_proj must have shape"):
        call(kp=kp[:, :3])
    with pytest.raises(ValueError, match="valid_lens must be on enc_outputs's device"):
        call(lens=lens.cpu())
    with pytest.raises(TypeError, match="valid_lens must be int64"):
        call(lens=lens.float())
    with pytest.raises(TypeError, match="enc_outputs must be float16, bfloat16, float32 or float64"):
        call(enc=enc.int())
    greedy = to_device(greedy_args(greedy_model(5, 2, 0.0, torch.float32), 3, 4, 6), "cuda")
    with pytest.raises(IndexError, match="eos must be a token id"):
        ops().greedy_decode(*greedy[:-4], BOS, VOCAB, 6, True)
    with pytest.raises(ValueError, match="max_len must be >= 1"):
        ops().greedy_decode(*greedy[:-4], BOS, EOS, 0, True)
    enc_args = to_device(encoder_args(3, 4, 5, 2, torch.float32, dropout=False), "cuda")
    with pytest.raises(IndexError, match="X holds token id 13"):
        ops().encoder_forward(torch.full_like(enc_args[0], VOCAB), *enc_args[1:])


# ---- the loss and the keep-mask: CUDA == CPU ----------------------------------------------------------


def loss_case(B, S, V, dtype, layout, seed=0):
    """CPU logits (B, S, V) in ``layout``, labels, lengths with 0 and > S, a gradient of the loss."""
    g = torch.Generator().manual_seed(seed)
    if layout == "step-major":  # the decoder's (B, S, V) view of (S, B, V) logits
        pred = (4 * torch.randn(S, B, V, generator=g, dtype=torch.float64)).transpose(0, 1).to(dtype)
    else:
        pred = (4 * torch.randn(B, S, V, generator=g, dtype=torch.float64)).to(dtype)
    label = torch.randint(0, V, (B, S), generator=g)
    valid_len = torch.randint(0, S + 3, (B,), generator=g)
    valid_len[0] = 0
    if B > 1:
        valid_len[1] = S + 5
    return pred, label, valid_len, torch.randn(B, generator=g, dtype=torch.float64).to(dtype)


def cuda_loss(pred, label, valid_len, grad):
    """(loss, lse, grad_pred) of the CUDA ops, on the CPU; pred keeps its layout on the device."""
    dev = pred.transpose(0, 1).contiguous().cuda().transpose(0, 1) if not pred.is_contiguous() else pred.cuda()
    loss, lse = ops().masked_ce_loss(dev, label.cuda(), valid_len.cuda())
    grad_pred = ops().masked_ce_loss_backward(grad.cuda(), dev, label.cuda(), valid_len.cuda(), lse)
    assert grad_pred.stride() == dev.stride(), "the gradient keeps the logits' layout"
    return loss.cpu(), lse.cpu(), grad_pred.cpu()


@gpu
@pytest.mark.parametrize("layout", ["contiguous", "step-major"])
@pytest.mark.parametrize("shape", [(1, 1, 1), (5, 7, 13), (64, 10, 201), (3, 4, 1000), (2, 3, 8000)], ids=str)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_loss_ops_match_cpu_ops(shape, layout, dtype):
    pred, label, valid_len, grad = loss_case(*shape, dtype, layout)
    loss, lse = ops().masked_ce_loss(pred, label, valid_len)
    grad_pred = ops().masked_ce_loss_backward(grad, pred, label, valid_len, lse)
    for name, actual, expected in zip(("loss", "lse", "grad_pred"), cuda_loss(pred, label, valid_len, grad),
                                      (loss, lse, grad_pred)):
        assert_close(actual, expected, f"{shape} {layout}: {name}", dtype)


@gpu
def test_loss_without_steps_is_nan_and_gradcheck_passes():
    pred = torch.randn(3, 0, 5, dtype=torch.float64, device="cuda")
    loss, _ = ops().masked_ce_loss(pred, torch.zeros(3, 0, dtype=torch.long, device="cuda"),
                                   torch.tensor([0, 1, 2], device="cuda"))
    assert torch.isnan(loss).all()
    from seq2seq_fast.backends import cpp_ops as backend_cpp

    pred, label, valid_len, _ = loss_case(3, 4, 5, torch.float64, "step-major", seed=3)
    pred = pred.cuda().requires_grad_()
    torch.autograd.gradcheck(lambda p: backend_cpp.masked_ce_loss(p, label.cuda(), valid_len.cuda()), (pred,))
    torch.library.opcheck(torch.ops.seq2seq_fast.masked_ce_loss.default,
                          (pred.detach().float(), label.cuda(), valid_len.cuda()))


@gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_loss_half_precision_error_at_most_twice_the_frameworks_own(dtype):
    pred, label, valid_len, grad = loss_case(16, 9, 301, torch.float64, "step-major", seed=5)
    exact = ops().masked_ce_loss(pred, label, valid_len)[0]
    fast = cuda_loss(pred.to(dtype), label, valid_len, grad.to(dtype))[0].double()
    framework = R.MaskedSoftmaxCELoss()(pred.to(dtype).cuda(), label.cuda(), valid_len.cuda()).cpu().double()
    err_fast, err_framework = (fast - exact).abs().max().item(), (framework - exact).abs().max().item()
    floor = torch.finfo(dtype).eps * exact.abs().max().item()  # one rounding of the output
    assert err_fast <= max(2 * err_framework, floor), (err_fast, err_framework)


def cuda_keep_mask(shape, p, dtype=torch.float32):
    return ops().keep_mask(torch.zeros((), dtype=dtype, device="cuda"), shape, p)


@gpu
@pytest.mark.parametrize("p", [0.0, 0.1, 0.5, 0.9])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16], ids=str)
def test_keep_mask_rate_values_and_scale(p, dtype):
    mask = cuda_keep_mask((400, 1000), p, dtype)
    assert mask.shape == (400, 1000) and mask.dtype == dtype and mask.is_cuda
    dropped = (mask == 0).double().mean().item()
    assert abs(dropped - p) < 0.005, f"dropped {dropped:.4f}, expected {p}"
    assert torch.all((mask == 0) | (mask == torch.tensor(1 / (1 - p), dtype=dtype, device="cuda")))
    assert abs(mask.double().mean().item() - 1) < 0.01 + (p > 0) * 2 * torch.finfo(dtype).eps
    assert torch.count_nonzero(cuda_keep_mask((7, 9), 1.0, dtype)) == 0


@gpu
def test_keep_mask_reproducible_fresh_and_the_documented_stream():
    torch.manual_seed(0)
    first, second = cuda_keep_mask((300, 1000), 0.3), cuda_keep_mask((300, 1000), 0.3)
    torch.manual_seed(0)
    assert torch.equal(first, cuda_keep_mask((300, 1000), 0.3)), "same seed, same mask"
    assert not torch.equal(first, second), "every call draws a fresh mask"
    kept = (cuda_keep_mask((1_000_000,), 0.5) != 0).double()
    for lag in (1, 2, 64):
        corr = torch.corrcoef(torch.stack([kept[:-lag], kept[lag:]]))[0, 1].item()
        assert abs(corr) < 0.005, f"lag {lag}: correlation {corr:.4f}"
    gen = torch.cuda.default_generators[torch.cuda.current_device()]
    if hasattr(gen, "get_offset"):  # element i = output offset + i of the stream keyed by the seed
        seed, offset = gen.initial_seed(), gen.get_offset()
        mask = cuda_keep_mask((1000,), 0.5).cpu()
        M = 2**64 - 1
        expected = []
        for i in range(1000):
            z = (seed + (offset + i + 1) * 0x9E3779B97F4A7C15) & M
            z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M
            z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M
            expected.append(2.0 if ((z ^ (z >> 31)) >> 32) >= 2**31 else 0.0)
        assert torch.equal(mask, torch.tensor(expected)), "the mask is not the documented SplitMix64 stream"


@gpu
def test_keep_mask_syncs_nothing_and_replays_fresh_masks_in_a_cuda_graph():
    like = torch.zeros((), device="cuda")
    torch.cuda.set_sync_debug_mode("error")
    try:
        ops().keep_mask(like, (64, 64), 0.5)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        ops().keep_mask(like, (64, 64), 0.5)  # warm up outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = ops().keep_mask(like, (64, 64), 0.5)
    masks = []
    for _ in range(3):
        graph.replay()
        masks.append(captured.clone())
    torch.cuda.synchronize()
    assert not torch.equal(masks[0], masks[1]) and not torch.equal(masks[1], masks[2]), "replays draw fresh masks"
    assert all(abs((m == 0).double().mean().item() - 0.5) < 0.05 for m in masks)


@gpu
def test_loss_and_keep_mask_raise_named_errors():
    pred, label, valid_len, _ = loss_case(3, 4, 5, torch.float32, "contiguous")
    pred, label, valid_len = pred.cuda(), label.cuda(), valid_len.cuda()
    with pytest.raises(IndexError, match="label holds token id 5"):
        ops().masked_ce_loss(pred, torch.full_like(label, 5), valid_len)
    with pytest.raises(ValueError, match=r"valid_len must hold lengths >= 0"):
        ops().masked_ce_loss(pred, label, torch.full_like(valid_len, -1))
    with pytest.raises(ValueError, match="label must be on device"):
        ops().masked_ce_loss(pred, label.cpu(), valid_len)
    with pytest.raises(TypeError, match="pred must be float16, bfloat16, float32 or float64"):
        ops().masked_ce_loss(pred.long(), label, valid_len)
    with pytest.raises(ValueError, match=r"dropout probability p must be in \[0, 1\], got 1.5"):
        cuda_keep_mask((3,), 1.5)
    with pytest.raises(TypeError, match="float16, bfloat16, float32 or float64 masks, got Long"):
        ops().keep_mask(torch.zeros((), dtype=torch.long, device="cuda"), (3,), 0.5)
