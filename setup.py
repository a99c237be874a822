"""Builds seq2seq_fast._C with ninja: the C++ sources always, csrc/cuda/*.cu when a CUDA toolkit
and a CUDA build of torch are present (SEQ2SEQ_FAST_SKIP_CUDA_BUILD=1 turns CUDA off).

Install with ``pip install --no-build-isolation -e .`` so the extension is built against the
torch of the current environment (with build isolation pip would fetch a fresh torch).

Builds are incremental, editable ones included (pip gives each build a fresh temporary folder):
objects go to ``build/<key>/temp``, where the key names the torch version and hashes everything
else the objects depend on (``build_settings``), so a different torch, compiler or flag never
reuses them; ninja recompiles only the sources that changed. The linked library is kept there too
and reused without running ninja or the linker while nothing in csrc/ or setup.py is newer.
"""
import glob
import hashlib
import json
import logging
import os
import re
import shutil
import sys
import sysconfig

ROOT = os.path.dirname(os.path.abspath(__file__))
BUILD_ROOT = os.path.join(ROOT, "build")
# Environment variables that change the compiler's command line or output (read by torch's
# cpp_extension, setuptools or this file).
BUILD_ENV = ("CC", "CXX", "CFLAGS", "CXXFLAGS", "CPPFLAGS", "LDFLAGS", "LDSHARED", "CUDA_HOME", "CUDA_PATH",
             "CUDA_INC_PATH", "CUDNN_HOME", "PYTORCH_NVCC", "NVCC_APPEND_FLAGS", "NVCC_PREPEND_FLAGS",
             "TORCH_CUDA_ARCH_LIST", "SEQ2SEQ_FAST_SKIP_CUDA_BUILD", "SEQ2SEQ_FAST_NATIVE")


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


class _NoGpuIsExpected(logging.Filter):
    """Drops torch's "No CUDA runtime is found, using CUDA_HOME=..." warning: building the CUDA
    kernels on a machine without a GPU is intended here (CUDA_HOME and the architectures are set
    explicitly, and ``_extension`` prints what it builds)."""

    def filter(self, record):
        return not record.getMessage().startswith("No CUDA runtime is found")


def _wheel_cuda_includes():
    """Headers that CUDA builds of torch take from the nvidia wheels (cusparse.h, ...)."""
    found = []
    for site in sys.path:
        for sub in ("cu13", "cu12"):
            inc = os.path.join(site, "nvidia", sub, "include")
            if os.path.isdir(inc) and inc not in found:
                found.append(inc)
    return found


def build_key(settings):
    """The build folder's name for ``settings`` (a JSON-able dict with ``torch_version``):
    readable torch version, then a hash of every setting, e.g. ``torch-2.14.1-cu130-3fa9c2d41b7e``."""
    if not isinstance(settings, dict) or "torch_version" not in settings:
        raise ValueError(f"settings must be a dict with a 'torch_version' key, got {settings!r}")
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:12]
    version = re.sub(r"[^A-Za-z0-9.]+", "-", str(settings["torch_version"]))
    return f"torch-{version}-{digest}"


def build_settings(torch, ext, environ):
    """Everything the compiled objects depend on besides the contents of csrc/: torch (version,
    commit, headers' location), the Python ABI, the compilers, the build environment variables and
    the extension's flags, macros and include folders. Not the list of sources: ninja and
    ``_inputs`` see a source come or go."""
    compilers = {name: shutil.which(environ.get(name.upper(), default) or default)
                 for name, default in (("cxx", "c++"), ("cc", "cc"))}
    devices = []
    if torch.version.cuda and not environ.get("TORCH_CUDA_ARCH_LIST") and torch.cuda.is_available():
        devices = [torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())]
    return dict(
        torch_version=torch.__version__, torch_git=torch.version.git_version, torch_cuda=torch.version.cuda,
        torch_dir=os.path.dirname(torch.__file__), python=sysconfig.get_config_var("EXT_SUFFIX"),
        python_include=sysconfig.get_paths()["include"],
        compilers={k: os.path.realpath(v) if v else None for k, v in compilers.items()},
        env={name: environ.get(name) for name in BUILD_ENV}, gpu_capabilities=devices,
        extension=dict(include_dirs=ext.include_dirs, macros=ext.define_macros,
                       compile_args=ext.extra_compile_args, link_args=ext.extra_link_args,
                       libraries=ext.libraries, library_dirs=ext.library_dirs),
    )


