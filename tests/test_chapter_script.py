"""The chapter's code runs unchanged with ``import seq2seq_fast as d2l``: tests/chapter/ holds the
book's cells as a script, run here in a fresh folder beside d2l's ../data/fra-eng/fra.txt (a
generated corpus) with no display and no network."""
import os
import runpy

from helpers import REPO_ROOT, write_fra_corpus
from seq2seq_fast.tools.data import NMT_DATA_ENV
from seq2seq_fast.tools.plots import PLOT_DIR_ENV

SCRIPT = os.path.join(REPO_ROOT, "tests", "chapter", "bahdanau_attention.py")


def test_the_chapter_runs_unchanged(tmp_path, monkeypatch, capsys):
    write_fra_corpus(tmp_path / "data" / "fra-eng" / "fra.txt", lines=60)  # one batch of 64 an epoch
    notebooks = tmp_path / "notebooks"
    notebooks.mkdir()
    monkeypatch.chdir(notebooks)
    monkeypatch.delenv(NMT_DATA_ENV, raising=False)
    monkeypatch.delenv(PLOT_DIR_ENV, raising=False)
    runpy.run_path(SCRIPT, run_name="__main__")
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert lines[0] == "torch.Size([4, 7, 10]) 3 torch.Size([4, 7, 16]) 2 torch.Size([4, 16])"
    assert lines[1].startswith("loss ") and " tokens/sec on " in lines[1]
    assert [line.split(" => ")[0] for line in lines[2:6]] == ["go .", "i lost .", "he's calm .", "i'm home ."]
    assert all(", " in line and " bleu " in line for line in lines[2:6])
    drawn = sorted(name.split("-")[0] for name in os.listdir(notebooks))
    assert drawn == ["animator", "heatmap"] and all(name.endswith(".png") for name in os.listdir(notebooks))
    assert "Animator: drawing to" in err and "show_heatmaps: drawn to" in err
