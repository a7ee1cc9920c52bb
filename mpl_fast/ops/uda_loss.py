"""uda_loss: UDA consistency. Targets q = softmax(weak / T) without gradient; rows whose
max q is under threshold are masked (kept in the mean's divisor); soft cross-entropy of the
strong logits against q. Returns (loss, mask)."""
import torch

from mpl_fast.ops import _checks, backend
from mpl_fast.ops._checks import compute_dtype as _compute_dtype
from mpl_fast.ops.scale_rows import scaled_gradient
from mpl_fast.ops.soft_cross_entropy import reduce_rows, reduced_shape, reduction_scale


def uda_loss_torch(weak, strong, temperature, threshold, compute_grad, grad_scale=1.0):
    q = torch.softmax(weak.to(_compute_dtype(weak)) / temperature, dim=1)
    mask = (q.max(dim=1).values >= threshold).to(q.dtype)
    logp = torch.log_softmax(strong.to(_compute_dtype(strong)), dim=1)
    loss = -torch.where(q != 0, q * logp, torch.zeros_like(logp)).sum(1)
    loss = torch.where(mask != 0, loss, torch.zeros_like(loss))
    grad = strong.new_empty(0)
    if compute_grad:  # 0 in a masked row, whatever its strong logits hold (NaN included)
        grad = torch.where(mask[:, None] != 0, (logp.exp() - q) * (mask * grad_scale)[:, None],
                           torch.zeros_like(logp)).to(strong.dtype)
    return loss, mask, grad


def _uda_loss_impl(logits_weak, logits_strong, temperature, threshold, reduction, compute_grad):
    """(reduced loss, mask, gradient buffer): the body of the op, whichever way it is called."""
    scale = reduction_scale(logits_strong.shape[0], reduction)
    if backend.loss_backend(logits_strong) == "triton":
        from mpl_fast.kernels.uda_loss import uda_loss_forward

        rows, mask, grad = uda_loss_forward(logits_weak, logits_strong, temperature, threshold,
                                            compute_grad, scale)
    else:
        rows, mask, grad = uda_loss_torch(logits_weak, logits_strong, temperature, threshold,
                                          compute_grad, scale)
    return reduce_rows(rows, reduction), mask, grad


@torch.library.custom_op("mpl_fast::uda_loss", mutates_args=())
def _uda_loss_op(logits_weak: torch.Tensor, logits_strong: torch.Tensor, temperature: float,
                 threshold: float, reduction: str, compute_grad: bool
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _uda_loss_impl(logits_weak, logits_strong, temperature, threshold, reduction,
                          compute_grad)


@_uda_loss_op.register_fake
def _(logits_weak, logits_strong, temperature, threshold, reduction, compute_grad):
    n = logits_strong.shape[0]
    dtype = _compute_dtype(logits_strong)
    loss = logits_strong.new_empty(reduced_shape(n, reduction), dtype=dtype)
    grad = torch.empty_like(logits_strong) if compute_grad else logits_strong.new_empty(0)
    return loss, logits_strong.new_empty(n, dtype=dtype), grad


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(output[2])
    ctx.has_grad = inputs[5]
    # the mask's and the gradient buffer's grads are never used: not filled with zeros (an
    # N x C fill for the buffer)
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_loss, _grad_mask, _grad_grad):
    (grad,) = ctx.saved_tensors
    if grad_loss is None:  # only the mask was used
        return None, None, None, None, None, None
    if not ctx.has_grad:
        raise RuntimeError("uda_loss was called without a gradient; call it with grad enabled "
                           "and logits_strong requiring grad")
    return None, scaled_gradient(grad, grad_loss), None, None, None, None


_uda_loss_op.register_autograd(_backward, setup_context=_setup_context)


class _UdaLossEager(torch.autograd.Function):
    """The same forward and backward without the dispatcher (see backend.plain_eager)."""

    @staticmethod
    def forward(ctx, *inputs):
        loss, mask, _ = output = _uda_loss_impl(*inputs)
        _setup_context(ctx, inputs, output)
        ctx.mark_non_differentiable(mask)
        return loss, mask

    @staticmethod
    def backward(ctx, grad_loss, _grad_mask):
        return _backward(ctx, grad_loss, None, None)


def uda_loss(logits_weak: torch.Tensor, logits_strong: torch.Tensor, temperature: float = 1.0,
             threshold: float = 0.0, reduction: str = "mean"):
    """UDA's consistency loss: the soft cross-entropy of the strong view's logits against the
    weak view's softmax at a temperature, on the rows where that softmax is confident; each
    row of both views is read once.

    Args:
        logits_weak: N x C, the targets' logits: softmax(logits_weak / temperature), no
            gradient.
        logits_strong: N x C, same shape and device; the only input that gets a gradient.
            Either may be float32, bfloat16 or float16 (float64 on the CPU), rows strided.
        temperature: finite, > 0.
        threshold: a row counts where the targets' max probability >= threshold.
        reduction: "mean" (divides by N: masked rows stay in the divisor, as the UDA code
            does; 0 for N = 0), "sum" or "none" (the N row losses).

    Returns:
        (loss, mask): the loss, float32 (float64 for float64 CPU logits), 0-dim or N for
        "none"; mask, the N rows kept (float, 1 or 0). As with soft_cross_entropy, the
        gradient is computed in the forward pass and backward scales it in place.

    Raises:
        ValueError naming the argument: logits not 2-D, not floating point or of fewer than 2
        classes, the two of different shapes or devices, a temperature not finite
        and > 0, a NaN threshold, an unknown reduction.
    """
    _checks.logits_2d("logits_weak", logits_weak)
    _checks.logits_2d("logits_strong", logits_strong)
    if logits_weak.shape != logits_strong.shape:
        raise ValueError(f"logits_weak {list(logits_weak.shape)} and logits_strong "
                         f"{list(logits_strong.shape)} must have the same shape")
    if logits_weak.device != logits_strong.device:
        raise ValueError(f"logits_weak is on {logits_weak.device} but logits_strong is on "
                         f"{logits_strong.device}")
    _checks.positive("temperature", temperature)
    _checks.a_number("threshold", threshold)
    _checks.reduction(reduction)
    compute_grad = torch.is_grad_enabled() and logits_strong.requires_grad
    args = (logits_weak.detach(), logits_strong, float(temperature), float(threshold), reduction,
            compute_grad)
    if backend.plain_eager(logits_weak, logits_strong):
        return _UdaLossEager.apply(*args)
    loss, mask, _ = _uda_loss_op(*args)
    return loss, mask.detach()
