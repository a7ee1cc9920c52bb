"""Build of mpl-fast: setuptools for the Python packages, CMake for the extension mpl_fast._C.

The extension is compiled against the torch that is already installed (build with
`pip install --no-build-isolation ...`), so the same source builds CPU-only and CUDA variants.
"""
import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import setuptools
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
# pyproject.toml's license is an SPDX string (PEP 639): older setuptools reject it with a
# schema error, newer ones deprecate the table form it replaced (an error from 2027-02-18)
MIN_SETUPTOOLS = 77
# torch.compile's checkpoint (the higher-order op the checkpointed blocks are traced as) replays
# the BatchNorm buffer updates in its recomputation before torch 2.9: statistics counted twice
# (tests/test_checkpointing.py failed with 2.5, 2.6 and 2.8, passed with 2.9.1, 2.10 and newer)
MIN_TORCH = (2, 9)


def _check_setuptools(version: str) -> None:
    if int(version.split(".")[0]) < MIN_SETUPTOOLS:
        sys.exit(f"mpl-fast build needs setuptools>={MIN_SETUPTOOLS}, found {version}: "
                 f"pip install 'setuptools>={MIN_SETUPTOOLS}', then install mpl-fast again")


def _check_torch(version: str) -> None:
    """Stops before the build where the installed torch is too old: the extension is compiled
    against it, and pip would replace it only after the build (an extension for the wrong torch)."""
    major, minor = (int(v) for v in re.match(r"(\d+)\.(\d+)", version).groups())
    if (major, minor) < MIN_TORCH:
        need = ".".join(map(str, MIN_TORCH))
        sys.exit(f"mpl-fast needs torch>={need}, found {version}: pip install 'torch>={need}', "
                 "then install mpl-fast again")


def _nvcc():
    """The CUDA compiler to use, or None. CUDA_HOME wins over whatever nvcc is on PATH."""
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and (Path(home) / "bin" / "nvcc").exists():
            return str(Path(home) / "bin" / "nvcc")
    return shutil.which("nvcc")


class CMakeExtension(Extension):
    def __init__(self, name):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext):
        try:
            import pybind11
            import torch
            import torch.utils.cpp_extension as cpp
        except ImportError as err:  # pragma: no cover - message for users
            sys.exit(f"mpl-fast build needs torch and pybind11 installed first ({err}); "
                     "see README: install torch, then pip install --no-build-isolation -e .")
        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_dir = Path(self.build_temp).resolve() / "cmake"
        build_dir.mkdir(parents=True, exist_ok=True)
        with_cuda = torch.version.cuda is not None and os.environ.get("MPL_FAST_NO_CUDA") != "1"
        args = [
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DTORCH_INCLUDE_DIRS={';'.join(cpp.include_paths())}",
            f"-DTORCH_LIBRARY_DIR={cpp.library_paths()[0]}",
            f"-DTORCH_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
            f"-DTORCH_WITH_CUDA={'ON' if with_cuda else 'OFF'}",
            f"-DCMAKE_BUILD_TYPE={os.environ.get('MPL_FAST_BUILD_TYPE', 'Release')}",
        ]
        nvcc = _nvcc()
        if nvcc and os.environ.get("MPL_FAST_SKIP_CUDA_CHECK") != "1":
            args.append(f"-DCMAKE_CUDA_COMPILER={nvcc}")
        if os.environ.get("MPL_FAST_CUDA_ARCHS"):
            args.append(f"-DMPL_FAST_CUDA_ARCHS={os.environ['MPL_FAST_CUDA_ARCHS']}")
        jobs = str(os.cpu_count() or 2)
        subprocess.run(["cmake", str(ROOT), *args], cwd=build_dir, check=True)
        subprocess.run(["cmake", "--build", ".", "-j", jobs], cwd=build_dir, check=True)


if __name__ == "__main__":  # (as setuptools' build backend runs it; a test imports it)
    _check_setuptools(setuptools.__version__)
    try:
        _check_torch(importlib.metadata.version("torch"))
    except importlib.metadata.PackageNotFoundError:
        pass  # build_ext says to install torch first
    setup(
        ext_modules=[CMakeExtension("mpl_fast._C")],
        cmdclass={"build_ext": CMakeBuild},
    )
