"""The benchmark runner: end to end on a tiny configuration, its filters, its error messages and
the floor's definition. Figures are not compared with expectations (speed lives in the
benchmarks), except that no measured row may come out under the floor, a lower bound."""
import json
import os
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "benchmarks"))

import floor as F  # noqa: E402
import runner  # noqa: E402
import selection as S  # noqa: E402
import workloads as W  # noqa: E402
from configs import CONFIGS, SMOKE  # noqa: E402


def _groups(rows):
    """{(section, dtype, workload): its rows, in order}."""
    groups = {}
    for r in rows:
        groups.setdefault((r["section"], r["dtype"], r["workload"]), []).append(r)
    return groups


def test_runner_smoke(tmp_path):
    assert runner.main(["--smoke", "--no-compile", "--min-time", "0.01", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "results.json").read_text())
    rows = result["rows"]
    groups = _groups(rows)
    float32 = {(section, "float32", w) for section, names in S.NAMES["workloads"].items() for w in names}
    assert set(groups) == float32 | {("model", S.AUTOCAST, "decoder_forward")}, "one group under autocast"
    for key, group in groups.items():
        assert group[0]["impl"] == "reference" and group[-1]["impl"] == "floor", key
        measured = group[:-1]
        assert measured and all(r["median_s"] > 0 for r in measured), key
        floor = group[-1]["median_s"]
        assert all(r["median_s"] >= floor for r in measured if r.get("bounded", True)), f"{key}: under the floor"
    best = runner.best_backend("cpu")
    assert {r["impl"] for r in rows if r["section"] == "model" and r["dtype"] == "float32"} == {"reference", best,
                                                                                                 "floor"}
    assert [r["impl"] for r in rows if r["dtype"] == S.AUTOCAST] == ["reference", "reference+autocast", best, "floor"]
    assert result["under_floor"] == 0
    markdown = (tmp_path / "results.md").read_text()
    assert markdown.count("| smoke |") == len(rows)
    assert markdown.count("| median ms |") == 3 and "median_s" not in markdown, "one unit (ms) in every table"
    assert "## The whole model under bfloat16 autocast\n\nbfloat16 units the CPU offered: " in markdown
    assert "every measured row is at or above its floor" in markdown
    assert (tmp_path / "speedups.png").stat().st_size > 0
    assert result["machine"]["torch"] and result["machine"]["instruction sets"]


@pytest.mark.parametrize("option, bad, good", [
    ("configs", "zh,ZHX", "zh, en, large"),
    ("workloads", "forwards", "decoder_forward, train_step, greedy_decode"),
    ("impls", "cpp,fast", "reference, reference+compile, torch, cpp"),
    ("dtypes", "float64", "float32, bfloat16, float16"),
])
def test_bad_names_exit_with_the_valid_ones(capsys, option, bad, good):
    with pytest.raises(SystemExit) as exit_info:
        runner.main([f"--{option}", bad])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert "Traceback" not in err and good in err and repr(bad.split(",")[-1]) in err


def test_help_lists_the_valid_names(capsys):
    with pytest.raises(SystemExit):
        runner.main(["--help"])
    out = capsys.readouterr().out
    for option in S.NAMES:
        assert S.valid_names(option) in " ".join(out.split()), option


def test_names_match_in_any_case():
    assert S.parse("configs", "ZH, Large") == ("zh", "large")
    assert S.parse("impls", "Reference+Compile,BEST") == ("reference+compile", "best")


def test_every_filter_narrows_every_section():
    sel = S.select(configs="large,gnmt-b128-q10", workloads="train_step,forward", impls="reference,cpp,hoisted")
    assert sel.for_section("model") == dict(configs=("large",), workloads=("train_step",), impls=("reference", "cpp"),
                                            dtypes=("float32", S.AUTOCAST))
    assert sel.for_section("attention") == dict(configs=("large", "gnmt-b128-q10"), workloads=("forward",),
                                                impls=("reference", "hoisted"), dtypes=("float32",))
    default = S.select()
    assert default.for_section("attention")["configs"] == ("zh", "large"), "make bench: zh and large in both sections"
    assert set(S.select(full=True).for_section("attention")["configs"]) == set(runner.A.ATTENTION_SHAPES)
    # A filter that names nothing of a section leaves that section out, and the output says so.
    args = runner._parser().parse_args(["--configs", "gnmt-b128-q10"])
    _, sections, skipped = runner._plan(args, runner._parser())
    assert runner._plan_lines(sections, skipped)[0] == "model section: not run (the filters leave it no configs)"


