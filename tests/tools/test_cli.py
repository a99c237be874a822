"""``python -m seq2seq_fast {bench,demo,train,translate}`` with tiny settings: the commands, their
defaults, and their errors (one line on stderr, never a traceback), run in subprocesses."""
import io
import re
import signal
import subprocess
import sys

import pytest

from helpers import child_env
from seq2seq_fast.tools import cli, commands
from seq2seq_fast.tools.checkpoints import load_checkpoint
from seq2seq_fast.tools.translation import source_tokens

TINY_TRAIN = ["--num-train", "200", "--num-test", "8", "--batch-size", "32", "--num-hiddens", "16",
              "--embed-size", "8", "--quiet"]


def run_cli(args, cwd, stdin=None, import_first=()):
    """``python -m seq2seq_fast *args`` in ``cwd``; ``import_first``: folders to import from first."""
    return subprocess.run([sys.executable, "-m", "seq2seq_fast", *args], cwd=cwd, input=stdin, capture_output=True,
                          text=True, timeout=300, env=child_env(*import_first))


def test_module_entry_point_help(tmp_path):
    out = run_cli(["--help"], cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    for command in ("bench", "demo", "train", "translate", "--debug"):
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
    assert source_tokens("nmt", "Go now!\n") == ["go", "now", "!"]
    assert source_tokens("dates", " March third, Two Thousand ") == ["march", "third", ",", "two", "thousand"]


def test_bench_runs_the_checkout_runner_or_explains(monkeypatch, capsys):
    # From a source checkout (an editable install) bench runs benchmarks/runner.py; from an
    # installed wheel (make test-compat installs one) there is no runner and bench says so.
    if commands._benchmark_runner() is None:
        assert cli.main(["bench", "--help"]) == 1
        assert "source checkout" in capsys.readouterr().err
    else:
        with pytest.raises(SystemExit) as exit_info:
            cli.main(["bench", "--help"])
        assert exit_info.value.code == 0 and "--smoke" in capsys.readouterr().out
    monkeypatch.setattr(commands, "_benchmark_runner", lambda: None)
    assert cli.main(["bench", "--smoke"]) == 1
    assert "error: bench needs a source checkout" in capsys.readouterr().err


def test_bench_runner_failure_is_one_line(monkeypatch, capsys):
    def runner(argv):
        raise KeyError("nope")

    monkeypatch.setattr(commands, "_benchmark_runner", lambda: runner)
    assert cli.main(["bench", "--configs", "nope"]) == 1
    err = capsys.readouterr().err
    assert err == "python -m seq2seq_fast: error: KeyError: 'nope' (--debug shows the traceback)\n"
    with pytest.raises(KeyError):
        cli.main(["--debug", "bench", "--configs", "nope"])


@pytest.fixture(scope="module")
def dates_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "dates.pt"
    assert cli.main(["train", "--steps", "2", "--out", str(path)] + TINY_TRAIN) == 0
    return path


def call_cli(args, capsys):
    """``cli.main(args)`` in this process: ``(exit status, stderr)``."""
    try:
        status = cli.main(args)
    except SystemExit as exit_info:
        status = exit_info.code
    return status, capsys.readouterr().err


def test_train_without_steps_or_epochs_trains_the_documented_300_steps(tmp_path, capsys):
    assert cli.main(["train", "--out", str(tmp_path / "run.pt")] + TINY_TRAIN) == 0
    assert "over 300 steps (step 300, " in capsys.readouterr().out
    assert load_checkpoint(tmp_path / "run.pt")["step"] == 300


def test_translate_names_the_unknown_words_once(dates_checkpoint, monkeypatch, capsys):
    lines = "the first of may , nineteen ninety\nthe blorp of zork , two thousand\nzork third , two thousand\n"
    monkeypatch.setattr(sys, "stdin", io.StringIO(lines))
    assert call_cli(["translate", "--checkpoint", str(dates_checkpoint)], capsys) == (
        0, "warning: source words not in the checkpoint's vocabulary, read as <unk>: 'blorp', 'zork'\n")
    monkeypatch.setattr(sys, "stdin", io.StringIO(lines.split("\n")[0]))
    assert call_cli(["translate", "--checkpoint", str(dates_checkpoint)], capsys) == (0, ""), "no unknown word"


def _write(folder, name, text):
    path = folder / name
    path.write_text(text, encoding="utf-8")
    return str(path)


# (arguments, exit status, words of the one line on stderr); "{text}" is a file that is not a checkpoint.
BAD_USES = {
    "train-data-missing": (["train", "--data", "nope.txt"], 2, "argument --data: 'nope.txt' does not exist"),
    "train-data-empty": (["train", "--data", "{text}"], 1,
                         "error: --data: '{text}' holds no line of two tab-separated fields"),
    "train-steps-negative": (["train", "--steps", "-1"], 2, "argument --steps: must be at least 0, got -1"),
    "train-lr-zero": (["train", "--lr", "0"], 2, "argument --lr: must be positive, got 0"),
    "train-device": (["train", "--device", "gpu0"], 2, "argument --device: not a torch device: 'gpu0'"),
    "train-resume-missing": (["train", "--resume", "--out", "none.pt"], 1, "--resume: no checkpoint at --out"),
    "train-resume-not-a-checkpoint": (["train", "--resume", "--out", "{text}"], 1,
                                      "--out: '{text}' is not a seq2seq_fast checkpoint"),
    "train-nproc-device": (["train", "--nproc", "2", "--device", "meta"], 1, "--nproc: the processes train with gloo"),
    "translate-checkpoint-missing": (["translate", "--checkpoint", "nope.pt"], 2,
                                     "argument --checkpoint: no such file: 'nope.pt'"),
    "translate-not-a-checkpoint": (["translate", "--checkpoint", "{text}"], 1,
                                   "--checkpoint: '{text}' is not a seq2seq_fast checkpoint"),
    "translate-input-missing": (["translate", "in.txt", "--checkpoint", "{text}"], 2,
                                "argument input: no such file: 'in.txt'"),
    "demo-beam": (["demo", "--beam", "0"], 2, "argument --beam: must be at least 1, got 0"),
    "unknown-option": (["demo", "--stesp", "3"], 2, "unrecognized arguments: --stesp 3"),
    "no-command": ([], 2, "the following arguments are required: command"),
}


def _bad_use(case, folder):
    args, status, expected = BAD_USES[case]
    text = _write(folder, "notes.txt", "not a checkpoint\n")
    return [a.replace("{text}", text) for a in args], status, expected.replace("{text}", text)


def assert_one_line(status, err, expected_status, expected):
    assert status == expected_status, err
    assert "Traceback" not in err
    assert len(err.splitlines()) == 1 and expected in err, err


@pytest.mark.parametrize("case", list(BAD_USES))
def test_bad_use_ends_in_one_line_on_stderr(case, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    args, status, expected = _bad_use(case, tmp_path)
    assert_one_line(*call_cli(args, capsys), status, expected)


@pytest.mark.parametrize("case", ["train-data-missing", "translate-not-a-checkpoint"])
def test_bad_use_of_the_entry_point_ends_in_one_line(case, tmp_path):
    # The same as a process: a bad option (status 2) and a failure while running (status 1).
    args, status, expected = _bad_use(case, tmp_path)
    run = run_cli(args, cwd=tmp_path)
    assert_one_line(run.returncode, run.stderr, status, expected)


def test_debug_shows_the_traceback(tmp_path, capsys):
    text = _write(tmp_path, "notes.txt", "not a checkpoint\n")
    run = run_cli(["--debug", "translate", "--checkpoint", text], cwd=tmp_path)
    assert run.returncode == 1 and "Traceback" in run.stderr, run.stderr
    assert run.stderr.splitlines()[-1].startswith("seq2seq_fast.tools.commands.CliError: --checkpoint:")
    with pytest.raises(commands.CliError, match="--checkpoint:"):
        cli.main(["translate", "--checkpoint", text, "--debug"])


def _sigint_as_in_a_terminal():
    # A shell starts background jobs with SIGINT ignored, and a child inherits that (Python then
    # installs no KeyboardInterrupt handler): a suite run in the background, as `make test &`
    # or `nohup`, would otherwise send its Ctrl-C to a child that cannot get it.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_interrupt_ends_in_one_line(tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", "seq2seq_fast", "demo", "--steps", "100000", "--time-budget", "0",
                             "--num-train", "300", "--num-test", "8", "--quiet"], cwd=tmp_path, env=child_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=_sigint_as_in_a_terminal)
    try:
        assert proc.stdout.readline().startswith("seq2seq_fast demo:"), "the demo starts training"
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130 and err == "python -m seq2seq_fast: interrupted\n", err


