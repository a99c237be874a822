"""The Triton attention's dropout mask has no counter that wraps: rows 2^31 and 2^32 weights apart
draw different masks (without allocating 2^31 weights: a test kernel evaluates ``_keep`` itself).

Runs compiled on a GPU, under ``TRITON_INTERPRET=1`` (set by conftest.py) on CPU tensors.
"""
import pytest
import torch

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

from seq2seq_fast.kernels import additive_attention as K  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
T = 64  # keys per row: a power of two, so that row + 2^k // T is exactly 2^k weights further on
BLOCK = 256  # keys evaluated per row: 256 draws, p = 0.5 (equal by chance: 2^-256)


@triton.jit
def _keep_rows_kernel(out_ptr, rows_ptr, seed_ptr, dropout_p, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    row = tl.load(rows_ptr + pid)
    offs_t = tl.arange(0, BLOCK)
    keep = K._keep(tl.load(seed_ptr), row, offs_t, dropout_p)
    tl.store(out_ptr + pid * BLOCK + offs_t, keep.to(tl.int8))


def keep_masks(rows, seed=1234, p=0.5):
    rows_t = torch.tensor(rows, dtype=torch.int64, device=DEVICE)
    out = torch.full((len(rows), BLOCK), -1, dtype=torch.int8, device=DEVICE)
    _keep_rows_kernel[(len(rows),)](out, rows_t, torch.tensor([seed], device=DEVICE), p, BLOCK=BLOCK)
    return out.cpu().bool()


@pytest.mark.parametrize("row", [0, 5, 2**20 + 3])
def test_rows_2_31_and_2_32_weights_apart_draw_different_masks(row):
    far = [row + 2**31 // T, row + 2**32 // T, row + 2**33 // T, row + 2**40]
    masks = keep_masks([row] + far)
    for r, mask in zip(far, masks[1:]):
        assert not torch.equal(mask, masks[0]), f"rows {row} and {r} ({(r - row) * T} weights apart) share a mask"


def test_keep_rate_and_determinism():
    rows = list(range(64)) + [2**31 + r for r in range(64)]
    masks = keep_masks(rows, p=0.3)
    assert torch.equal(masks, keep_masks(rows, p=0.3)), "the same seed must give the same masks"
    assert not torch.equal(masks, keep_masks(rows, seed=1235, p=0.3)), "another seed, other masks"
    rate = masks.double().mean().item()
    # 32768 Bernoulli(0.7) draws: standard deviation 0.0025.
    assert abs(rate - 0.7) < 0.015, rate
    assert not keep_masks([0, 1], p=1.0).any(), "p = 1 keeps nothing"
    assert keep_masks([0, 1], p=0.0).all(), "p = 0 keeps everything"
