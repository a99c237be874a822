"""``python -m seq2seq_fast {bench,demo,train,translate}`` with tiny settings."""
import io
import re
import subprocess
import sys

import pytest

from seq2seq_fast.tools import cli
from seq2seq_fast.tools.checkpoints import load_checkpoint

TINY_TRAIN = ["--num-train", "200", "--num-test", "8", "--batch-size", "32", "--num-hiddens", "16",
              "--embed-size", "8", "--quiet"]


def test_module_entry_point_help():
    out = subprocess.run([sys.executable, "-m", "seq2seq_fast", "--help"], capture_output=True, text=True, check=True)
    for command in ("bench", "demo", "train", "translate"):
        assert command in out.stdout


@pytest.mark.parametrize("command", ["demo", "train", "translate"])
def test_subcommand_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main([command, "--help"])
    assert exit_info.value.code == 0
    assert "usage: python -m seq2seq_fast " + command in capsys.readouterr().out


def test_demo_tiny_run(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert cli.main(["demo", "--steps", "5", "--num-train", "300", "--num-test", "20", "--samples", "3",
                     "--quiet"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^exact match: \d+\.\d%$", out, re.M), out
    assert "d2l BLEU (k=2)" in out and "sacreBLEU" in out and "trained 5 steps" in out
    assert len(re.findall(r"=> .*, bleu \d\.\d{3}$", out, re.M)) == 3
    png = (tmp_path / "attention_heatmap.png").read_bytes()
    assert png.startswith(b"\x89PNG")


def test_train_then_translate_dates_greedy_and_beam(tmp_path, monkeypatch, capsys):
    ckpt = tmp_path / "dates.pt"
    assert cli.main(["train", "--steps", "3", "--out", str(ckpt)] + TINY_TRAIN) == 0
    checkpoint = load_checkpoint(ckpt)
    assert checkpoint["step"] == 3 and checkpoint["task"] == "dates"
    assert checkpoint["tgt_vocab"][:4] == ["<unk>", "<pad>", "<bos>", "<eos>"]
    capsys.readouterr()

    lines = "the first of may , nineteen ninety\n\nmarch third , two thousand\n"
    monkeypatch.setattr(sys, "stdin", io.StringIO(lines))
    assert cli.main(["translate", "--checkpoint", str(ckpt)]) == 0
    greedy = capsys.readouterr().out.split("\n")
    assert len(greedy) == 4 and greedy[1] == "" and greedy[3] == "", "one line out per line in"
    assert all(" " not in line for line in greedy), "characters joined"

    source = tmp_path / "in.txt"
    source.write_text(lines, encoding="utf-8")
    target = tmp_path / "out.txt"
    assert cli.main(["translate", str(source), "--checkpoint", str(ckpt), "--beam", "3",
                     "--output", str(target), "--max-len", "11"]) == 0
    assert len(target.read_text(encoding="utf-8").split("\n")) == 4


def test_train_resume_continues_to_more_steps(tmp_path, capsys):
    ckpt = tmp_path / "run.pt"
    assert cli.main(["train", "--steps", "2", "--out", str(ckpt)] + TINY_TRAIN) == 0
    assert cli.main(["train", "--resume", "--steps", "4", "--out", str(ckpt), "--quiet"]) == 0
    checkpoint = load_checkpoint(ckpt)
    assert checkpoint["step"] == 4 and checkpoint["model_config"]["num_hiddens"] == 16
    assert "step 4" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="no checkpoint"):
        cli.main(["train", "--resume", "--out", str(tmp_path / "none.pt")])


def test_train_and_translate_fra_txt(tmp_path, capsys):
    data = tmp_path / "fra.txt"
    data.write_text("Go.\tVa !\nHi.\tSalut !\nRun!\tCours !\nGo now.\tVa maintenant.\nWho?\tQui ?\n" * 4,
                    encoding="utf-8")
    ckpt = tmp_path / "fra.pt"
    assert cli.main(["train", "--data", str(data), "--epochs", "2", "--batch-size", "8", "--out", str(ckpt),
                     "--quiet"]) == 0
    checkpoint = load_checkpoint(ckpt)
    assert checkpoint["task"] == "nmt" and checkpoint["num_steps"] == 10 and checkpoint["epoch"] == 2
    assert checkpoint["model_config"]["num_layers"] == 2  # d2l's chapter settings
    assert "go" in checkpoint["src_vocab"]
    source = tmp_path / "en.txt"
    source.write_text("Go.\nWho?\n", encoding="utf-8")
    capsys.readouterr()
    assert cli.main(["translate", str(source), "--checkpoint", str(ckpt), "--beam", "2"]) == 0
    assert len(capsys.readouterr().out.split("\n")) == 3


def test_source_tokens_per_task():
    assert cli.source_tokens("nmt", "Go now!\n") == ["go", "now", "!"]
    assert cli.source_tokens("dates", " March third, Two Thousand ") == ["march", "third", ",", "two", "thousand"]


def test_bench_runs_the_checkout_runner_or_explains(monkeypatch, capsys):
    # From a source checkout (an editable install) bench runs benchmarks/runner.py; from an
    # installed wheel (make test-compat installs one) there is no runner and bench says so.
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["bench", "--help"])
    if cli._benchmark_runner() is None:
        assert "source checkout" in str(exit_info.value.code)
    else:
        assert exit_info.value.code == 0 and "--smoke" in capsys.readouterr().out
    monkeypatch.setattr(cli, "_benchmark_runner", lambda: None)
    with pytest.raises(SystemExit, match="source checkout"):
        cli.main(["bench", "--smoke"])


@pytest.mark.slow
def test_full_demo_reaches_95_percent(tmp_path):
    run = subprocess.run([sys.executable, "-m", "seq2seq_fast", "demo", "--quiet"], cwd=tmp_path,
                         capture_output=True, text=True, check=True)
    exact = float(re.search(r"^exact match: (\d+\.\d)%$", run.stdout, re.M).group(1))
    assert exact >= 95.0, run.stdout
    assert (tmp_path / "attention_heatmap.png").exists()