def _model_runs(*argv):
    parser = runner._parser()
    _, sections, _ = runner._plan(parser.parse_args(list(argv)), parser)
    return sections["model"]["runs"], sections["attention"]["runs"]


def test_make_bench_runs_one_autocast_group_and_bench_full_all():
    workloads = ("decoder_forward", "train_step", "greedy_decode")
    model, attention = _model_runs()
    assert model == {"float32": (("zh", "large"), workloads), S.AUTOCAST: (("large",), ("decoder_forward",))}
    assert S.AUTOCAST not in attention, "autocast runs the whole model only"
    model, attention = _model_runs("--full")
    assert model == {"float32": (tuple(CONFIGS), workloads), S.AUTOCAST: (tuple(CONFIGS), workloads)}
    assert S.AUTOCAST not in attention
    assert _model_runs("--dtypes", "autocast-BF16")[0] == {S.AUTOCAST: (("zh", "large"), workloads)}, \
        "named in --dtypes: every selected config and workload"
    assert _model_runs("--configs", "zh")[0][S.AUTOCAST] == ((), ("decoder_forward",)), "filters narrow it too"
    assert _model_runs("--smoke")[0][S.AUTOCAST] == (("smoke",), ("decoder_forward",))


def test_autocast_groups_time_the_float32_reference_its_autocast_and_the_backends(tmp_path):
    best = runner.best_backend("cpu")
    assert runner.main(["--smoke", "--dtypes", S.AUTOCAST, "--impls", "reference,torch,best,reference+compile",
                        "--min-time", "0.01", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    groups = _groups(rows)
    assert set(groups) == {("model", S.AUTOCAST, w) for w in S.NAMES["workloads"]["model"]}
    for key, group in groups.items():
        by = {r["impl"]: r for r in group}
        assert list(by) == ["reference", "reference+autocast", *dict.fromkeys(["torch", best]), "floor"], key
        base = by["reference"]
        assert base["speedup"] == 1.0 and base["note"] == runner.AUTOCAST_BASE_NOTE and base["bounded"] is False, key
        for r in group[1:]:
            assert r["speedup"] == pytest.approx(base["median_s"] / r["median_s"]) and "bounded" not in r, key
    assert runner.report.table(rows).count("float32, not under autocast") == 1, "one footnote for the base rows"


def test_workloads_under_autocast_follow_the_amp_recipe():
    import torch

    cfg = SMOKE
    reference, data = W.reference_model(cfg, "cpu"), W.inputs(cfg, "cpu")
    seen = []

    def backward_hook(grad):
        seen.append(("backward", torch.is_autocast_enabled("cpu")))

    def forward_hook(module, args, out):
        seen.append((out.dtype, torch.is_autocast_enabled("cpu")))
        if out.requires_grad:
            out.register_hook(backward_hook)

    reference.decoder.dense.register_forward_hook(forward_hook)
    for workload in S.NAMES["workloads"]["model"]:
        for autocast, dtype in ((torch.bfloat16, torch.bfloat16), (None, torch.float32)):
            seen.clear()
            W.build(workload, "reference", reference, cfg, data, autocast)()
            assert seen and set(seen[:-1] if workload == "train_step" else seen) == {(dtype, autocast is not None)}
            if workload == "train_step":
                assert seen[-1] == ("backward", False), "the backward runs outside autocast"


def test_autocast_floor_runs_its_gemms_in_bfloat16(monkeypatch):
    import torch

    cfg = SMOKE
    reference, data = W.reference_model(cfg, "cpu"), W.inputs(cfg, "cpu")
    real, dtypes = torch.matmul, set()

    def matmul(a, b, **kwargs):
        dtypes.update((a.dtype, b.dtype))
        return real(a, b, **kwargs)

    monkeypatch.setattr(torch, "matmul", matmul)
    for workload in S.NAMES["workloads"]["model"]:
        # Under autocast in bfloat16 and in float32 (the faster counts), else in float32 alone.
        for autocast, want in ((torch.bfloat16, {torch.bfloat16, torch.float32}), (None, {torch.float32})):
            dtypes.clear()
            work = runner._floor_work(workload, cfg, reference, data, "cpu", torch.float32, autocast)
            for name, fn in work.callables().items():
                if name != F.FloorWork.BYTES:
                    fn()
            assert dtypes == want, (workload, autocast)
    logits = cfg.tgt_steps * cfg.batch * cfg.vocab
    for workload, fewer in (("decoder_forward", 2 * logits), ("train_step", 2 * logits), ("greedy_decode", 0)):
        assert W.workload_bytes(workload, cfg, reference, torch.bfloat16) == \
            W.workload_bytes(workload, cfg, reference) - fewer, "the logits at 2 bytes, not 4"


def test_the_float32_base_under_a_bfloat16_floor_is_not_under_the_floor():
    from rows import group_rows, under_floor

    rows = group_rows("model", "c", S.AUTOCAST, "w", {"reference": 1.0, "cpp": 1.0}, {}, F.Floor(2.0, 2.0, 0.1, 1, 1),
                      {"reference": dict(bounded=False)})
    assert [r["impl"] for r in under_floor(rows)] == ["cpp"]


@pytest.mark.parametrize("listed, says", [
    ("AVX2, AVX-512, AVX512-BF16, AMX, AMX-BF16", "AMX-BF16, AVX512-BF16"),
    ("AVX2, AVX-512, AVX512-BF16", "AVX512-BF16"),
    ("AVX2, AVX-512", "neither AMX-BF16 nor AVX512-BF16"),
    ("unknown", "unknown"),
])
def test_autocast_table_says_which_bfloat16_units_the_cpu_offered(listed, says):
    from machine import bf16_units

    assert bf16_units({"instruction sets": listed}) == f"bfloat16 units the CPU offered: {says}"
    assert bf16_units({"instruction sets": listed, "cpp bf16 GEMMs": "amx"}) == \
        f"bfloat16 units the CPU offered: {says}; the cpp ops' bfloat16 GEMMs: amx"


def test_floor_is_the_larger_of_gemm_and_byte_time():
    import torch

    G, SPLIT, B = F.FloorWork.GEMMS, F.FloorWork.SPLIT, F.FloorWork.BYTES
    gemms = [F.Gemm(3, 4, 5, count=2), F.Gemm(7, 1, 1, batch=3)]
    work = F.FloorWork(gemms, 1000, "cpu")
    for fn in work.callables().values():
        fn()
    assert all(list(map(len, work.seconds[name])) == [1, 1] for name in work.callables()), "each call records"
    # The fastest work less the fastest fixed cost (the same calls on trivial operands).
    gemm_bound = work.result({G: ([0.25, 0.5], [1.25, 1.0]), B: ([0.125], [0.5, 0.375])})
    assert (gemm_bound.bound, gemm_bound.seconds, gemm_bound.bytes_seconds) == ("GEMMs", 0.75, 0.25)
    bytes_bound = work.result({G: ([0.0], [1.0]), B: ([0.5], [2.5])})
    assert (bytes_bound.bound, bytes_bound.seconds) == ("bytes", 2.0)
    assert bytes_bound.flops == 2 * (3 * 4 * 5 * 2 + 7 * 1 * 1 * 3)
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        split = F.FloorWork([F.Gemm(8, 4, 4, count=3)], 8, "cpu")
    finally:
        torch.set_num_threads(previous)
    assert split.result({G: ([0.0], [1.0]), SPLIT: ([0.25], [1.25]), B: ([0.0], [0.0])}).gemm_seconds == 0.5, \
        "two threads at once, each on half the rows: half the split time"
    both = F.FloorWork(gemms, 1000, "cpu", (torch.bfloat16, torch.float32))
    names = sorted(n for n in both.callables() if n != B)
    variants = [G] + ([SPLIT] if both.threads > 1 else [])
    assert names == sorted(f"{v} ({d})" for v in variants for d in ("bfloat16", "float32")), names
    assert both.result({f"{G} (bfloat16)": ([0.0], [3.0]), f"{G} (float32)": ([0.5], [2.0]),
                        B: ([0.0], [0.0])}).gemm_seconds == 1.5, "the faster dtype counts"


def test_decoder_gemms_count_the_hoisted_algorithm():
    # 2·[B·T·H² + min(S·B, V)·3H·E + S·B·(H·4H + (2L - 1)·H·3H + 2·T·H + H·V)] for zh (L = 2).
    c = CONFIGS["zh"]
    B, T, S_, H, E, V = c.batch, c.src_steps, c.tgt_steps, c.hidden, c.embed, c.vocab
    per_step = 4 * H * H + 3 * 3 * H * H + 2 * T * H + H * V
    expected = 2 * (B * T * H * H + min(S_ * B, V) * 3 * H * E + S_ * B * per_step)
    assert sum(g.flops for g in W.decoder_gemms(c, [B] * S_)) == expected
    forward = W.encoder_gemms(c) + W.decoder_gemms(c, [B] * S_)
    train = W.workload_gemms("train_step", c)
    assert sum(g.flops for g in train) == 3 * sum(g.flops for g in forward), "backward: two GEMMs per forward GEMM"


def test_greedy_rows_stop_after_eos():
    import torch

    eos = W.EOS
    tokens = torch.tensor([[5, eos, 7, 7], [5, 6, 7, eos], [eos, 3, 3, 3]])
    assert W.greedy_rows(tokens, eos) == [3, 2, 1, 1]


def test_chapter_rows_time_the_book_end_to_end():
    import chapter_bench

    rows = chapter_bench.chapter_rows(epochs=1, rounds=1, sentences=2, log=lambda rows: None)
    by = {(r["workload"], r["impl"]): r for r in rows}
    assert set(by) == {("train_seq2seq", "reference"), ("train_seq2seq", "d2l-loop"), ("train_seq2seq", "package"),
                       ("predict_seq2seq", "reference"), ("predict_seq2seq", "package")}
    assert all(r["median_s"] > 0 and r["section"] == "chapter" for r in rows)
    assert by[("train_seq2seq", "reference")]["speedup"] == 1.0
    text = runner.report.table(rows)
    assert "train_seq2seq" in text and "predict_seq2seq" in text


def test_contention_rows_start_and_stop_their_competitor(monkeypatch):
    import contention

    started = []
    real = contention.competing_process

    def watched():
        manager = real()
        started.append(manager)
        return manager

    monkeypatch.setattr(contention, "competing_process", watched)
    rows = contention.contention_rows(["trainer"], rounds=1, log=lambda text: None)
    assert [r["machine"] for r in rows] == ["quiet", "one competing process"] and len(started) == 1
    assert all(r["one_thread_s"] > 0 and r["two_threads_s"] > 0 and isinstance(r["passes"], bool) for r in rows)
    assert "2t / 1t" in contention.table(rows)


def test_competing_process_is_killed_on_exit():
    import contention

    with contention.competing_process() as busy:
        assert busy.poll() is None
    assert busy.poll() is not None


def test_fused_output_layer_table_gives_the_ratios():
    import train_memory

    result = dict(config="large", device="cpu", chunk_values=0,
                  step_mib={"unfused": 400.0, "fused": 300.0, "fused-recompute": 310.0, "own": 280.0},
                  peak_mib={"unfused": 1100.0, "fused": 1000.0, "fused-recompute": 1010.0, "own": 980.0},
                  median_ms={"unfused": 1200.0, "fused": 1188.0, "fused-recompute": 1500.0, "own": 1080.0})
    text = train_memory.table(result)
    assert "fused / unfused: memory 0.75, time 0.99" in text and "own / unfused: memory 0.70, time 0.90" in text
    assert text.count("\n") == 6


def test_autocast_vs_float32_times_both_dtypes_of_every_workload():
    import autocast_vs_float32 as A

    lines = []
    rows = A.ratio_rows("smoke", SMOKE, rounds=1, log=lines.append)
    assert [r["workload"] for r in rows] == list(A.WORKLOADS)
    for r in rows:
        assert r["float32_ms"] > 0 and r["autocast_ms"] > 0
        assert r["ratio"] == pytest.approx(r["autocast_ms"] / r["float32_ms"])
    assert len(lines) == len(rows) and all("autocast / float32" in line for line in lines)
