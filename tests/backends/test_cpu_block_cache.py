"""The CPU ops' block cache (csrc/cpu/workspace.cpp): freed output blocks are reused, the cache
is bounded and can be emptied, tensors from it behave like any other."""
import os
import subprocess
import sys

import pytest
import torch

import seq2seq_fast as sf
from seq2seq_fast.backends.extension import extension_error

pytestmark = pytest.mark.skipif(extension_error() is not None, reason=f"{extension_error()}")


def big_encoder_call(encoder):
    """An encoder forward whose outputs are large enough (> 64 KiB) to come from the cache."""
    X = torch.randint(0, 50, (64, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return encoder(X)


def test_freed_blocks_are_cached_and_released():
    torch.manual_seed(0)
    encoder = sf.Seq2SeqEncoder(50, 16, 64, 2, backend="cpp").eval()
    sf.empty_cache()
    assert sf.cpu_cache_bytes() == 0
    out, state = big_encoder_call(encoder)
    expected = (out.clone(), state.clone())
    del out, state
    held = sf.cpu_cache_bytes()
    assert held > 0
    # The next call takes its blocks from the cache (it does not grow) and computes the same.
    out, state = big_encoder_call(encoder)
    assert sf.cpu_cache_bytes() < held
    torch.testing.assert_close((out, state), expected, rtol=0, atol=0)
    del out, state
    assert sf.cpu_cache_bytes() == held
    assert sf.empty_cache() == held
    assert sf.cpu_cache_bytes() == 0


def test_cached_storage_resizes_and_frees_like_any_tensor():
    torch.manual_seed(0)
    encoder = sf.Seq2SeqEncoder(50, 16, 64, 2).eval()
    rnn = encoder.rnn
    weights = [[getattr(rnn, f"{name}_l{k}") for k in range(2)]
               for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]
    with torch.no_grad():
        states, _, _ = torch.ops.seq2seq_fast.encoder_forward(
            torch.randint(0, 50, (64, 12)), [encoder.embedding.weight, *(w for ws in weights for w in ws)], None,
            False)
    assert states.numel() * states.element_size() > 64 << 10  # a cached block, not malloc's
    before = states.clone()
    states.resize_(states.numel() * 2)  # storage from the cache must be resizable
    assert torch.equal(states[: before.numel()], before.flatten())
    states.resize_(3).fill_(1.0)
    assert states.tolist() == [1.0, 1.0, 1.0]


def run_python(code, **env):
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **env})


def test_capacity_zero_turns_the_cache_off():
    code = (
        "import torch, seq2seq_fast as sf\n"
        "e = sf.Seq2SeqEncoder(50, 16, 64, 2, backend='cpp').eval()\n"
        "with torch.no_grad():\n"
        "    out = e(torch.randint(0, 50, (64, 12)))\n"
        "packed = sf.cpu_cache_bytes()\n"  # the packed weights, kept whatever the block cache's size
        "del out\n"
        "print(sf.cpu_cache_bytes() - packed)\n"
    )
    result = run_python(code, SEQ2SEQ_FAST_CPU_CACHE_MB="0")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "0"
    result = run_python(code)  # the default keeps the freed outputs
    assert result.returncode == 0, result.stderr
    assert int(result.stdout) > 0


def test_bad_capacity_raises_a_named_error():
    code = (
        "import torch, seq2seq_fast as sf\n"
        "e = sf.Seq2SeqEncoder(50, 16, 64, 2, backend='cpp').eval()\n"
        "with torch.no_grad():\n"
        "    e(torch.randint(0, 50, (64, 12)))\n"
    )
    result = run_python(code, SEQ2SEQ_FAST_CPU_CACHE_MB="lots")
    assert result.returncode != 0
    assert "SEQ2SEQ_FAST_CPU_CACHE_MB" in result.stderr and "ValueError" in result.stderr
