"""Builds seq2seq_fast._C with ninja: the C++ sources always, csrc/cuda/*.cu when a CUDA toolkit
and a CUDA build of torch are present (SEQ2SEQ_FAST_SKIP_CUDA_BUILD=1 turns CUDA off).

Install with ``pip install --no-build-isolation -e .`` so the extension is built against the
torch of the current environment (with build isolation pip would fetch a fresh torch).
"""
import glob
import os
import shutil
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _resolve_cuda_home():
    """Point CUDA_HOME at the real toolkit before torch.utils.cpp_extension guesses it.

    On these machines /usr/local/bin/nvcc is a wrapper script, from which torch would guess
    CUDA_HOME=/usr/local and then fail to link; follow the toolkit layout instead.
    """
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    candidates = ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    for path in candidates:
        if os.path.exists(os.path.join(path, "bin", "nvcc")) and os.path.isdir(
            os.path.join(path, "include")
        ):
            os.environ["CUDA_HOME"] = os.path.realpath(path)
            return


def _wheel_cuda_includes():
    """Headers that CUDA builds of torch take from the nvidia wheels (cusparse.h, ...)."""
    found = []
    for site in sys.path:
        for sub in ("cu13", "cu12"):
            inc = os.path.join(site, "nvidia", sub, "include")
            if os.path.isdir(inc) and inc not in found:
                found.append(inc)
    return found


_resolve_cuda_home()

import torch  # noqa: E402  (after CUDA_HOME is settled)
from torch.utils.cpp_extension import (  # noqa: E402
    CUDA_HOME,
    BuildExtension,
    CppExtension,
    CUDAExtension,
)


def _want_cuda():
    if os.environ.get("SEQ2SEQ_FAST_SKIP_CUDA_BUILD", "0") == "1":
        return False
    return torch.version.cuda is not None and CUDA_HOME is not None and bool(
        glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu"))
    )


def _extension():
    cpp_sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    cxx_flags = ["-O3", "-fopenmp", "-DNDEBUG"]
    if "SEQ2SEQ_FAST_NATIVE" in os.environ:
        cxx_flags.append("-march=native")
    common = dict(
        name="seq2seq_fast._C",
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_link_args=["-fopenmp"],
        py_limited_api=False,
    )
    if _want_cuda():
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            # No GPU to detect the architecture from: build for A100 and H100/H200.
            os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"
        cuda_sources = sorted(glob.glob("csrc/cuda/*.cu") + glob.glob("csrc/cuda/*.cpp"))
        return CUDAExtension(
            sources=cpp_sources + cuda_sources,
            include_dirs=common.pop("include_dirs") + _wheel_cuda_includes(),
            define_macros=[("SEQ2SEQ_FAST_WITH_CUDA", "1")],
            extra_compile_args={
                "cxx": cxx_flags,
                "nvcc": ["-O3", "--use_fast_math", "-lineinfo"],
            },
            **common,
        )
    return CppExtension(sources=cpp_sources, extra_compile_args=cxx_flags, **common)


if shutil.which("ninja") is None:
    print("setup.py: ninja not found; the build falls back to a slow serial build", file=sys.stderr)

setup(
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