def _inputs():
    """The files and folders whose change means a rebuild: csrc/ (folders too, so a removed
    source counts) and this file."""
    paths = [os.path.join(ROOT, "setup.py")]
    for dirpath, _, filenames in os.walk(os.path.join(ROOT, "csrc")):
        paths.append(dirpath)
        paths.extend(os.path.join(dirpath, name) for name in filenames)
    return paths


def _extension(torch, cpp_extension):
    cpp_sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    # -fno-math-errno: no kernel reads errno, and with it set GCC cannot vectorize a loop that calls
    # sqrt (Adam's update ran scalar, 6x slower); results are unchanged (no libmvec without -ffast-math).
    cxx_flags = ["-O3", "-fopenmp", "-fno-math-errno", "-DNDEBUG"]
    if "SEQ2SEQ_FAST_NATIVE" in os.environ:
        cxx_flags.append("-march=native")
    common = dict(
        name="seq2seq_fast._C",
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_link_args=["-fopenmp"],
        py_limited_api=False,
    )
    want_cuda = (
        os.environ.get("SEQ2SEQ_FAST_SKIP_CUDA_BUILD", "0") != "1"
        and torch.version.cuda is not None
        and cpp_extension.CUDA_HOME is not None
        and bool(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))
    )
    if not want_cuda:
        print("setup.py: the extension gets the CPU kernels only", file=sys.stderr)
        return cpp_extension.CppExtension(sources=cpp_sources, extra_compile_args=cxx_flags, **common)
    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        # No GPU to detect the architecture from: build for A100 and H100/H200.
        os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"
    print(f"setup.py: the extension gets the CPU and CUDA kernels (CUDA_HOME={cpp_extension.CUDA_HOME}, "
          f"TORCH_CUDA_ARCH_LIST={os.environ.get('TORCH_CUDA_ARCH_LIST') or 'the visible GPUs'})", file=sys.stderr)
    cuda_sources = sorted(glob.glob("csrc/cuda/*.cu") + glob.glob("csrc/cuda/*.cpp"))
    return cpp_extension.CUDAExtension(
        sources=cpp_sources + cuda_sources,
        include_dirs=common.pop("include_dirs") + _wheel_cuda_includes(),
        define_macros=[("SEQ2SEQ_FAST_WITH_CUDA", "1")],
        extra_compile_args={
            "cxx": cxx_flags,
            "nvcc": ["-O3", "--use_fast_math", "-lineinfo"],
        },
        **common,
    )


def _is_newer(path, than):
    return os.path.getmtime(path) > os.path.getmtime(than)


def _build_ext_class(cpp_extension, build_dir):
    """torch's ninja ``BuildExtension`` with objects in ``build_dir/temp`` and the linked library
    cached in ``build_dir``."""

    class BuildExt(cpp_extension.BuildExtension.with_options(use_ninja=True)):
        def finalize_options(self):
            super().finalize_options()
            self.build_temp = os.path.join(build_dir, "temp")  # pip's editable build passes a fresh one

        def build_extension(self, ext):
            target = self.get_ext_fullpath(ext.name)
            cached = os.path.join(build_dir, os.path.basename(target))
            if os.path.exists(cached) and not any(_is_newer(p, cached) for p in _inputs()):
                print(f"setup.py: {ext.name} is up to date ({os.path.relpath(cached, ROOT)})", file=sys.stderr)
                os.makedirs(os.path.dirname(target), exist_ok=True)
                shutil.copy2(cached, target)
                return
            super().build_extension(ext)
            shutil.copy2(target, cached)

    return BuildExt


def main():
    from setuptools import setup

    _resolve_cuda_home()
    logging.getLogger("torch.utils.cpp_extension").addFilter(_NoGpuIsExpected())
    import torch
    from torch.utils import cpp_extension

    if shutil.which("ninja") is None:
        print("setup.py: ninja not found; the build falls back to a slow serial build", file=sys.stderr)
    ext = _extension(torch, cpp_extension)
    build_dir = os.path.join(BUILD_ROOT, build_key(build_settings(torch, ext, os.environ)))
    setup(ext_modules=[ext], cmdclass={"build_ext": _build_ext_class(cpp_extension, build_dir)})


if __name__ == "__main__":
    main()
