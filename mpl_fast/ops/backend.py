"""Which implementation an op runs: the env var MPL_FAST_BACKEND, read at every call.

  triton  the Triton kernels (CUDA tensors, or CPU tensors under TRITON_INTERPRET=1)
  cuda    the compiled csrc kernels (multi-tensor ops; CPU tensors use their CPU kernels)
  torch   the plain-torch reference beside each op
unset     the best available: compiled/Triton kernels where they can run, else the reference
"""
import functools
import importlib.metadata
import os
import re
from typing import Optional

import torch

BACKENDS = ("triton", "cuda", "torch")


def requested():
    """The backend named by MPL_FAST_BACKEND, or None when unset/empty."""
    name = os.environ.get("MPL_FAST_BACKEND", "").strip().lower()
    if not name:
        return None
    if name not in BACKENDS:
        raise ValueError(f"MPL_FAST_BACKEND={name!r} is not one of {', '.join(BACKENDS)}")
    return name


def triton_interpreted():
    return os.environ.get("TRITON_INTERPRET", "") == "1"


def _major_minor(version: str):
    return tuple(int(v) for v in re.match(r"(\d+)\.(\d+)", version).groups())


def interpreter_conflict(triton_version: str, numpy_version: str) -> Optional[str]:
    """Why Triton's interpreter cannot run these kernels, or None. Before triton 3.7 it converts
    one-element arrays to Python ints, which numpy 2.4 refuses: every persistent kernel's loop
    fails (seen with triton 3.5 and 3.6; triton 3.1 also returned garbage labels)."""
    if _major_minor(triton_version) < (3, 7) and _major_minor(numpy_version) >= (2, 4):
        return (f"triton {triton_version}'s interpreter (TRITON_INTERPRET=1) fails with numpy "
                f"{numpy_version}: pip install 'numpy<2.4', or triton>=3.7")
    return None


def interpreter_problem() -> Optional[str]:
    """interpreter_conflict for the installed triton and numpy, where the interpreter is on."""
    return _installed_conflict() if triton_interpreted() else None


@functools.lru_cache(maxsize=None)
def _installed_conflict() -> Optional[str]:
    try:
        triton_version = importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        return None  # no Triton kernels at all: their import says so
    import numpy

    return interpreter_conflict(triton_version, numpy.__version__)


def triton_usable(t: torch.Tensor) -> bool:
    """Triton kernels run on CUDA tensors, and on CPU tensors only through the interpreter."""
    return _triton_runs_on(t.device.type)


def _triton_runs_on(device_type: str) -> bool:
    problem = interpreter_problem() if device_type == "cpu" else None
    if problem:  # one clear line rather than wrong results or an error deep in Triton
        raise RuntimeError(problem)
    return device_type == "cuda" or (device_type == "cpu" and triton_interpreted())


def _cannot_run(name: str, device_type: str) -> str:
    return (f"MPL_FAST_BACKEND={name} cannot run on {device_type} tensors "
            "(Triton needs CUDA, or TRITON_INTERPRET=1 for CPU tensors)")


def check(device: torch.device) -> None:
    """Raise ValueError (before any work) where MPL_FAST_BACKEND names no backend, or one whose
    loss kernels cannot run on `device`'s tensors."""
    name = requested()
    problem = interpreter_problem() if device.type == "cpu" and name != "torch" else None
    if problem:
        raise ValueError(problem)
    if name in ("triton", "cuda") and not _triton_runs_on(device.type):
        raise ValueError(_cannot_run(name, device.type))


def loss_backend(t: torch.Tensor) -> str:
    """'triton' or 'torch' for the fused loss ops, for tensors like t."""
    name = requested()
    if name == "torch" or t.dtype == torch.float64:  # float64 (exact tests) stays in torch
        return "torch"
    if name in ("triton", "cuda"):
        if not triton_usable(t):
            raise RuntimeError(_cannot_run(name, t.device.type))
        return "triton"
    return "triton" if triton_usable(t) else "torch"  # e.g. meta tensors: torch


def multi_tensor_backend(device: torch.device) -> str:
    """'cuda' (the compiled csrc kernels, CPU or CUDA) or 'torch' for the multi-tensor ops."""
    from mpl_fast.ops import _extension

    name = requested()
    if name == "torch":
        return "torch"
    if device.type == "cuda" and not _extension.cuda_built():
        if name in ("cuda", "triton"):
            raise RuntimeError("MPL_FAST_BACKEND asks for compiled kernels on CUDA tensors, but "
                               "mpl_fast._C was built without CUDA")
        return "torch"
    _extension.load()
    return "cuda"


def plain_eager(*tensors) -> bool:
    """True when a loss op may bypass torch.library's dispatcher and run as a plain
    autograd.Function: eager mode with plain tensors, nothing tracing, no dispatch mode (fake
    tensors, flop counters) and no functorch transform. Otherwise the registered op runs, which
    is what torch.compile, FakeTensor, vmap and opcheck work with. The bypass saves two
    dispatcher round trips of Python per call, which is what a host-bound eager loop pays."""
    if torch.compiler.is_compiling():
        return False
    if any(t is not None and type(t) is not torch.Tensor for t in tensors):
        return False
    try:
        return not (torch._C._len_torch_dispatch_stack()
                    or torch._C._are_functorch_transforms_active())
    except AttributeError:  # a torch without these hooks: take the registered op
        return False
