"""Checkpoints: our training checkpoints (weights, optimizer, position, RNG, model sizes and
vocabularies) and the conversion of d2l's saved ``state_dict``s, zh and en editions.

d2l's zh edition (``d2l.torch`` 0.17) names parameters as we do. The en edition (d2l 1.0)
wraps the encoder's ``nn.GRU`` in ``d2l.GRU`` (keys ``encoder.rnn.rnn.weight_ih_l0``), builds
``dense`` and the attention's ``W_k``/``W_q``/``w_v`` as ``nn.LazyLinear`` (same keys once
materialised by a forward pass) and may be saved from a ``DistributedDataParallel`` wrapper
(``module.`` prefix). ``convert_d2l_state_dict`` maps any of these to our keys.
"""
import os
import pickle
import re

import torch

FORMAT = "seq2seq_fast.checkpoint/1"
MODEL_CONFIG_KEYS = ("src_vocab_size", "tgt_vocab_size", "embed_size", "num_hiddens", "num_layers", "dropout")


def convert_d2l_state_dict(state_dict, edition="auto"):
    """d2l's ``state_dict`` (zh or en edition, ``"auto"`` detects) with our parameter names.

    Raises ``ValueError`` for an en-edition dict whose lazy layers were never materialised.
    """
    if not isinstance(state_dict, dict):
        raise TypeError(f"state_dict must be a dict of tensors, got {type(state_dict).__name__}")
    if edition not in ("auto", "zh", "en"):
        raise ValueError(f"edition must be 'auto', 'zh' or 'en', got {edition!r}")
    converted = {}
    for key, value in state_dict.items():
        if isinstance(value, torch.nn.parameter.UninitializedParameter):
            raise ValueError(
                f"state_dict entry {key!r} is an uninitialised LazyLinear parameter: run one forward "
                "pass of the d2l model before saving it"
            )
        new = key[len("module."):] if key.startswith("module.") else key
        if edition in ("auto", "en"):
            new = re.sub(r"(^|\.)rnn\.rnn\.", r"\1rnn.", new)
        converted[new] = value
    return converted


def infer_model_config(state_dict):
    """Model sizes read off an ``EncoderDecoder`` state_dict in our (converted) names."""
    try:
        src_vocab_size, embed_size = state_dict["encoder.embedding.weight"].shape
        tgt_vocab_size, _ = state_dict["decoder.embedding.weight"].shape
        num_hiddens = state_dict["encoder.rnn.weight_hh_l0"].shape[1]
    except KeyError as missing:
        raise ValueError(f"state_dict is not a d2l Seq2SeqEncoder + Seq2SeqAttentionDecoder model: no key {missing}")
    layers = {int(m.group(1)) for k in state_dict if (m := re.match(r"decoder\.rnn\.weight_ih_l(\d+)$", k))}
    return dict(src_vocab_size=src_vocab_size, tgt_vocab_size=tgt_vocab_size, embed_size=embed_size,
                num_hiddens=num_hiddens, num_layers=len(layers), dropout=0.0)


def build_model(config, backend="auto"):
    """Our ``EncoderDecoder`` of the sizes in ``config`` (keys ``MODEL_CONFIG_KEYS``)."""
    from seq2seq_fast.modules.seq2seq import EncoderDecoder, Seq2SeqAttentionDecoder, Seq2SeqEncoder

    c = {k: config[k] for k in MODEL_CONFIG_KEYS}
    encoder = Seq2SeqEncoder(c["src_vocab_size"], c["embed_size"], c["num_hiddens"], c["num_layers"],
                             c["dropout"], backend=backend)
    decoder = Seq2SeqAttentionDecoder(c["tgt_vocab_size"], c["embed_size"], c["num_hiddens"], c["num_layers"],
                                      c["dropout"], backend=backend)
    return EncoderDecoder(encoder, decoder)


def load_d2l_checkpoint(source, model=None, *, edition="auto", dropout=0.0, backend="auto", map_location="cpu"):
    """Load a d2l checkpoint (a path to a ``torch.save``d ``state_dict``, or the dict itself)
    into ``model`` (ours or d2l's zh-edition ``EncoderDecoder``), or into a new one of ours
    whose sizes are read off the weights. Returns the model.

    >>> net = load_d2l_checkpoint("seq2seq_attention_en.pt")          # d2l en edition
    >>> load_d2l_checkpoint(torch.load("zh.params"), model=my_net)    # d2l zh edition
    """
    state_dict = source
    if isinstance(source, (str, os.PathLike)):
        state_dict = torch.load(source, map_location=map_location, weights_only=True)
    state_dict = convert_d2l_state_dict(state_dict, edition)
    if model is None:
        config = infer_model_config(state_dict)
        config["dropout"] = dropout
        model = build_model(config, backend=backend)
    model.load_state_dict(state_dict)
    return model


def save_checkpoint(path, payload):
    """Write ``payload`` (a dict) atomically: to a temporary file, then renamed over ``path``."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(dict(payload, format=FORMAT), tmp)
    os.replace(tmp, path)


def load_checkpoint(path, map_location="cpu"):
    """A checkpoint written by ``save_checkpoint`` (our trainer or ``python -m seq2seq_fast train``)."""
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=False)
    except (pickle.UnpicklingError, EOFError, RuntimeError) as exc:
        raise ValueError(f"{os.fspath(path)!r} is not a seq2seq_fast checkpoint: torch.load failed ({exc})") from exc
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != FORMAT:
        raise ValueError(
            f"{os.fspath(path)!r} is not a seq2seq_fast checkpoint (for a d2l state_dict use load_d2l_checkpoint)"
        )
    return checkpoint


def model_from_checkpoint(checkpoint, backend="auto"):
    """``(model in eval mode, src_vocab, tgt_vocab)`` of a loaded training checkpoint."""
    from seq2seq_fast.tools.data import Vocab

    model = build_model(checkpoint["model_config"], backend=backend)
    model.load_state_dict(checkpoint["model"])
    src_vocab = Vocab.from_idx_to_token(checkpoint["src_vocab"])
    tgt_vocab = Vocab.from_idx_to_token(checkpoint["tgt_vocab"])
    return model.eval(), src_vocab, tgt_vocab
