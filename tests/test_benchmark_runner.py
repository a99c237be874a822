"""The benchmark runner works end to end on a tiny configuration (figures are not checked:
speed lives in the benchmarks, not in tests)."""
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "benchmarks"))

import runner  # noqa: E402
import workloads as W  # noqa: E402
from configs import CONFIGS  # noqa: E402


def test_runner_smoke(tmp_path, capsys):
    assert runner.main(["--smoke", "--no-compile", "--min-time", "0.01", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "results.json").read_text())
    impls = {r["impl"] for r in result["rows"]}
    assert {"reference", "torch", "floor"} <= impls
    measured = [r for r in result["rows"] if r["impl"] == "torch"]
    assert len(measured) == 3 and all(r["median_s"] > 0 for r in measured)
    assert (tmp_path / "results.md").read_text().count("| smoke |") == len(result["rows"])
    assert (tmp_path / "speedups.png").stat().st_size > 0
    assert result["machine"]["torch"]


def test_decoder_floor_formula():
    # 2·[B·T·H² + S·B·(H² + Σ_l 3H·(in_l + H) + 2·T·H + H·V)] from the issue, for zh.
    c = CONFIGS["zh"]
    B, T, S, H, E, V = c.batch, c.src_steps, c.tgt_steps, c.hidden, c.embed, c.vocab
    gru = 3 * H * (E + H + H) + 3 * H * (H + H)
    expected = 2 * (B * T * H * H + S * B * (H * H + gru + 2 * T * H + H * V))
    assert W.decoder_flops(c, S) == expected
