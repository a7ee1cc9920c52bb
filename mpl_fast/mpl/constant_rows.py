"""A forward of one batch whose last rows are computed without autograd (constant rows).

Why: a BatchNorm teacher's weak view must share the joint batch's statistics (normalised apart it
gets its own, which at CPU scale cost the MPL student 18 points: docs/cifar10.md), but nothing
reads a gradient through its logits; its rows need a backward only for the derivative of the
batch statistics. Under `constant_rows(rows, n)` a network computes exactly what the joint forward
computes (the same kernels: one convolution, linear layer and BatchNorm of the whole batch each,
the same batch statistics and running-statistics update; a convolution with padding='same' or
'valid' runs as two halves joined), while its backward skips the last `n` rows in every
convolution, linear layer and BatchNorm (the bulk of the work): each hands back zeros for them,
so elementwise layers between them still see the whole batch.

The gradient is then that of a forward in which
- a convolution or linear layer computes the constant rows from constants, and
- BatchNorm normalises the other rows with their own statistics and moves the result onto the
  whole batch's by an affine map whose coefficients are constants (the values are those of the
  whole batch's normalisation; the derivative is that of a batch without the constant rows, scaled
  to the whole batch's spread): the gradient through the statistics keeps BatchNorm's invariances
  (shifting or scaling the other rows' activations changes nothing), which cutting the constant
  rows alone would break.
Where the constant rows repeat the others (the same images, each once), that is exactly the joint
forward's gradient (tested); otherwise it leaves out only how the constant rows' activations move
the statistics.

Layers are recognised by the functions they call (F.conv1d/2d/3d, F.linear, F.batch_norm) on a
tensor whose first dimension is the batch's `rows`, so any network built from torch's layers
(WRN, ResNet, timm's CNNs) needs no change, compiled or not; a layer that computes batch
statistics some other way (SyncBatchNorm across processes) is refused by `check_network`.
"""
import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from mpl_fast.mpl.bn import keeps_running_statistics

_CONVS = (F.conv1d, F.conv2d, F.conv3d)


def check_network(model: nn.Module, what: str) -> None:
    """ValueError where a layer would compute batch statistics outside F.batch_norm (so the
    constant rows would get their gradient back, or the statistics would differ; for
    shared_statistics, the weak view would be normalised with its own). Checkpointed blocks
    (mpl_fast.models.checkpointing) recompute under the mode the forward ran under."""
    for name, m in model.named_modules():
        if isinstance(m, nn.SyncBatchNorm):
            raise ValueError(f"{what}: SyncBatchNorm ({name}) is not supported: it computes "
                             "its statistics across processes outside F.batch_norm")
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            continue
        if keeps_running_statistics(m):
            raise ValueError(f"{what}: {name or 'the network'} ({type(m).__name__}) keeps batch "
                             "statistics outside BatchNorm, out of this setting's reach")


def _with_zero_tail(grad_head, like):
    """A gradient for all rows of `like` from the rows before its constant tail: zeros there (a
    layer that is not recognised, a layer scale say, then gets nothing from those rows)."""
    n = grad_head.shape[0]
    grad = torch.empty_like(like, dtype=grad_head.dtype)  # like's memory format (channels_last)
    grad[:n].copy_(grad_head)
    grad[n:].zero_()
    return grad


class _Conv(torch.autograd.Function):
    """A convolution of the whole batch whose backward sees only its first `head` rows."""

    @staticmethod
    def forward(ctx, x, weight, bias, head, stride, padding, dilation, groups):
        ctx.save_for_backward(x, weight)
        ctx.head, ctx.geometry = head, (stride, padding, dilation, groups)
        ctx.bias_sizes = None if bias is None else list(bias.shape)
        return torch.ops.aten.convolution(x, weight, bias, stride, padding, dilation, False,
                                          [0] * len(stride), groups)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.geometry
        n = ctx.head
        wanted = [ctx.needs_input_grad[0], ctx.needs_input_grad[1],
                  ctx.bias_sizes is not None and ctx.needs_input_grad[2]]
        gx, gw, gb = torch.ops.aten.convolution_backward(
            grad[:n], x[:n], weight, ctx.bias_sizes, stride, padding, dilation, False,
            [0] * len(stride), groups, wanted)
        if gx is not None:
            gx = _with_zero_tail(gx, x)
        return gx, gw, gb, None, None, None, None, None


class _Linear(torch.autograd.Function):
    """A linear layer of the whole batch whose backward sees only its first `head` rows."""

    @staticmethod
    def forward(ctx, x, weight, bias, head):
        ctx.save_for_backward(x, weight)
        ctx.head, ctx.has_bias = head, bias is not None
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        n = ctx.head
        g = grad[:n].reshape(-1, grad.shape[-1])
        gx = _with_zero_tail(grad[:n].matmul(weight), x) if ctx.needs_input_grad[0] else None
        gw = g.t().matmul(x[:n].reshape(-1, x.shape[-1])) if ctx.needs_input_grad[1] else None
        gb = g.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return gx, gw, gb, None


