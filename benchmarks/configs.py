"""Named model/workload configurations shared by the benchmark runner and the pytest-benchmark suite."""
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Config:
    vocab: int
    embed: int
    hidden: int
    layers: int
    batch: int
    src_steps: int
    tgt_steps: int
    dropout: float

    def as_dict(self):
        return asdict(self)


CONFIGS = {
    # d2l zh edition's book setting (the chapter's train_seq2seq on fra-eng).
    "zh": Config(vocab=201, embed=32, hidden=32, layers=2, batch=64, src_steps=10, tgt_steps=10, dropout=0.1),
    # d2l en edition's book setting.
    "en": Config(vocab=200, embed=256, hidden=256, layers=2, batch=128, src_steps=9, tgt_steps=9, dropout=0.2),
    # A larger model where the GEMMs dominate.
    "large": Config(vocab=8000, embed=256, hidden=512, layers=2, batch=64, src_steps=30, tgt_steps=30, dropout=0.1),
}

# A tiny configuration for the runner's smoke test (not a benchmark).
SMOKE = Config(vocab=13, embed=4, hidden=6, layers=2, batch=3, src_steps=4, tgt_steps=3, dropout=0.1)

WORKLOADS = ("decoder_forward", "train_step", "greedy_decode")
