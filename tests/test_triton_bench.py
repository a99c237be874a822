"""The attention benchmark's rows are well formed (a stand-in clock, one tiny shape)."""
import os
import sys

import torch


sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
import attention_bench as A  # noqa: E402


def test_attention_rows_shape_and_units():
    device = "cuda" if torch.cuda.is_available() else "cpu"
    calls = []

    def measure(fn):
        fn()
        calls.append(fn)
        return 1e-3

    shape = (2, 3, 5, 4, 6, 0.1)
    rows = A.attention_rows(device, measure, shapes={"tiny": shape}, compile_reference=False, log=None)
    impls = ["reference module", "reference math, hoisted", "triton", "floor (bytes at copy rate)"]
    assert [(r["workload"], r["impl"]) for r in rows] == [(w, i) for w in A.WORKLOADS for i in impls]
    assert all(list(r) == list(rows[0]) for r in rows), "every row has the same columns (the runner's table)"
    forward = A.kernel_bytes(shape, "forward", 4)
    assert forward == 4 * (2 * 3 * 4 + 2 * 5 * 4 + 2 * 5 * 6 + 4 + 2 * 3 * 6 + 2 * 3 * 5)
    hoisted = rows[1]
    assert hoisted["median_s"] == 1e-3 and hoisted["gbps"] == round(forward / 1e-3 / 1e9, 2)
    assert hoisted["ratio_to_reference"] == 1.0
    triton_row = rows[2]
    if device == "cpu":
        assert triton_row["median_s"] is None and "interpreter" in triton_row["note"]
    else:
        assert triton_row["median_s"] == 1e-3, triton_row["note"]
