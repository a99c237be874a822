"""CUDAGraphDecoder: a captured decoder forward replays to the eager result, for the ``cpp`` and
``triton`` backends; bad construction arguments raise named errors (runs without a GPU too)."""
import pytest
import torch

import seq2seq_fast as sf
from seq2seq_fast.ops.dispatch import unavailable_reason
from seq2seq_fast.modules import cuda_graph
from seq2seq_fast.modules.cuda_graph import CUDAGraphDecoder

VOCAB, EMBED, H, L = 13, 8, 32, 2


def decoder(backend, device="cuda"):
    torch.manual_seed(0)
    return sf.Seq2SeqAttentionDecoder(VOCAB, EMBED, H, L, dropout=0.1, backend=backend).to(device).eval()


def call_inputs(dec, B, T, S, seed, device="cuda"):
    g = torch.Generator().manual_seed(seed)
    X = torch.randint(0, VOCAB, (B, S), generator=g).to(device)
    outputs = torch.randn(T, B, H, generator=g).to(device)
    hidden = torch.randn(L, B, H, generator=g).to(device)
    lens = torch.randint(0, T + 1, (B,), generator=g).to(device)
    return X, dec.init_state((outputs, hidden), lens)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_replay_equals_eager_for_new_inputs(backend):
    reason = unavailable_reason(backend, "cuda")
    if reason is not None:
        pytest.skip(reason)
    dec = decoder(backend)
    B, T, S = 4, 7, 5
    X0, state0 = call_inputs(dec, B, T, S, seed=1)
    graph = CUDAGraphDecoder(dec, X0, state0)
    for seed in (2, 3):
        X, state = call_inputs(dec, B, T, S, seed=seed)
        Y, new_state = graph(X, state)
        with torch.no_grad():
            Y_eager, state_eager = dec(X, state)
        attention_eager = torch.cat(dec.attention_weights, dim=1)
        torch.testing.assert_close(Y, Y_eager, atol=1e-5, rtol=1e-5, msg=lambda m: f"logits: {m}")
        torch.testing.assert_close(new_state[1], state_eager[1], atol=1e-5, rtol=1e-5,
                                   msg=lambda m: f"final hidden state: {m}")
        torch.testing.assert_close(torch.cat(graph.attention_weights, dim=1), attention_eager, atol=1e-5,
                                   rtol=1e-5, msg=lambda m: f"attention weights: {m}")
        assert new_state[0] is state[0] and new_state[2] is state[2]
    with pytest.raises(ValueError, match="X must match the captured call"):
        graph(X[:, :3], state)
    with pytest.raises(ValueError, match="enc_valid_lens \\(state\\[2\\]\\) must be a tensor"):
        graph(X, [state[0], state[1], None])


def test_cpu_tensors_are_refused_with_a_named_error():
    dec = decoder("torch", device="cpu")
    X, state = call_inputs(dec, 2, 3, 4, seed=1, device="cpu")
    with pytest.raises(ValueError, match="CUDAGraphDecoder needs CUDA tensors"):
        CUDAGraphDecoder(dec, X, state)
    with pytest.raises(TypeError, match="state must be"):
        CUDAGraphDecoder(dec, X, state[:2])


def test_graph_key_covers_every_dtype_that_changes_a_capture():
    dec = decoder("torch", device="cpu")
    X, (enc, _, lens) = call_inputs(dec, 3, 5, 2, seed=0, device="cpu")
    key = cuda_graph.graph_key(dec, X, enc, lens)
    assert key == cuda_graph.graph_key(dec, X.clone(), enc.clone(), lens.clone())  # same call, same graph
    for other in (cuda_graph.graph_key(dec, X.int(), enc, lens),            # int32 ids
                  cuda_graph.graph_key(dec, X, enc, lens.int()),            # int32 lengths
                  cuda_graph.graph_key(dec, X, enc, None),                  # no lengths
                  cuda_graph.graph_key(dec, X, enc.double(), lens),         # dtype of the state
                  cuda_graph.graph_key(dec, X[:, :1], enc, lens),           # steps
                  cuda_graph.graph_key(dec.train(), X, enc, lens)):          # mode
        assert other != key
    dec.eval()
    dec.dense.weight = torch.nn.Parameter(dec.dense.weight.detach().clone())  # a replaced parameter
    assert cuda_graph.graph_key(dec, X, enc, lens) != key


def test_graph_cache_is_bounded_and_drops_the_oldest():
    graphs, captured = {}, []

    def capture(i):
        captured.append(i)
        return f"graph {i}"

    for i in range(cuda_graph.MAX_GRAPHS + 3):
        assert cuda_graph.cached_graph(graphs, i, lambda: capture(i)) == f"graph {i}"
    assert len(graphs) == cuda_graph.MAX_GRAPHS
    assert list(graphs) == list(range(3, cuda_graph.MAX_GRAPHS + 3))  # the oldest three dropped
    assert cuda_graph.cached_graph(graphs, 5, lambda: capture(-1)) == "graph 5"  # a hit captures nothing
    assert -1 not in captured
