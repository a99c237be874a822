"""d2l's gradient clipping in one call (``functional.clip_grad_norm_``, ``grad_clipping``): the
compiled CPU op and torch's multi-tensor fallback against d2l's own loop, above and below theta."""
import pytest
import torch

from seq2seq_fast import reference as R
from seq2seq_fast.backends import cpp_ops, torch_ops
from seq2seq_fast.backends.extension import extension_error
from seq2seq_fast.ops import functional
from seq2seq_fast.tools.train import grad_clipping

SHAPES = [(201, 32), (96, 64), (96,), (1, 32), (7, 5, 3), (0,), (1,)]
PATHS = ["cpp", "torch"]


class Params:
    """d2l's scratch-model form (a ``params`` list), which both grad_clippings accept."""

    def __init__(self, dtype, scale, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.params = [torch.zeros(s, dtype=dtype, requires_grad=True) for s in SHAPES]
        for p in self.params:
            p.grad = scale * torch.randn(p.shape, generator=g, dtype=dtype)


def clip_with(path, grads, theta):
    if path == "cpp":
        if extension_error() is not None:
            pytest.skip(extension_error())
        norm = cpp_ops.clip_grad_norm_(grads, theta)
        assert norm is not None, "the compiled op must take contiguous CPU float grads"
        return norm
    return torch_ops.clip_grad_norm_(grads, theta)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("scale", [1e-3, 1.0, 30.0])  # total norm about 0.1, 100, 3000
@pytest.mark.parametrize("theta", [1.0, 250.0])
def test_clipping_is_d2ls(path, dtype, scale, theta):
    ours, theirs = Params(dtype, scale), Params(dtype, scale)
    want = torch.sqrt(sum(torch.sum(p.grad.double() ** 2) for p in theirs.params))
    R.grad_clipping(theirs, theta)
    norm = clip_with(path, [p.grad for p in ours.params], theta)
    assert norm.dtype == dtype and norm.dim() == 0
    torch.testing.assert_close(norm.double(), want, rtol=1e-6 if dtype == torch.float32 else 1e-12, atol=0)
    tol = dict(rtol=2e-6, atol=0) if dtype == torch.float32 else dict(rtol=1e-12, atol=0)
    for got, expected in zip(ours.params, theirs.params):
        torch.testing.assert_close(got.grad, expected.grad, **tol)
    clipped = torch.sqrt(sum(torch.sum(p.grad.double() ** 2) for p in ours.params))
    assert clipped <= theta * (1 + 1e-5) if want > theta else torch.equal(clipped, want)


def test_grad_clipping_reaches_the_op_and_skips_missing_grads():
    net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    net[0].weight.grad = torch.full((3, 4), 2.0)
    norm = grad_clipping(net, 1)
    torch.testing.assert_close(norm, torch.tensor(48.0).sqrt())
    torch.testing.assert_close(net[0].weight.grad, torch.full((3, 4), 2.0 / float(norm)))
    assert net[1].weight.grad is None


def test_mixed_dtypes_fall_back_to_the_torch_path():
    a, b = torch.full((3,), 4.0), torch.full((4,), 3.0, dtype=torch.float64)
    norm = functional.clip_grad_norm_([a, b], 1.0)
    assert norm.dtype == torch.float64
    torch.testing.assert_close(norm, torch.tensor(84.0, dtype=torch.float64).sqrt())
    torch.testing.assert_close(a, torch.full((3,), 4.0 / 84 ** 0.5))


@pytest.mark.parametrize("grads,theta,error,match", [
    ("not a list", 1.0, TypeError, "grads"),
    ([torch.ones(2), 3], 1.0, TypeError, "grads"),
    ([torch.ones(2)], 0, ValueError, "theta"),
    ([torch.ones(2)], float("inf"), ValueError, "theta"),
    ([torch.ones(2)], True, ValueError, "theta"),
])
def test_bad_input_is_named(grads, theta, error, match):
    with pytest.raises(error, match=match):
        functional.clip_grad_norm_(grads, theta)


def test_non_contiguous_and_mixed_device_lists_fall_back_unchanged_until_clipped():
    # The op rejects the list as a whole (checked before any write), then torch's path clips it.
    a, b = torch.full((4, 3), 2.0).t(), torch.full((5,), 2.0)
    norm = functional.clip_grad_norm_([a, b], 1.0)
    torch.testing.assert_close(norm, torch.tensor(68.0).sqrt())
    torch.testing.assert_close(b, torch.full((5,), 2.0 / 68 ** 0.5))
    torch.testing.assert_close(a, torch.full((3, 4), 2.0 / 68 ** 0.5))
