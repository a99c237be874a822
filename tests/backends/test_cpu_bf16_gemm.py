"""The cpp CPU ops' bfloat16 GEMMs (csrc/cpu/gemm_bf16.h): each tile kernel this CPU has (AMX,
AVX512-BF16) gives MKL's bfloat16 GEMM's results - all round the same operands to bfloat16 and
accumulate in float32, only the order of the sums differs - on shapes that exercise every edge
of the kernels: rows, columns and K no multiple of 6, 16 or 32, the last column block 1, 2 or 3
panels wide, column chunks per thread and row pieces (N under four blocks), accumulation into C
(beta = 1), the backward's non-transposed weights and transposed A, and GEMMs whose B is packed
per call. Each kernel runs in a process of its own (the choice is made once per process:
SEQ2SEQ_FAST_AMX=0 and SEQ2SEQ_FAST_AVX512BF16=0 rule them out). (MKL's AMX kernel sums in the
same order as ours: on an AMX machine the two agreed to the bit.)"""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from seq2seq_fast.backends import cpp_ops

# B = 75 (row chunks of 37 and 38 on 2 threads, 6-row blocks and 3 over), H = 200, E = 100,
# V = 1000: every step GEMM over 4M multiply-adds, N and K no multiple of 32; N mod 64 = 8 (H),
# 24 (3H), 40 (V): last blocks of 1, 2 and 3 panels; N = E: two blocks, so rows in pieces.
SCRIPT = textwrap.dedent("""
    import sys, torch, seq2seq_fast as sf
    torch.set_num_threads(2)
    torch.manual_seed(0)
    V, E, H, L, B, T, S = 1000, 100, 200, 2, 75, 6, 5
    enc = sf.Seq2SeqEncoder(V, E, H, L, backend="cpp")
    dec = sf.Seq2SeqAttentionDecoder(V, E, H, L, backend="cpp")
    net = sf.EncoderDecoder(enc, dec)
    src, tgt = torch.randint(0, V, (B, T)), torch.randint(0, V, (B, S))
    lens = torch.randint(0, T + 2, (B,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        Y, _ = net(src, tgt, lens)
    (Y.float() * torch.randn(Y.shape)).sum().backward()
    out = {"logits": Y.float(), **{n: p.grad for n, p in net.named_parameters()}}
    torch.save((torch.ops.seq2seq_fast.cpu_bf16_gemm(), out), sys.argv[1])
""")


# The settings that select each kernel.
KERNELS = {"amx": {}, "avx512bf16": {"SEQ2SEQ_FAST_AMX": "0"},
           "mkl": {"SEQ2SEQ_FAST_AMX": "0", "SEQ2SEQ_FAST_AVX512BF16": "0"}}


def _run(path, kernel):
    # SEQ2SEQ_FAST_BF16_GEMM=1: MKL's bfloat16 GEMMs without the one-time timing, which a loaded
    # machine can lose (this test compares the kernels, not that choice).
    env = dict(os.environ, SEQ2SEQ_FAST_AMX="1", SEQ2SEQ_FAST_AVX512BF16="1", SEQ2SEQ_FAST_BF16_GEMM="1")
    env.update(KERNELS[kernel])
    subprocess.run([sys.executable, "-c", SCRIPT, str(path)], env=env, check=True, capture_output=True, text=True)
    ran, out = torch.load(path)
    assert ran == kernel
    return out


def _has(kernel):
    if kernel == "amx":
        return cpp_ops.bf16_gemm_kernel() == "amx"
    return cpp_ops.bf16_gemm_kernel() != "none" and getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()


@pytest.mark.parametrize("kernel", [pytest.param(k, marks=pytest.mark.skipif(not _has(k), reason=f"needs {k}"))
                                    for k in ("amx", "avx512bf16")])
def test_tile_kernel_equals_mkls_bf16_gemm(tmp_path, kernel):
    tiles, mkl = _run(tmp_path / "tiles.pt", kernel), _run(tmp_path / "mkl.pt", "mkl")
    for name, want in mkl.items():
        got = tiles[name]
        scale = want.abs().max().item() + 1e-30
        # bfloat16 logits: one rounding step of the output apart at most; float32 gradients closer.
        # The AVX512-BF16 kernel sums in another order than MKL: float32 differences of a step's
        # output flip some bfloat16 roundings of the next step's operands, so the gradients drift
        # apart by up to 2^-9.6 of their scale (measured); cpu_bf16_matmul's test below bounds
        # one GEMM's error tightly.
        tol = 2 ** -7 if name == "logits" else 1e-4 if kernel == "amx" else 2 ** -8
        assert (got - want).abs().max().item() <= tol * scale, name


# ---- one GEMM: torch.ops.seq2seq_fast.cpu_bf16_matmul against the float64 product ----

