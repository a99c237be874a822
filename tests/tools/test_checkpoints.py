"""Checkpoints of d2l's zh and en editions load into our modules and give the same outputs."""
import pytest
import torch
from torch import nn

import seq2seq_fast as sf
from seq2seq_fast import reference as R
from seq2seq_fast.tools.checkpoints import (convert_d2l_state_dict, infer_model_config, load_checkpoint,
                                      load_d2l_checkpoint, model_from_checkpoint, save_checkpoint)

SRC_V, TGT_V, E, H, L = 11, 9, 5, 8, 2


# d2l en edition (1.0) classes of the chapter, as far as they shape the state_dict: the encoder's
# GRU wrapped in d2l.GRU (.rnn.rnn), lazily built linears, the decoder's nn.GRU unwrapped.
class EnGRU(nn.Module):
    def __init__(self, num_inputs, num_hiddens, num_layers, dropout=0):
        super().__init__()
        self.rnn = nn.GRU(num_inputs, num_hiddens, num_layers, dropout=dropout)

    def forward(self, inputs, H=None):
        return self.rnn(inputs, H)


class EnEncoder(nn.Module):
    def __init__(self, vocab_size, embed_size, num_hiddens, num_layers):
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, embed_size)
        self.rnn = EnGRU(embed_size, num_hiddens, num_layers)

    def forward(self, X, *args):
        embs = self.embedding(X.t().type(torch.int64))
        return self.rnn(embs)


class EnAdditiveAttention(nn.Module):
    def __init__(self, num_hiddens, dropout):
        super().__init__()
        self.W_k = nn.LazyLinear(num_hiddens, bias=False)
        self.W_q = nn.LazyLinear(num_hiddens, bias=False)
        self.w_v = nn.LazyLinear(1, bias=False)
        self.dropout = nn.Dropout(dropout)

    def forward(self, queries, keys, values, valid_lens):
        queries, keys = self.W_q(queries), self.W_k(keys)
        features = torch.tanh(queries.unsqueeze(2) + keys.unsqueeze(1))
        scores = self.w_v(features).squeeze(-1)
        self.attention_weights = R.masked_softmax(scores, valid_lens)
        return torch.bmm(self.dropout(self.attention_weights), values)


class EnDecoder(nn.Module):
    def __init__(self, vocab_size, embed_size, num_hiddens, num_layers):
        super().__init__()
        self.attention = EnAdditiveAttention(num_hiddens, 0)
        self.embedding = nn.Embedding(vocab_size, embed_size)
        self.rnn = nn.GRU(embed_size + num_hiddens, num_hiddens, num_layers)
        self.dense = nn.LazyLinear(vocab_size)

    def init_state(self, enc_outputs, enc_valid_lens):
        outputs, hidden_state = enc_outputs
        return (outputs.permute(1, 0, 2), hidden_state, enc_valid_lens)

    def forward(self, X, state):
        enc_outputs, hidden_state, enc_valid_lens = state
        X = self.embedding(X).permute(1, 0, 2)
        outputs = []
        for x in X:
            query = torch.unsqueeze(hidden_state[-1], dim=1)
            context = self.attention(query, enc_outputs, enc_outputs, enc_valid_lens)
            x = torch.cat((context, torch.unsqueeze(x, dim=1)), dim=-1)
            out, hidden_state = self.rnn(x.permute(1, 0, 2), hidden_state)
            outputs.append(out)
        outputs = self.dense(torch.cat(outputs, dim=0))
        return outputs.permute(1, 0, 2), [enc_outputs, hidden_state, enc_valid_lens]


def _inputs():
    torch.manual_seed(3)
    return torch.randint(0, SRC_V, (4, 6)), torch.randint(0, TGT_V, (4, 5)), torch.tensor([6, 2, 0, 4])


def _en_model():
    torch.manual_seed(1)
    net = R.EncoderDecoder(EnEncoder(SRC_V, E, H, L), EnDecoder(TGT_V, E, H, L))
    X, Y, lens = _inputs()
    net(X, Y, lens)  # materialise the lazy layers, as training does
    return net


def _outputs(net):
    X, Y, lens = _inputs()
    with torch.no_grad():
        return net.eval()(X, Y, lens)[0]


