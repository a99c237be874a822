"""The cpp CPU ops' bfloat16 GEMMs (csrc/cpu/gemm_bf16.h): the AMX tile kernel and MKL's
bfloat16 GEMM give the same results - both round the same operands to bfloat16 and accumulate
in float32, only the order of the sums differs - on shapes that exercise every edge of the
tile kernel: rows, columns and K no multiple of 16 or 32, a row chunk per thread, accumulation
into C (beta = 1) and the backward's non-transposed weights. Each kernel runs in a process of
its own (the choice is made once per process: SEQ2SEQ_FAST_AMX=0 selects MKL). (MKL's AMX
kernel sums in the same order as ours here: the two agree to the bit on this machine.)"""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from seq2seq_fast.backends import cpp_ops

# B = 75 (row chunks of 37 and 38 on 2 threads), H = 200, E = 48, V = 1000: every weight over the
# float32 panel kernel's 64k values, every step GEMM over 4M multiply-adds, N and K no multiple of 32.
SCRIPT = textwrap.dedent("""
    import sys, torch, seq2seq_fast as sf
    torch.set_num_threads(2)
    torch.manual_seed(0)
    V, E, H, L, B, T, S = 1000, 48, 200, 2, 75, 6, 5
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


def _run(path, amx):
    # SEQ2SEQ_FAST_BF16_GEMM=1: bfloat16 GEMMs without the one-time timing, which a loaded
    # machine can lose (this test compares the kernels, not that choice).
    env = dict(os.environ, SEQ2SEQ_FAST_AMX="1" if amx else "0", SEQ2SEQ_FAST_BF16_GEMM="1")
    subprocess.run([sys.executable, "-c", SCRIPT, str(path)], env=env, check=True, capture_output=True, text=True)
    kernel, out = torch.load(path)
    assert kernel == ("amx" if amx else "mkl")
    return out


@pytest.mark.skipif(cpp_ops.bf16_gemm_kernel() != "amx", reason="needs a CPU with AMX-BF16")
def test_amx_kernel_equals_mkls_bf16_gemm(tmp_path):
    amx, mkl = _run(tmp_path / "amx.pt", True), _run(tmp_path / "mkl.pt", False)
    for name, want in mkl.items():
        got = amx[name]
        scale = want.abs().max().item() + 1e-30
        # bfloat16 logits: one rounding step of the output apart at most; float32 gradients closer.
        tol = 2 ** -7 if name == "logits" else 1e-4
        assert (got - want).abs().max().item() <= tol * scale, name
