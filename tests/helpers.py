"""Shared pieces of the parity tests: paired models with one set of weights, tolerances, and
the comparison of outputs and every gradient."""
import os

import torch

import seq2seq_fast as sf
from seq2seq_fast import reference as R

# The source tree's root (csrc/, kernels/, benchmarks/ are read from there).
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The folder holding the seq2seq_fast under test (the source tree, or site-packages under test-compat).
PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(sf.__file__)))


def child_env(*first):
    """The environment of a child Python that imports the seq2seq_fast under test from any working
    folder; ``first``: folders to import from before it."""
    path = [*first, PACKAGE_ROOT] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])
    return dict(os.environ, PYTHONPATH=os.pathsep.join(path))

# dtype: (atol, rtol) for fast path vs reference in the same dtype.
TOLERANCES = {
    torch.float64: (1e-10, 1e-8),
    torch.float32: (3e-5, 1e-4),
}


def assert_close(actual, expected, name, dtype=None):
    atol, rtol = TOLERANCES[dtype or expected.dtype]
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol, msg=lambda m: f"{name}: {m}")


def paired_decoders(vocab, embed, hidden, layers, dropout=0.0, dtype=torch.float64, backend="torch", seed=0,
                    device="cpu"):
    """A reference decoder and ours with identical weights, on ``device``."""
    torch.manual_seed(seed)
    ref = R.Seq2SeqAttentionDecoder(vocab, embed, hidden, layers, dropout).to(device, dtype)
    fast = sf.Seq2SeqAttentionDecoder(vocab, embed, hidden, layers, dropout, backend=backend).to(device, dtype)
    fast.load_state_dict(ref.state_dict())
    return ref, fast


def paired_models(vocab, embed, hidden, layers, dropout=0.0, dtype=torch.float64, backend="torch", seed=0):
    """Reference and fast ``EncoderDecoder`` with identical weights."""
    ref_dec, fast_dec = paired_decoders(vocab, embed, hidden, layers, dropout, dtype, backend, seed)
    ref_enc = R.Seq2SeqEncoder(vocab, embed, hidden, layers, dropout).to(dtype)
    fast_enc = sf.Seq2SeqEncoder(vocab, embed, hidden, layers, dropout, backend=backend).to(dtype)
    fast_enc.load_state_dict(ref_enc.state_dict())
    return R.EncoderDecoder(ref_enc, ref_dec), sf.EncoderDecoder(fast_enc, fast_dec)


def backend_devices():
    """``(backend, device)`` pairs that run here: every backend on CPU tensors (Triton under its
    interpreter), and on a GPU machine every backend on CUDA tensors too."""
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    return [(b, d) for d in devices for b in sf.available_backends(d)]


def ragged_lens(batch, num_keys, generator=None):
    """Lengths covering 0, full, beyond T and random values in between."""
    special = [0, num_keys, num_keys + 3]
    lens = torch.randint(0, num_keys + 1, (batch,), generator=generator)
    lens[: min(batch, 3)] = torch.tensor(special[: min(batch, 3)])
    return lens


def decoder_inputs(batch, src_steps, tgt_steps, hidden, layers, vocab, dtype, valid="ragged", device="cpu"):
    enc_outputs = torch.randn(src_steps, batch, hidden, dtype=dtype)
    state = torch.randn(layers, batch, hidden, dtype=dtype)
    X = torch.randint(0, vocab, (batch, tgt_steps))
    lens = {"ragged": ragged_lens(batch, src_steps), "none": None}[valid]
    return tuple(None if t is None else t.to(device) for t in (X, enc_outputs, state, lens))


def run_decoder(decoder, X, enc_outputs, hidden, lens, grad_out):
    """Forward + backward of one decoder on fresh leaf copies of the inputs.

    Returns the outputs, final state, attention weights and the gradients of every parameter,
    of the encoder outputs and of the initial hidden state, by name.
    """
    enc = enc_outputs.clone().requires_grad_()
    h0 = hidden.clone().requires_grad_()
    decoder.zero_grad(set_to_none=True)
    Y, state = decoder(X, decoder.init_state((enc, h0), lens))
    attention = torch.cat(decoder.attention_weights, dim=1) if X.shape[1] else None
    (Y * grad_out).sum().backward()
    grads = {name: p.grad for name, p in decoder.named_parameters()}
    grads["enc_outputs"] = enc.grad
    grads["initial hidden"] = h0.grad
    return Y.detach(), state[1].detach(), attention, grads


def assert_decoder_parity(ref, fast, X, enc_outputs, hidden, lens, dtype):
    V = ref.dense.out_features
    grad_out = torch.randn(X.shape[0], X.shape[1], V, dtype=dtype).to(X.device)
    expected = run_decoder(ref, X, enc_outputs, hidden, lens, grad_out)
    actual = run_decoder(fast, X, enc_outputs, hidden, lens, grad_out)
    assert_close(actual[0], expected[0], "logits")
    assert_close(actual[1], expected[1], "final hidden state")
    if X.shape[1]:
        assert_close(actual[2].detach(), expected[2].detach(), "attention weights")
    for name, grad in expected[3].items():
        got = actual[3][name]
        if grad is None:
            assert got is None or torch.count_nonzero(got) == 0, f"grad {name}: expected none"
            continue
        assert got is not None, f"grad {name}: missing"
        assert_close(got, grad, f"grad {name}")


# The book's example sentences (English, French), in fra.txt's spelling before d2l's preprocessing.
BOOK_PAIRS = [("Go.", "Va !"), ("I lost.", "J'ai perdu."), ("He's calm.", "Il est calme."),
              ("I'm home.", "Je suis chez moi.")]
_WORDS = {"i": "je", "you": "tu", "he": "il", "see": "vois", "like": "aime", "the": "le", "cat": "chat",
          "dog": "chien", "big": "grand", "small": "petit", "house": "maison", "now": "maintenant"}


def write_fra_corpus(path, lines=120, seed=0):
    """A generated corpus in d2l's fra.txt format ("English<TAB>French" lines, d2l's punctuation)
    at ``path``: word-for-word pairs over a dozen words, with the book's four examples among them."""
    import random

    rng = random.Random(seed)
    words = sorted(_WORDS)
    pairs = [pair for pair in BOOK_PAIRS for _ in range(3)]
    while len(pairs) < lines:
        english = [rng.choice(words) for _ in range(rng.randint(1, 5))]
        end = rng.choice(".!?")
        pairs.append((" ".join(english).capitalize() + end, " ".join(_WORDS[w] for w in english).capitalize() + end))
    rng.shuffle(pairs)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write("".join(f"{english}\t{french}\n" for english, french in pairs))
    return path
