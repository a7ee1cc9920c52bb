"""Multi-tensor ops over parameter lists: `multi_tensor_dot` and `multi_tensor_axpby`.

The kernels live in csrc/ (CPU and CUDA) and are registered there with TORCH_LIBRARY as
torch.ops.mpl_fast.*; this module adds their fake (meta) implementations, the plain-torch
reference of each, argument checks for the reference path, and backend dispatch.
"""
from typing import Sequence

import torch

from mpl_fast.ops import _extension, backend

_SUPPORTED = (torch.float32, torch.float16, torch.bfloat16)

_extension.load()


def _result_dtype(a):
    return torch.float64 if a and a[0].dtype == torch.float64 else torch.float32


@torch.library.register_fake("mpl_fast::multi_tensor_dot")
def _dot_fake(a, b):
    return a[0].new_empty((), dtype=_result_dtype(a))


def _dot_setup_context(ctx, inputs, output):
    a, b = inputs
    ctx.n = len(a)
    ctx.save_for_backward(*a, *b)  # saved, not detached: a double backward goes through them


def _dot_backward(ctx, grad):
    # d/da_i <a_i, b_i> = b_i, and the other way round; each in its input's dtype
    saved = ctx.saved_tensors
    a, b = saved[:ctx.n], saved[ctx.n:]
    grad_a = [(grad * y).to(y.dtype) for y in b] if ctx.needs_input_grad[0] else None
    grad_b = [(grad * x).to(x.dtype) for x in a] if ctx.needs_input_grad[1] else None
    return grad_a, grad_b


# Without it the compiled kernels' result would carry autograd's not-implemented node, whose
# backward hands the inputs no gradient at all (with only a warning); the reference path is
# differentiated by torch itself.
torch.library.register_autograd("mpl_fast::multi_tensor_dot", _dot_backward,
                                setup_context=_dot_setup_context)


@torch.library.register_fake("mpl_fast::multi_tensor_axpby")
def _axpby_fake(y, x, alpha, beta):
    return None


def check_lists(op: str, a: Sequence[torch.Tensor], b: Sequence[torch.Tensor], a_name: str,
                b_name: str) -> None:
    """The per-pair checks the compiled kernels make, for the reference path (same messages)."""
    if len(a) != len(b):
        raise ValueError(f"{op}: {a_name} and {b_name} must have the same length, "
                         f"got {len(a)} and {len(b)}")
    for i, (x, y) in enumerate(zip(a, b)):
        if x.shape != y.shape:
            raise ValueError(f"{op}: {a_name}[{i}] and {b_name}[{i}] differ in shape: "
                             f"{list(x.shape)} vs {list(y.shape)}")
        if x.dtype != y.dtype:
            raise ValueError(f"{op}: {a_name}[{i}] and {b_name}[{i}] differ in dtype: "
                             f"{x.dtype} vs {y.dtype}")
        if x.dtype not in _SUPPORTED and not (x.dtype == torch.float64 and x.device.type == "cpu"):
            raise ValueError(f"{op}: {a_name}[{i}] has dtype {x.dtype}; only float32, "
                             "float16 and bfloat16 are supported (and float64 on CPU)")


def multi_tensor_dot_reference(a, b):
    """sum_i <a_i, b_i> in plain torch, accumulated in float64, returned as float32 (float64
    for float64 inputs)."""
    check_lists("multi_tensor_dot", a, b, "a", "b")
    if not a:
        return torch.zeros((), dtype=torch.float32)
    total = torch.zeros((), dtype=torch.float64, device=a[0].device)
    for x, y in zip(a, b):
        total = total + (x.double() * y.double()).sum()
    return total.to(_result_dtype(a))


def multi_tensor_axpby_reference(y, x, alpha, beta):
    """y_i <- alpha * x_i + beta * y_i in fp32, one rounding to y's dtype."""
    check_lists("multi_tensor_axpby", y, x, "y", "x")
    for yi, xi in zip(y, x):
        compute = torch.promote_types(yi.dtype, torch.float32)
        yi.copy_(xi.to(compute) * alpha + yi.to(compute) * beta)


def _is_list(v):
    return isinstance(v, (list, tuple)) and all(isinstance(t, torch.Tensor) for t in v)


def _check_one_device(op, a, b, a_name, b_name):
    # Checked before dispatch: with mixed devices the dispatcher could pick a kernel (or the
    # fake) that never sees the offending tensor's device.
    dev = a[0].device
    for i, (x, y) in enumerate(zip(a, b)):
        if x.device != dev or y.device != dev:
            raise ValueError(f"{op}: all tensors must be on one device; {a_name}[0] is on {dev} "
                             f"but {a_name}[{i}] is on {x.device} and {b_name}[{i}] on {y.device}")


def multi_tensor_dot(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> torch.Tensor:
    """The sum over i of <a_i, b_i>: a 0-dim float32 tensor on the inputs' device.

    a and b are equal-length lists of tensors, pairwise of one shape and dtype (float32,
    float16 or bfloat16; float64 on CPU, giving a float64 result), all on one device;
    accumulation is at least fp32. An empty list gives 0 (on the CPU). Differentiable in a
    and b (the gradient of a_i is grad * b_i, in a_i's dtype).

    Raises TypeError where a or b is not a list (or tuple) of tensors, ValueError naming the
    list and index for lengths, shapes or dtypes that do not pair up, or mixed devices.
    """
    if not (_is_list(a) and _is_list(b)):
        raise TypeError("multi_tensor_dot: a and b must be lists of tensors")
    if len(a) == 0 and len(b) == 0:
        return torch.zeros((), dtype=torch.float32)
    if len(a) == 0 or len(b) == 0:
        check_lists("multi_tensor_dot", a, b, "a", "b")
    _check_one_device("multi_tensor_dot", a, b, "a", "b")
    if backend.multi_tensor_backend(a[0].device) == "torch":
        return multi_tensor_dot_reference(a, b)
    return torch.ops.mpl_fast.multi_tensor_dot(list(a), list(b))


def multi_tensor_axpby(y: Sequence[torch.Tensor], x: Sequence[torch.Tensor], alpha: float,
                        beta: float) -> None:
    """In place, for every i: y_i <- alpha * x_i + beta * y_i (computed in fp32, rounded once
    to y_i's dtype); returns None.

    y and x are equal-length lists of tensors, pairwise of one shape and dtype (as for
    multi_tensor_dot), all on one device; alpha and beta are Python floats. Used under
    torch.no_grad() to perturb and restore parameter lists (theta +/- eps * v) without extra
    copies.

    Raises TypeError where y or x is not a list (or tuple) of tensors, ValueError naming the
    list and index for lengths, shapes or dtypes that do not pair up, or mixed devices.
    """
    if not (_is_list(y) and _is_list(x)):
        raise TypeError("multi_tensor_axpby: y and x must be lists of tensors")
    if len(y) == 0 and len(x) == 0:
        return
    if len(y) == 0 or len(x) == 0:
        check_lists("multi_tensor_axpby", y, x, "y", "x")
    _check_one_device("multi_tensor_axpby", y, x, "y", "x")
    if backend.multi_tensor_backend(y[0].device) == "torch":
        multi_tensor_axpby_reference(y, x, float(alpha), float(beta))
        return
    torch.ops.mpl_fast.multi_tensor_axpby(list(y), list(x), float(alpha), float(beta))
