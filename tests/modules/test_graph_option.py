"""The decoder's capture_cuda_graph option: replays equal eager calls (needs a GPU)."""
import pickle

import pytest
import torch

import seq2seq_fast as sf
from helpers import paired_decoders


def test_option_is_inert_on_cpu_and_survives_pickling():
    _, dec = paired_decoders(11, 4, 6, 2, dtype=torch.float32)
    dec.capture_cuda_graph = True
    state = dec.init_state((torch.randn(5, 3, 6), torch.randn(2, 3, 6)), torch.tensor([5, 2, 0]))
    X = torch.randint(0, 11, (3, 4))
    with torch.no_grad():
        Y, _ = dec(X, state)
        torch.testing.assert_close(Y, dec.forward_eager(X, state)[0])
    assert dec._graphs == {}
    assert pickle.loads(pickle.dumps(dec)).capture_cuda_graph


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
@pytest.mark.parametrize("backend", [b for b in ("triton", "cpp") if b in sf.available_backends("cuda")])
def test_graph_replay_equals_eager(backend):
    torch.manual_seed(0)
    dec = sf.Seq2SeqAttentionDecoder(50, 16, 32, 2, backend=backend, capture_cuda_graph=True).cuda().eval()
    make = lambda: (torch.randint(0, 50, (4, 6), device="cuda"),  # noqa: E731
                    dec.init_state((torch.randn(7, 4, 32, device="cuda"), torch.randn(2, 4, 32, device="cuda")),
                                   torch.tensor([7, 3, 0, 9], device="cuda")))
    with torch.no_grad():
        for _ in range(3):  # the first call captures, the next ones replay with new inputs
            X, state = make()
            Y, new_state = dec(X, state)
            Y_eager, state_eager = dec.forward_eager(X, state)
            torch.testing.assert_close(Y, Y_eager)
            torch.testing.assert_close(new_state[1], state_eager[1])
    assert len(dec._graphs) == 1