BF16 = pytest.mark.skipif(cpp_ops.bf16_gemm_kernel() == "none", reason="no bfloat16 GEMM kernel on this CPU")
# (M, K, N): a step's rows (6-row blocks and 1-5 over), K odd, under and over 32, N ending in
# 1-4 partial panels, a weight gradient's many rows (row pieces), 1 x 1 x 1.
SHAPES = [(64, 512, 1536), (75, 200, 600), (7, 33, 1000), (5, 100, 17), (1, 64, 64), (300, 48, 100),
          (97, 70, 130), (13, 1, 3), (1, 1, 1), (641, 96, 64)]


def _operand(rows, cols, trans, generator):
    """A (rows, cols) matrix, row-major or (trans) the transpose of a row-major one."""
    return torch.randn(cols, rows, generator=generator).t() if trans else torch.randn(rows, cols, generator=generator)


def _check_product(got, a, b):
    a64, b64 = a.bfloat16().double(), b.bfloat16().double()
    want = a64 @ b64
    # float32 accumulation of K products: each sum within K * 2^-24 of the sum of its |terms|
    # (a lost or doubled pair of k, or a wrong column, is orders of magnitude over).
    bound = a.shape[1] * 2.0 ** -24 * (a64.abs() @ b64.abs()) + 1e-30
    assert got.dtype == torch.float32 and got.shape == want.shape
    assert ((got.double() - want).abs() <= 2 * bound).all(), ((got.double() - want).abs() / bound).max()


@BF16
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("packed", [True, False], ids=["packed-weight", "per-call"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_bf16_matmul_equals_float64_product_of_rounded_operands(shape, packed, threads):
    M, K, N = shape
    g = torch.Generator().manual_seed(M * 7 + K * 3 + N)
    previous = torch.ops.seq2seq_fast.set_cpu_threads(threads)
    try:
        for trans_a in (False, True):
            for trans_b in (False, True):
                a, b = _operand(M, K, trans_a, g), _operand(K, N, trans_b, g)
                _check_product(torch.ops.seq2seq_fast.cpu_bf16_matmul(a, b, packed), a, b)
    finally:
        torch.ops.seq2seq_fast.set_cpu_threads(previous)


@BF16
def test_bf16_matmul_empty_and_zero_k():
    op = torch.ops.seq2seq_fast.cpu_bf16_matmul
    assert op(torch.ones(0, 5), torch.ones(5, 3), True).shape == (0, 3)
    assert torch.equal(op(torch.ones(4, 0), torch.ones(0, 3), False), torch.zeros(4, 3))


@pytest.mark.parametrize("a, b, error, match", [
    (torch.ones(2, 3, dtype=torch.float64), torch.ones(3, 2), TypeError, "a must be float32, got Double"),
    (torch.ones(2, 3), torch.ones(3, 2, dtype=torch.bfloat16), TypeError, "b must be float32, got BFloat16"),
    (torch.ones(2, 3, 1), torch.ones(3, 2), ValueError, r"a must be 2-D, got shape \[2, 3, 1\]"),
    (torch.ones(2, 3), torch.ones(4, 2), ValueError, r"b must have a.size\(1\) = 3 rows, got shape \[4, 2\]"),
    (torch.ones(2, 6)[:, ::2], torch.ones(3, 2), ValueError, "a must be row-major or the transpose"),
])
def test_bf16_matmul_rejects_bad_arguments(a, b, error, match):
    if cpp_ops.bf16_gemm_kernel() == "none":
        with pytest.raises(ValueError, match='cpu_bf16_gemm\\(\\) is "none"'):
            torch.ops.seq2seq_fast.cpu_bf16_matmul(a, b, False)
        return
    with pytest.raises(error, match=match):
        torch.ops.seq2seq_fast.cpu_bf16_matmul(a, b, False)


# ---- the key projection with a gradient: cpp_ops.bf16_key_projection ----


@BF16
@pytest.mark.parametrize("B, T, H", [(3, 7, 33), (64, 30, 160), (1, 1, 1)])
def test_bf16_key_projection_and_its_gradients_are_products_of_rounded_operands(B, T, H):
    g = torch.Generator().manual_seed(B + T + H)
    values = torch.randn(B, T, H, generator=g).requires_grad_()
    weight = torch.randn(H, H, generator=g).requires_grad_()
    grad = torch.randn(B, T, H, generator=g)
    keys = cpp_ops.bf16_key_projection(values, weight)
    keys.backward(grad)
    rows, grad_rows = values.detach().reshape(-1, H), grad.reshape(-1, H)
    _check_product(keys.detach().reshape(-1, H), rows, weight.detach().t())
    _check_product(values.grad.reshape(-1, H), grad_rows, weight.detach())
    _check_product(weight.grad, grad_rows.t(), rows)
    assert keys.shape == values.shape and values.grad.shape == values.shape
