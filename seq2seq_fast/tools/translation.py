"""Translating raw text with a trained model: the source tokens of an input line per task, batched
greedy or beam decoding of token lists, and the output tokens as text."""
from seq2seq_fast.decoding.beam import beam_search
from seq2seq_fast.decoding.greedy import greedy_decode
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
                        length_penalty=0.0, batch_size=256, return_attention=False):
    """Translations (token lists) of ``sentences`` (token lists), batched; with
    ``return_attention`` (greedy only) also each one's attention (steps, T)."""
    device = next(model.parameters()).device
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
