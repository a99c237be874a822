"""setup.py's build folder: one per torch and build setting, so an incremental build never links
objects compiled for another torch, compiler or flag."""
import importlib.util
import os
import types

import pytest
import torch

from helpers import REPO_ROOT

_spec = importlib.util.spec_from_file_location("seq2seq_fast_setup", os.path.join(REPO_ROOT, "setup.py"))
setup = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(setup)  # defines the functions; setup() runs only as __main__

EXT = types.SimpleNamespace(sources=["csrc/ops.cpp"], include_dirs=["csrc"], define_macros=[],
                            extra_compile_args=["-O3"], extra_link_args=["-fopenmp"], libraries=[], library_dirs=[])


def key(ext=EXT, **environ):
    return setup.build_key(setup.build_settings(torch, ext, environ))


def test_the_key_names_the_torch_version_and_is_stable():
    assert key().startswith(f"torch-{torch.__version__.replace('+', '-')}-")
    assert key() == key(), "the same settings give the same folder"
    assert key(CC=None) == key(), "an unset variable is no setting"


@pytest.mark.parametrize("environ", [
    {"SEQ2SEQ_FAST_SKIP_CUDA_BUILD": "1"}, {"TORCH_CUDA_ARCH_LIST": "9.0"}, {"CXX": "clang++"},
    {"CXXFLAGS": "-g"}, {"CUDA_HOME": "/opt/cuda-12"}, {"SEQ2SEQ_FAST_NATIVE": "1"},
], ids=lambda env: next(iter(env)))
def test_a_different_setting_is_a_different_folder(environ):
    assert key(**environ) != key()


def test_different_flags_or_another_torch_are_different_folders():
    assert key(types.SimpleNamespace(**dict(vars(EXT), extra_compile_args=["-O0"]))) != key()
    settings = setup.build_settings(torch, EXT, {})
    other = dict(settings, torch_version="1.13.1+cpu")  # never the torch under test
    assert setup.build_key(other).startswith("torch-1.13.1-cpu-")
    assert setup.build_key(other) != setup.build_key(settings)
    assert setup.build_key(dict(settings, torch_git="0" * 40)) != setup.build_key(settings)
    with pytest.raises(ValueError, match="torch_version"):
        setup.build_key({"python": ".so"})


def test_a_new_or_removed_source_is_seen():
    # The folders count among the inputs, so removing a source makes the library out of date.
    inputs = setup._inputs()
    for folder in ("csrc", "csrc/cpu", "csrc/cuda"):
        assert os.path.join(REPO_ROOT, folder) in inputs
    assert os.path.join(REPO_ROOT, "csrc", "checks.h") in inputs
    assert os.path.join(REPO_ROOT, "setup.py") in inputs
    assert key(types.SimpleNamespace(**dict(vars(EXT), sources=["csrc/ops.cpp", "csrc/new.cpp"]))) == key(), \
        "ninja sees new sources; a new one keeps the objects of the others"