class _BatchNorm(torch.autograd.Function):
    """Training-mode BatchNorm of the whole batch (torch's own kernel: its values and its
    running-statistics update) whose backward sees only the first `head` rows, differentiating
    the statistics as theirs alone (module docstring): torch's BatchNorm backward of those rows
    with their own statistics and the weight scaled by their spread over the whole batch's."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, momentum, eps, head):
        y, mean, invstd = torch.ops.aten.native_batch_norm(x, weight, bias, running_mean,
                                                           running_var, True, momentum, eps)
        ctx.save_for_backward(x, weight, mean, invstd)
        ctx.head, ctx.eps, ctx.has_bias = head, eps, bias is not None
        return y

    @staticmethod
    def backward(ctx, grad):
        x, weight, mean, invstd = ctx.saved_tensors
        n, eps = ctx.head, ctx.eps
        x_head = x[:n]
        if x.is_cuda:  # the statistics kernel torch's SyncBatchNorm uses (fp32 results)
            mean_head, invstd_head = torch.batch_norm_stats(x_head, eps)
        else:  # the CPU's statistics kernel (mean, biased variance; 5x var_mean's speed)
            wide = x_head if x.dtype in (torch.float32, torch.float64) else x_head.float()
            mean_head, var_head = torch.batch_norm_update_stats(wide, None, None, 0.0)
            invstd_head = torch.rsqrt(var_head + eps)
        scale = invstd / invstd_head                       # the head's spread over the whole's
        shift = (mean_head - mean) * invstd
        affine = weight is not None and ctx.needs_input_grad[1]
        gx, gw, gb = torch.ops.aten.native_batch_norm_backward(
            grad[:n], x_head, scale if weight is None else weight * scale, None, None, mean_head,
            invstd_head, True, eps,
            [ctx.needs_input_grad[0], affine, affine or (ctx.has_bias and ctx.needs_input_grad[2])])
        if gx is not None:
            gx = _with_zero_tail(gx, x)
        if affine:  # d/dweight of weight * (the head's normalisation * scale + shift)
            gw = gw * scale + gb * shift
        if not (ctx.has_bias and ctx.needs_input_grad[2]):
            gb = None
        return gx, gw, gb, None, None, None, None, None


def _tuple(value, dims):
    return list(value) if isinstance(value, (tuple, list)) else [value] * dims


class constant_rows(TorchFunctionMode):
    """Inside, a forward of a batch of `rows` rows computes its last `constant` rows without
    autograd (module docstring). Layers that see another number of rows, and forwards without
    autograd, run as usual."""

    def __init__(self, rows: int, constant: int):
        super().__init__()
        if not 0 <= constant < rows:
            raise ValueError(f"constant_rows: constant must be in [0, rows), got {constant} of "
                             f"{rows}")
        self.rows, self.head = rows, rows - constant

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        x = args[0] if args else kwargs.get("input")
        if self.head == self.rows or not torch.is_grad_enabled() \
                or not isinstance(x, torch.Tensor) or x.dim() == 0 or x.shape[0] != self.rows:
            return func(*args, **kwargs)
        if func in _CONVS:
            a = _bind_conv(*args, **kwargs)
            if not isinstance(a["padding"], str):  # 'same' / 'valid': as a split batch below
                dims = x.dim() - 2
                return _autocast(_Conv.apply, x, a["weight"], a["bias"], self.head,
                                 _tuple(a["stride"], dims), _tuple(a["padding"], dims),
                                 _tuple(a["dilation"], dims), a["groups"])
            return self._split(func, x, args[1:], kwargs)
        if func is F.linear:
            a = _bind_linear(*args, **kwargs)
            return _autocast(_Linear.apply, x, a["weight"], a["bias"], self.head)
        if func is F.batch_norm:
            a = bind_batch_norm(*args, **kwargs)
            if a["training"]:
                return _BatchNorm.apply(x, a["weight"], a["bias"], a["running_mean"],
                                        a["running_var"], a["momentum"], a["eps"], self.head)
        return func(*args, **kwargs)

    def _split(self, func, x, rest, kwargs):
        head = func(x[:self.head], *rest, **kwargs)
        with torch.no_grad():
            tail = func(x[self.head:], *rest, **kwargs)
        return torch.cat([head, tail])


def _autocast(apply, x, weight, bias, *rest):
    """apply(x, weight, bias, ...) in autocast's dtype where autocast is on, as torch's own
    convolution and linear layer run there: the casts outside the function, so that autograd
    takes the gradients back to the parameters' dtype."""
    device = x.device.type
    if not torch.is_autocast_enabled(device):
        return apply(x, weight, bias, *rest)
    dtype = torch.get_autocast_dtype(device)
    cast = lambda t: t if t is None else t.to(dtype)  # noqa: E731
    with torch.autocast(device, enabled=False):
        return apply(cast(x), cast(weight), cast(bias), *rest)


def _bind_conv(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    return dict(weight=weight, bias=bias, stride=stride, padding=padding, dilation=dilation,
                groups=groups)


def _bind_linear(input, weight, bias=None):
    return dict(weight=weight, bias=bias)


def bind_batch_norm(input, running_mean, running_var, weight=None, bias=None, training=False,
                    momentum=0.1, eps=1e-5):
    """F.batch_norm's arguments but its input, by name (also for shared_statistics)."""
    return dict(running_mean=running_mean, running_var=running_var, weight=weight, bias=bias,
                training=training, momentum=momentum, eps=eps)
