"""The CPU dropout keep-mask op (csrc/cpu/dropout.cpp): rate, values, reproducibility under
torch.manual_seed, fresh masks per call, independence from the thread count, bad arguments."""
import pytest
import torch

from seq2seq_fast.backends.extension import extension_error

pytestmark = pytest.mark.skipif(extension_error() is not None, reason=f"{extension_error()}")


def keep_mask(shape, p, dtype=torch.float32):
    return torch.ops.seq2seq_fast.keep_mask(torch.zeros((), dtype=dtype), shape, p)


@pytest.mark.parametrize("p", [0.0, 0.1, 0.5, 0.9])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_rate_and_values(p, dtype):
    mask = keep_mask((400, 1000), p, dtype)
    assert mask.shape == (400, 1000) and mask.dtype == dtype
    dropped = (mask == 0).double().mean().item()
    assert abs(dropped - p) < 0.005, f"dropped {dropped:.4f}, expected {p}"
    assert torch.all((mask == 0) | (mask == torch.tensor(1 / (1 - p), dtype=dtype)))
    # Unbiased: the mean of the mask is 1.
    assert abs(mask.double().mean().item() - 1) < 0.01


def test_p_one_drops_everything():
    assert torch.count_nonzero(keep_mask((7, 9), 1.0)) == 0


def test_reproducible_fresh_and_thread_count_independent():
    before = torch.get_num_threads()
    try:
        torch.manual_seed(0)
        torch.set_num_threads(1)
        first, second = keep_mask((300, 1000), 0.3), keep_mask((300, 1000), 0.3)
        torch.manual_seed(0)
        torch.set_num_threads(2)
        again = keep_mask((300, 1000), 0.3)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(first, again), "same seed, same mask, whatever the thread count"
    assert not torch.equal(first, second), "every call draws a fresh mask"


def test_neighbouring_elements_are_uncorrelated():
    kept = (keep_mask((1_000_000,), 0.5) != 0).double()
    for lag in (1, 2, 64):
        corr = torch.corrcoef(torch.stack([kept[:-lag], kept[lag:]]))[0, 1].item()
        assert abs(corr) < 0.005, f"lag {lag}: correlation {corr:.4f}"


def test_bad_arguments():
    with pytest.raises(ValueError, match=r"dropout probability p must be in \[0, 1\], got 1.5"):
        keep_mask((3,), 1.5)
    with pytest.raises(ValueError, match="got -0.1"):
        keep_mask((3,), -0.1)
    with pytest.raises(TypeError, match="float32 or float64 masks, got Half"):
        keep_mask((3,), 0.1, torch.float16)
