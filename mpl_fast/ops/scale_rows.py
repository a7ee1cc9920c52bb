"""The backward of the loss ops: grad[i, :] * grad_output[i] (or one scale for all rows).

The loss ops write their gradient in the forward pass; backward only scales it by grad_output.
In eager mode that is done in place (scale_rows_), with rows whose scale is 1 left untouched by
the Triton kernel, so the backward of a loss that is backpropagated alone costs nothing.
scale_rows_ bumps `grad`'s version counter, so a second backward through the same graph
(retain_graph=True) fails loudly instead of scaling twice. It is a plain function, not a
torch.library op: it only runs in eager backward, where a dispatcher round trip costs more host
time than the launch. While torch.compile traces, the scale is out of place, keeping the graph
functional.
"""
import torch

from mpl_fast.ops import backend


def _scaled(grad, scale):
    wide = torch.float64 if grad.dtype == torch.float64 else torch.float32
    s = scale.to(wide)
    s = s[:, None] if s.dim() == 1 else s
    return (grad.to(wide) * s).to(grad.dtype)


def scale_rows_(grad: torch.Tensor, scale: torch.Tensor) -> None:
    """grad (N x C) *= scale (0-dim, or N), in place; grad's version is bumped."""
    if grad.numel() == 0:
        return
    if backend.loss_backend(grad) == "triton" and grad.stride(-1) == 1:
        from mpl_fast.kernels.scale_rows import scale_rows_forward

        scale_rows_forward(grad, scale)
        torch.autograd.graph.increment_version(grad)  # the kernel wrote behind autograd's back
        return
    grad.copy_(_scaled(grad, scale))  # a torch in-place op: bumps the version itself


def scaled_gradient(grad: torch.Tensor, grad_output: torch.Tensor) -> torch.Tensor:
    """grad * grad_output for a loss op's backward: in place in eager mode, else out of place."""
    if torch.compiler.is_compiling() or type(grad) is not torch.Tensor:
        return _scaled(grad, grad_output)  # traced (compile, AOT): stay functional
    scale_rows_(grad, grad_output)
    return grad
