"""Which implementation an op runs: the env var MPL_FAST_BACKEND, read at every call.

  triton  the Triton kernels (CUDA tensors, or CPU tensors under TRITON_INTERPRET=1)
  cuda    the compiled csrc kernels (multi-tensor ops; CPU tensors use their CPU kernels)
  torch   the plain-torch reference beside each op
unset     the best available: compiled/Triton kernels where they can run, else the reference
"""
import os

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


def triton_usable(t: torch.Tensor) -> bool:
    """Triton kernels run on CUDA tensors, and on CPU tensors only through the interpreter."""
    return _triton_runs_on(t.device.type)


def _triton_runs_on(device_type: str) -> bool:
    return device_type == "cuda" or (device_type == "cpu" and triton_interpreted())


def _cannot_run(name: str, device_type: str) -> str:
    return (f"MPL_FAST_BACKEND={name} cannot run on {device_type} tensors "
            "(Triton needs CUDA, or TRITON_INTERPRET=1 for CPU tensors)")


def check(device: torch.device) -> None:
    """Raise ValueError (before any work) where MPL_FAST_BACKEND names no backend, or one whose
    loss kernels cannot run on `device`'s tensors."""
    name = requested()
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
