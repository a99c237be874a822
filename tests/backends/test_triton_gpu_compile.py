"""The kernels compile for real GPUs (sm_80, sm_90) on a machine without one.

The interpreter runs the kernels' Python and catches wrong numbers, but not what only the
compiler rejects (non-constexpr globals, loop-carried type changes, unsupported casts). Triton
ships ptxas, so a subprocess without ``TRITON_INTERPRET`` compiles every variant to a cubin.
"""
import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("triton.backends.nvidia")

SCRIPT = textwrap.dedent(
    """
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from seq2seq_fast.kernels import additive_attention as K

    def signature(fn, pointers, constants):
        sig = {}
        for name in fn.arg_names:
            if name in constants:
                sig[name] = "constexpr"
            elif name in pointers:
                sig[name] = "*" + pointers[name]
            elif name.startswith("stride"):
                sig[name] = "i64"
            elif name in ("Q", "T", "H", "DV"):
                sig[name] = "i32"
            else:
                sig[name] = "fp32"
        return sig

    variants = [(90, dtype, flags) for dtype in ("fp32", "fp16", "bf16", "fp64") for flags in (False, True)]
    variants += [(80, dtype, True) for dtype in ("fp32", "bf16")]
    for arch, dtype, flags in variants:
        acc = "fp64" if dtype == "fp64" else "fp32"
        inputs = dict(q_ptr=dtype, k_ptr=dtype, v_ptr=dtype, wv_ptr=dtype, lens_ptr="i64", seed_ptr="i64")
        kernels = (
            (K._additive_attn_fwd_kernel, dict(context_ptr=dtype, weights_ptr=dtype, scores_ptr=acc, stats_ptr=acc), {}),
            (K._additive_attn_bwd_kernel, dict(dq_ptr=acc, dk_ptr=acc, dv_ptr=acc, dw_ptr=acc, dctx_ptr=dtype,
                                               dweights_ptr=dtype, stats_ptr=acc, delta_ptr=acc),
             dict(HAS_DWEIGHTS=flags)),
        )
        for fn, outputs, extra in kernels:
            constants = dict(HAS_LENS=flags, HAS_DROPOUT=flags, ACC=tl.float64 if dtype == "fp64" else tl.float32,
                             BLOCK_T=32, BLOCK_H=64, BLOCK_D=64, **extra)
            source = ASTSource(fn, signature(fn, {**inputs, **outputs}, constants), constexprs=constants)
            compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32), options={"num_warps": 4})
            assert compiled.asm["cubin"], (fn.__name__, arch, dtype)
    print("compiled")
    """
)


def test_kernels_compile_for_sm80_and_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0 and "compiled" in result.stdout, result.stderr[-4000:]