def test_demo_without_the_optional_packages(tmp_path):
    # What a plain `pip install .` has: no matplotlib, sacrebleu or tqdm. Each costs a note, no crash.
    missing = tmp_path / "missing"
    missing.mkdir()
    for name in ("matplotlib", "sacrebleu", "tqdm"):
        _write(missing, f"{name}.py", f"raise ModuleNotFoundError(\"No module named '{name}'\", name='{name}')\n")
    run = run_cli(["demo", "--steps", "2", "--num-train", "300", "--num-test", "8"], cwd=tmp_path,
                  import_first=[str(missing)])
    assert run.returncode == 0, run.stderr
    assert "exact match:" in run.stdout and "sacreBLEU" not in run.stdout
    notes = [line for line in run.stderr.splitlines() if line.startswith("note: ")]
    assert [n.split()[1] for n in notes] == ["tqdm", "sacrebleu", "matplotlib"], run.stderr
    assert "no attention heatmap is drawn (pip install matplotlib)" in notes[2]
    assert not (tmp_path / "attention_heatmap.png").exists()


@pytest.mark.slow
def test_full_demo_reaches_95_percent(tmp_path):
    run = subprocess.run([sys.executable, "-m", "seq2seq_fast", "demo", "--quiet"], cwd=tmp_path,
                         capture_output=True, text=True, check=True)
    exact = float(re.search(r"^exact match: (\d+\.\d)%$", run.stdout, re.M).group(1))
    assert exact >= 95.0, run.stdout
    assert (tmp_path / "attention_heatmap.png").exists()
