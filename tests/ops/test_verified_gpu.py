"""backend="auto" on CUDA picks only the paths a make gpu-check run verified; a backend requested
by name runs either way. Runs without a GPU: availability is patched, only the choice is tested."""
import json

import pytest
import torch

from seq2seq_fast.backends import verified
from seq2seq_fast.ops import dispatch


@pytest.fixture
def record(monkeypatch):
    """Sets the verified paths; every backend counts as able to run the call."""
    paths = {}
    monkeypatch.setattr(dispatch, "gpu_verified", lambda name, device_type: paths.get(f"{name}:{device_type}", False))
    monkeypatch.setattr(dispatch, "_call_unsupported", lambda *args: None)
    return paths


@pytest.mark.parametrize("entry", ["decoder_forward", "encoder_forward"])
def test_auto_on_cuda_skips_unverified_paths(record, entry):
    record.update({"cpp:cuda": False, "triton:cuda": False})
    assert dispatch._choose("auto", entry, "cuda", torch.float32, True) == ("torch", None)
    record["triton:cuda"] = True
    assert dispatch._choose("auto", entry, "cuda", torch.float32, True) == ("triton", None)
    record["cpp:cuda"] = True
    assert dispatch._choose("auto", entry, "cuda", torch.bfloat16, False) == ("cpp", None)


def test_requested_backend_runs_unverified(record):
    record.update({"cpp:cuda": False, "triton:cuda": False})
    for name in ("cpp", "triton", "torch"):
        assert dispatch._choose(name, "decoder_forward", "cuda", torch.float32, True) == (name, None)


def test_cpu_order_ignores_the_gpu_record(record):
    assert dispatch._auto_order("cpu") == ("cpp", "torch")
    assert dispatch._choose("auto", "decoder_forward", "cpu", torch.float32, True) == ("cpp", None)


def test_shipped_record_and_reader(tmp_path):
    with open(verified.RECORD) as f:
        shipped = json.load(f)
    assert set(shipped["paths"]) == {"cpp:cuda", "triton:cuda"}
    assert all(isinstance(v, bool) for v in shipped["paths"].values())
    path = tmp_path / "record.json"
    path.write_text(json.dumps({"paths": {"cpp:cuda": True, "triton:cuda": False}, "device": "H200"}))
    assert verified.verified_paths(str(path)) == {"cpp:cuda": True, "triton:cuda": False}
    assert verified.verified_paths(str(tmp_path / "missing.json")) == {}
    (tmp_path / "bad.json").write_text("{not json")
    assert verified.verified_paths(str(tmp_path / "bad.json")) == {}
