"""pytest-benchmark suite over the same configurations and workloads as runner.py.

    .venv/bin/python -m pytest benchmarks/test_bench.py --benchmark-enable [-k zh]

Each group is one (config, workload); compare the rows of a group for the ratios (the runner
prints them directly).
"""
import pytest
import torch

import seq2seq_fast as sf
from configs import CONFIGS, WORKLOADS
import workloads as W

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
IMPLS = ["reference"] + [b for b in sf.available_backends() if not (b == "triton" and DEVICE == "cpu")]

_references = {}


def _reference(name):
    if name not in _references:
        cfg = CONFIGS[name]
        _references[name] = (W.reference_model(cfg, DEVICE), W.inputs(cfg, DEVICE))
    return _references[name]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("workload", WORKLOADS)
@pytest.mark.parametrize("config", list(CONFIGS))
def test_workload(benchmark, config, workload, impl):
    reference, data = _reference(config)
    fn = W.build(workload, impl, reference, CONFIGS[config], data)
    benchmark.group = f"{config}/{workload}"
    if DEVICE == "cuda":
        benchmark.pedantic(lambda: (fn(), torch.cuda.synchronize()), rounds=20, warmup_rounds=3)
    else:
        benchmark(fn)
