"""The attention benchmark's rows are well formed: one tiny shape, a short real clock."""
import os
import sys

import torch


sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
import attention_bench as A  # noqa: E402
from floor import Floor  # noqa: E402
from rows import group_rows  # noqa: E402


def test_attention_rows_shape_and_units():
    device = "cuda" if torch.cuda.is_available() else "cpu"
    shape = (2, 3, 5, 4, 6, 0.1)
    impls, skipped = A.runnable_impls(device, ["reference", "hoisted", "best"])
    if device == "cpu":
        assert impls == ["reference", "hoisted"] and "interpreter" in skipped["triton"]
    else:
        assert impls == ["reference", "hoisted", "triton"], skipped
    rows = A.attention_rows(device, {"tiny": shape}, A.ATTENTION_WORKLOADS, impls,
                            min_time=0.01)
    assert [(r["workload"], r["impl"]) for r in rows] == [(w, i) for w in A.ATTENTION_WORKLOADS
                                                          for i in impls + ["floor"]]
    model_row = group_rows("model", "c", "float32", "w", {"reference": 1.0}, {}, Floor(0.5, 0.5, 0.1, 10, 20))[0]
    assert all(set(r) == set(model_row) for r in rows if r["impl"] != "floor"), "the model section's row format"
    assert all(r["median_s"] > 0 and r["over_floor"] >= 1 for r in rows), "measured, and not under the floor"
    forward = A.kernel_bytes(shape, "forward", 4)
    assert forward == 4 * (2 * 3 * 4 + 2 * 5 * 4 + 2 * 5 * 6 + 4 + 2 * 3 * 6 + 2 * 3 * 5)
    assert rows[len(impls)]["nbytes"] == forward

