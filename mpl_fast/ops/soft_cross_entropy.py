"""soft_cross_entropy: cross-entropy against class indices or probabilities, with label
smoothing and a row mask; the gradient is computed in the forward pass (backward is a scale).

Per row: loss_i = -sum_c t'_ic log_softmax(logits_i)_c, t' = (1 - ls) t + ls / C, times mask_i.
A zero target weight contributes 0 even against a -inf logit. reduction "mean" divides by N
(masked rows stay in the divisor, the official UDA convention; N = 0 gives 0), "sum", "none".
The gradient written in the forward already holds the reduction's factor; backward scales it in
place by grad_output (see scale_rows), so one graph can be backpropagated once, not twice.
On CUDA, class indices are not range-checked on the host (that would synchronise): an index
outside [0, C) gives a NaN loss for its row.
"""
from typing import Optional

import torch

from mpl_fast.ops import _checks, backend
from mpl_fast.ops._checks import compute_dtype as _compute_dtype
from mpl_fast.ops.scale_rows import scaled_gradient


def soft_cross_entropy_torch(logits, target_index, target_probs, mask, label_smoothing,
                             compute_grad, grad_scale=1.0):
    """The plain-torch kernel of the op: (per-row loss float32, grad_scale * its gradient)."""
    x = logits.to(_compute_dtype(logits))
    c = x.shape[1]
    logp = torch.log_softmax(x, dim=1)
    if target_index is not None:
        t = torch.zeros_like(x).scatter_(1, target_index.clamp(0, c - 1)[:, None], 1.0)
    else:
        t = target_probs.to(x.dtype)
    if label_smoothing > 0:
        t = (1.0 - label_smoothing) * t + label_smoothing / c
    loss = -torch.where(t != 0, t * logp, torch.zeros_like(logp)).sum(1)
    if target_index is not None:
        loss = torch.where((target_index >= 0) & (target_index < c), loss, float("nan"))
    grad = None
    if compute_grad:
        grad = (logp.exp() * t.sum(1, keepdim=True) - t) * grad_scale
    if mask is not None:
        m = mask.to(x.dtype)
        loss = torch.where(m != 0, loss * m, torch.zeros_like(loss))
        if grad is not None:  # 0 in a masked row, whatever it holds (NaN included)
            grad = torch.where(m[:, None] != 0, grad * m[:, None], torch.zeros_like(grad))
    grad = grad.to(logits.dtype) if grad is not None else logits.new_empty(0)
    return loss, grad


def reduce_rows(loss_rows, reduction):
    """'mean' (over all N rows, 0 for N = 0), 'sum' or 'none' of per-row losses."""
    if reduction == "none":
        return loss_rows
    if reduction == "sum" or loss_rows.shape[0] == 0:  # the mean of no rows is 0, not NaN
        return loss_rows.sum()
    return loss_rows.mean()  # one kernel, not a sum and a division


def reduction_scale(n, reduction):
    """What the forward folds into the gradient it writes: d(reduced loss) / d(row loss)."""
    return 1.0 / max(n, 1) if reduction == "mean" else 1.0


def reduced_shape(n, reduction):
    return (n,) if reduction == "none" else ()


def _soft_cross_entropy_impl(logits, target_index, target_probs, mask, label_smoothing,
                             reduction, compute_grad):
    """(reduced loss, gradient buffer): the body of the op, whichever way it is called."""
    scale = reduction_scale(logits.shape[0], reduction)
    if backend.loss_backend(logits) == "triton":
        from mpl_fast.kernels.soft_cross_entropy import soft_cross_entropy_forward

        rows, grad = soft_cross_entropy_forward(logits, target_index, target_probs, mask,
                                                label_smoothing, compute_grad, scale)
    else:
        rows, grad = soft_cross_entropy_torch(logits, target_index, target_probs, mask,
                                              label_smoothing, compute_grad, scale)
    return reduce_rows(rows, reduction), grad


