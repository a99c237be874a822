"""Translating raw text with a trained model: the source tokens of an input line per task, batched
greedy or beam decoding of token lists, the output tokens as text, and d2l's ``predict_seq2seq``
on top of the batched greedy loop (plus ``predict_seq2seq_batch`` for many sentences)."""
from seq2seq_fast.decoding.beam import beam_search
from seq2seq_fast.decoding.greedy import greedy_decode
from seq2seq_fast.ops import validation
from seq2seq_fast.tools.data import build_array_nmt, preprocess_nmt


def source_tokens(task, sentence):
    """A raw input line as the source tokens the task's model was trained on."""
    if task == "nmt":
        return preprocess_nmt(sentence.strip()).split(" ")
    return sentence.strip().lower().replace(",", " , ").split()


def unknown_tokens(sentences, vocab):
    """The tokens of ``sentences`` (token lists) that ``vocab`` does not hold (they read as
    ``<unk>``), each once, in order of first appearance."""
    unknown = {}
    for tokens in sentences:
        for token in tokens:
            if token not in vocab.token_to_idx:
                unknown.setdefault(token)
    return list(unknown)


def target_text(task, tokens):
    """Output tokens as text: words joined by spaces (nmt) or characters joined (dates)."""
    return ("" if task == "dates" else " ").join(tokens)


def translate_sentences(model, src_vocab, tgt_vocab, sentences, *, task, num_steps, max_len=None, beam=1,
                        length_penalty=0.0, batch_size=256, return_attention=False, device=None):
    """Translations (token lists) of ``sentences`` (token lists), batched, on ``device`` (default:
    the model's); with ``return_attention`` (greedy only) also each one's attention (steps, T)."""
    device = next(model.parameters()).device if device is None else device
    bos, eos = tgt_vocab["<bos>"], tgt_vocab["<eos>"]
    max_len = max_len or num_steps
    outputs, attentions = [], []
    for start in range(0, len(sentences), batch_size):
        chunk = sentences[start:start + batch_size]
        src, src_len = build_array_nmt(chunk, src_vocab, num_steps)
        src, src_len = src.to(device), src_len.to(device)
        if beam > 1:
            result = beam_search(model, src, src_len, bos=bos, eos=eos, max_len=max_len, beam_size=beam,
                                 length_penalty=length_penalty)
            tokens, lengths = result.tokens[:, 0], result.lengths[:, 0]
        else:
            result = greedy_decode(model, src, src_len, bos=bos, eos=eos, max_len=max_len,
                                   return_attention=return_attention)
            tokens, lengths = result.tokens, result.lengths
            if return_attention:
                attentions.extend(result.attention.cpu().unbind(0))
        for row, n in zip(tokens.tolist(), lengths.tolist()):
            outputs.append(tgt_vocab.to_tokens(row[:n]))
    return (outputs, attentions) if return_attention else outputs


def _d2l_tokens(sentence, name):
    """d2l's source tokens in ``predict_seq2seq``: the sentence lower-cased and split at spaces
    (no other preprocessing: write ``"go ."``, as the book does)."""
    if not isinstance(sentence, str):
        raise TypeError(f"{name} must be a str, got {type(sentence).__name__}")
    return sentence.lower().split(" ")


def predict_seq2seq(net, src_sentence, src_vocab, tgt_vocab, num_steps, device, save_attention_weights=False):
    """d2l's ``predict_seq2seq``: ``net.eval()``, then greedy decoding of one sentence from
    ``<bos>`` until ``<eos>`` or ``num_steps`` tokens, through the batched greedy loop
    (``greedy_decode``: compiled on the ``cpp`` backend, no ``.item()`` per step).

    Returns ``(translation, attention_weight_seq)``: the tokens joined by spaces, and, when
    ``save_attention_weights``, d2l's record of every step run (the ``<eos>`` step included): a
    list of one (1, 1, num_steps) tensor per step, so the book's
    ``torch.cat([step[0][0][0] for step in attention_weight_seq], 0)`` works; else ``[]``.

    >>> translation, weights = predict_seq2seq(net, "go .", src_vocab, tgt_vocab, 10, "cpu", True)
    """
    tokens = _d2l_tokens(src_sentence, "src_sentence")
    validation.check_int(num_steps, "num_steps", minimum=1)
    net.eval()
    outputs = translate_sentences(net, src_vocab, tgt_vocab, [tokens], task="nmt", num_steps=num_steps,
                                  return_attention=save_attention_weights, device=device)
    if not save_attention_weights:
        return " ".join(outputs[0]), []
    (output,), (weights,) = outputs
    return " ".join(output), [[step.reshape(1, 1, -1)] for step in weights]


def predict_seq2seq_batch(net, src_sentences, src_vocab, tgt_vocab, num_steps, device, *, batch_size=256):
    """``predict_seq2seq`` of many sentences at once: batches of ``batch_size`` rows decode
    together, each row exactly as ``predict_seq2seq`` decodes it alone. Returns the translations
    (str), in order.

    >>> predict_seq2seq_batch(net, ["go .", "i lost ."], src_vocab, tgt_vocab, 10, "cpu")
    ['va !', "j'ai perdu ."]
    """
    if isinstance(src_sentences, str) or not isinstance(src_sentences, (list, tuple)):
        raise TypeError(f"src_sentences must be a list of str, got {type(src_sentences).__name__}"
                        + (" (predict_seq2seq translates one sentence)" if isinstance(src_sentences, str) else ""))
    tokens = [_d2l_tokens(sentence, f"src_sentences[{i}]") for i, sentence in enumerate(src_sentences)]
    validation.check_int(num_steps, "num_steps", minimum=1)
    validation.check_int(batch_size, "batch_size", minimum=1)
    if not tokens:
        return []
    net.eval()
    outputs = translate_sentences(net, src_vocab, tgt_vocab, tokens, task="nmt", num_steps=num_steps,
                                  batch_size=batch_size, device=device)
    return [" ".join(output) for output in outputs]