def test_en_edition_checkpoint_loads_and_matches(tmp_path):
    en = _en_model()
    keys = en.state_dict().keys()
    assert "encoder.rnn.rnn.weight_ih_l0" in keys and "decoder.rnn.weight_ih_l1" in keys
    torch.save(en.state_dict(), tmp_path / "en.params")
    ours = load_d2l_checkpoint(tmp_path / "en.params")
    assert isinstance(ours.decoder, sf.Seq2SeqAttentionDecoder)
    assert ours.decoder.rnn.num_layers == L and ours.encoder.embedding.num_embeddings == SRC_V
    torch.testing.assert_close(_outputs(ours), _outputs(en))


def test_en_edition_into_a_given_model_and_ddp_prefix():
    en = _en_model()
    state = {f"module.{k}": v for k, v in en.state_dict().items()}
    ours = sf.EncoderDecoder(sf.Seq2SeqEncoder(SRC_V, E, H, L), sf.Seq2SeqAttentionDecoder(TGT_V, E, H, L))
    assert load_d2l_checkpoint(state, model=ours, edition="en") is ours
    torch.testing.assert_close(_outputs(ours), _outputs(en))


def test_zh_edition_checkpoint_loads_and_matches(tmp_path):
    torch.manual_seed(2)
    zh = R.EncoderDecoder(R.Seq2SeqEncoder(SRC_V, E, H, L), R.Seq2SeqAttentionDecoder(TGT_V, E, H, L))
    torch.save(zh.state_dict(), tmp_path / "zh.params")
    ours = load_d2l_checkpoint(str(tmp_path / "zh.params"), edition="zh")
    torch.testing.assert_close(_outputs(ours), _outputs(zh))
    assert infer_model_config(ours.state_dict()) == dict(src_vocab_size=SRC_V, tgt_vocab_size=TGT_V, embed_size=E,
                                                         num_hiddens=H, num_layers=L, dropout=0.0)
    back = R.EncoderDecoder(R.Seq2SeqEncoder(SRC_V, E, H, L), R.Seq2SeqAttentionDecoder(TGT_V, E, H, L))
    back.load_state_dict(ours.state_dict())  # and back into d2l's classes
    torch.testing.assert_close(_outputs(back), _outputs(zh))


def test_unmaterialised_lazy_layers_and_bad_inputs_are_rejected():
    fresh = R.EncoderDecoder(EnEncoder(SRC_V, E, H, L), EnDecoder(TGT_V, E, H, L))
    with pytest.raises(ValueError, match="LazyLinear"):
        convert_d2l_state_dict(fresh.state_dict())
    with pytest.raises(ValueError, match="edition"):
        convert_d2l_state_dict({}, edition="fr")
    with pytest.raises(TypeError, match="state_dict"):
        convert_d2l_state_dict([1, 2])
    with pytest.raises(ValueError, match="encoder.embedding.weight"):
        load_d2l_checkpoint({"decoder.dense.weight": torch.zeros(2, 2)})


def test_training_checkpoint_round_trip(tmp_path):
    from seq2seq_fast.tools.data import Vocab

    src_vocab = Vocab([["a", "b"]], reserved_tokens=["<pad>", "<bos>", "<eos>"])
    tgt_vocab = Vocab([["x", "y", "z"]], reserved_tokens=["<pad>", "<bos>", "<eos>"])
    config = dict(src_vocab_size=len(src_vocab), tgt_vocab_size=len(tgt_vocab), embed_size=3, num_hiddens=4,
                  num_layers=1, dropout=0.0)
    model = sf.EncoderDecoder(sf.Seq2SeqEncoder(6, 3, 4, 1), sf.Seq2SeqAttentionDecoder(7, 3, 4, 1))
    path = tmp_path / "sub" / "run.pt"
    save_checkpoint(path, dict(model=model.state_dict(), model_config=config, src_vocab=src_vocab.idx_to_token,
                               tgt_vocab=tgt_vocab.idx_to_token))
    loaded, sv, tv = model_from_checkpoint(load_checkpoint(path))
    assert sv.idx_to_token == src_vocab.idx_to_token and tv["z"] == tgt_vocab["z"]
    for name, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value)
    torch.save(model.state_dict(), tmp_path / "plain.pt")
    with pytest.raises(ValueError, match="not a seq2seq_fast checkpoint"):
        load_checkpoint(tmp_path / "plain.pt")
    (tmp_path / "notes.txt").write_text("not a checkpoint\n")
    (tmp_path / "empty.pt").write_bytes(b"")
    for name in ("notes.txt", "empty.pt"):
        with pytest.raises(ValueError, match=f"{name}' is not a seq2seq_fast checkpoint: torch.load failed"):
            load_checkpoint(tmp_path / name)