@torch.library.custom_op("mpl_fast::soft_cross_entropy", mutates_args=())
def _soft_cross_entropy_op(logits: torch.Tensor, target_index: Optional[torch.Tensor],
                           target_probs: Optional[torch.Tensor], mask: Optional[torch.Tensor],
                           label_smoothing: float, reduction: str, compute_grad: bool
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    return _soft_cross_entropy_impl(logits, target_index, target_probs, mask, label_smoothing,
                                    reduction, compute_grad)


@_soft_cross_entropy_op.register_fake
def _(logits, target_index, target_probs, mask, label_smoothing, reduction, compute_grad):
    loss = logits.new_empty(reduced_shape(logits.shape[0], reduction),
                            dtype=_compute_dtype(logits))
    grad = torch.empty_like(logits) if compute_grad else logits.new_empty(0)
    return loss, grad


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(output[1])
    ctx.has_grad = inputs[6]
    # the gradient buffer's grad is never used: not filled with zeros (an N x C fill)
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_loss, _grad_grad):
    (grad,) = ctx.saved_tensors
    if grad_loss is None:
        return None, None, None, None, None, None, None
    if not ctx.has_grad:
        raise RuntimeError("soft_cross_entropy was called without compute_grad=True; "
                           "call it with grad enabled and logits requiring grad")
    return scaled_gradient(grad, grad_loss), None, None, None, None, None, None


_soft_cross_entropy_op.register_autograd(_backward, setup_context=_setup_context)


class _SoftCrossEntropyEager(torch.autograd.Function):
    """The same forward and backward without the dispatcher (see backend.plain_eager)."""

    @staticmethod
    def forward(ctx, *inputs):
        output = _soft_cross_entropy_impl(*inputs)
        _setup_context(ctx, inputs, output)
        return output[0]

    @staticmethod
    def backward(ctx, grad_loss):
        return _backward(ctx, grad_loss, None)


def soft_cross_entropy(logits: torch.Tensor, target: torch.Tensor, label_smoothing: float = 0.0,
                       mask: Optional[torch.Tensor] = None, reduction: str = "mean"
                       ) -> torch.Tensor:
    """Cross-entropy of logits against class indices or probabilities, with label smoothing
    and a row mask, its gradient computed in the forward pass.

    Per row, loss_i = -sum_c t'_ic * log_softmax(logits_i)_c with t' = (1 - label_smoothing)
    * t + label_smoothing / C, times mask_i when a mask is given.

    Args:
        logits: N x C (N >= 0, C >= 2), float32, bfloat16 or float16 (float64 on the CPU),
            rows contiguous or strided. The only input that gets a gradient.
        target: int64 class indices in [0, C) (N), or target probabilities (N x C, floating
            point; rows need not sum to 1). Never differentiated.
        label_smoothing: in [0, 1].
        mask: N weights (usually 0 or 1) a row's loss is multiplied by; a row whose mask is 0
            has loss and gradient 0 whatever its logits hold (NaN included).
        reduction: "mean" (divides by N: masked rows stay in the divisor, the UDA convention;
            0 for N = 0), "sum" or "none" (the N row losses).

    Returns:
        The loss, float32 (float64 for float64 CPU logits): a 0-dim tensor, or N for "none".
        Its gradient was written by the forward pass, so backward only scales it by
        grad_output, in place (a graph through this op can be backpropagated once).

    Raises:
        ValueError naming the argument: logits not 2-D, not floating point or of fewer than 2
        classes, a target of the wrong shape, dtype or device, class indices outside [0, C)
        (checked on the CPU; on a GPU a check would need a host synchronisation: such a row's
        loss is NaN), a mask of the wrong length, label_smoothing outside [0, 1], an unknown
        reduction.
    """
    _checks.logits_2d("logits", logits)
    n, c = logits.shape
    _checks.reduction(reduction)
    _checks.in_unit_interval("label_smoothing", label_smoothing)
    if not isinstance(target, torch.Tensor):
        raise ValueError(f"target must be a tensor, got {type(target).__name__}")
    if target.dim() == 1:
        _checks.class_indices("target", target, n, c, logits.device)
        index, probs = target, None
    elif target.dim() == 2:
        if tuple(target.shape) != (n, c):
            raise ValueError(f"target probabilities must have the logits' shape {[n, c]}, "
                             f"got {list(target.shape)}")
        if not target.is_floating_point():
            raise ValueError(f"target probabilities must be floating point, got {target.dtype}")
        if target.device != logits.device:
            raise ValueError(f"target is on {target.device} but logits are on {logits.device}")
        index, probs = None, target.detach()
    else:
        raise ValueError(f"target must be class indices (N) or probabilities (N x C), got "
                         f"shape {list(target.shape)}")
    if mask is not None:
        _checks.row_vector("mask", mask, n, logits.device)
        mask = mask.detach()
    compute_grad = torch.is_grad_enabled() and logits.requires_grad
    args = (logits, index, probs, mask, float(label_smoothing), reduction, compute_grad)
    if backend.plain_eager(logits, index, probs, mask):
        return _SoftCrossEntropyEager.apply(*args)
    loss, _ = _soft_cross_entropy_op(*args)
    return loss
