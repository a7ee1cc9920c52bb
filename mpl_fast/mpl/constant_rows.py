"""A forward of one batch whose last rows are computed without autograd (constant rows).

Why: a BatchNorm teacher's weak view must share the joint batch's statistics (normalised apart it
gets its own, which at CPU scale cost the MPL student 18 points: docs/cifar10.md), but nothing
reads a gradient through its logits; its rows need a backward only for the derivative of the
batch statistics. Under `constant_rows(n)` the network computes exactly what the joint forward
computes (to rounding: the same batch statistics, the same running-statistics update), while its
backward skips the last `n` rows in every convolution, linear layer and BatchNorm (the bulk of the
work); elementwise layers between them still see the whole batch.

The gradient is then that of a forward in which
- a convolution or linear layer computes the constant rows from constants, and
- BatchNorm normalises the other rows with their own statistics and moves the result onto the
  whole batch's by an affine map whose coefficients are constants (the values are those of the
  whole batch's normalisation; the derivative is that of a batch without the constant rows, scaled
  to the whole batch's spread): the gradient through the statistics keeps BatchNorm's invariances
  (shifting or scaling the other rows' activations changes nothing), which cutting the constant
  rows alone would break.
Where the constant rows equal some of the others (the same images), that is exactly the joint
forward's gradient (tested); otherwise it leaves out only how the constant rows' activations move
the statistics.

Layers are recognised by the functions they call (F.conv1d/2d/3d, F.linear, F.batch_norm), so any
network built from torch's layers (WRN, ResNet, timm's CNNs) needs no change; a layer that computes
batch statistics some other way (SyncBatchNorm across processes) is refused by `check_network`.
"""
import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

_ROW_WISE = (F.conv1d, F.conv2d, F.conv3d, F.linear)


def check_network(model: nn.Module, what: str) -> None:
    """ValueError where a layer would compute batch statistics outside F.batch_norm (so the
    constant rows would get their gradient back, or the statistics would differ), or where
    activation checkpointing would recompute a block in backward outside constant_rows."""
    from mpl_fast.models.checkpointing import CheckpointedBlock

    for name, m in model.named_modules():
        if isinstance(m, CheckpointedBlock):
            raise ValueError(f"{what}: not supported with activation checkpointing of that "
                             f"network ({name} is checkpointed: model.checkpoint)")
        if isinstance(m, nn.SyncBatchNorm):
            raise ValueError(f"{what}: SyncBatchNorm ({name}) is not supported: it computes "
                             "its statistics across processes outside F.batch_norm")
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            continue
        if any(b in ("running_mean", "running_var") for b, _ in m.named_buffers(recurse=False)):
            raise ValueError(f"{what}: {name or 'the network'} ({type(m).__name__}) keeps batch "
                             "statistics outside BatchNorm; the weak view's rows cannot be made "
                             "constant in its joint forward")


def _batch_norm(x, running_mean, running_var, weight, bias, momentum, eps, n):
    """Training-mode BatchNorm of x (N, C, ...) whose rows n: are constants (module docstring)."""
    dims = [0] + list(range(2, x.dim()))
    head = x[:n]
    with torch.no_grad():
        wide = x if x.dtype in (torch.float32, torch.float64) else x.float()  # fp32 statistics
        var_all, mean_all = torch.var_mean(wide, dim=dims, correction=0)
        var_head, mean_head = torch.var_mean(wide[:n], dim=dims, correction=0)
        inv_std = torch.rsqrt(var_all + eps)
        scale = torch.sqrt(var_head + eps) * inv_std      # head's own normalisation -> the whole's
        shift = (mean_head - mean_all) * inv_std
        if running_mean is not None and momentum:
            count = x.numel() // x.shape[1]
            running_mean.mul_(1 - momentum).add_(mean_all, alpha=momentum)
            # torch keeps the unbiased variance in the running statistics
            running_var.mul_(1 - momentum).add_(var_all * (count / max(count - 1, 1)),
                                                alpha=momentum)
        tail = F.batch_norm(x[n:], mean_all, var_all, weight, bias, False, 0.0, eps)
    head_weight = scale if weight is None else weight * scale
    head_bias = shift if weight is None else weight * shift
    if bias is not None:
        head_bias = head_bias + bias
    head = F.batch_norm(head, None, None, head_weight, head_bias, True, 0.0, eps)
    return torch.cat([head, tail])


class constant_rows(TorchFunctionMode):
    """Inside, a forward of a batch of `rows` rows computes its last `constant` rows without
    autograd (module docstring). Layers that see another number of rows run as usual."""

    def __init__(self, rows: int, constant: int):
        super().__init__()
        if not 0 <= constant < rows:
            raise ValueError(f"constant_rows: constant must be in [0, rows), got {constant} of "
                             f"{rows}")
        self.rows, self.head = rows, rows - constant

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        x = args[0] if args else kwargs.get("input")
        if self.head == self.rows or not isinstance(x, torch.Tensor) or x.dim() == 0 \
                or x.shape[0] != self.rows:
            return func(*args, **kwargs)
        if func in _ROW_WISE:
            rest = args[1:]
            head = func(x[:self.head], *rest, **kwargs)
            with torch.no_grad():
                tail = func(x[self.head:], *rest, **kwargs)
            return torch.cat([head, tail])
        if func is F.batch_norm:
            bound = _bind_batch_norm(*args, **kwargs)
            if bound["training"]:
                return _batch_norm(x, bound["running_mean"], bound["running_var"],
                                   bound["weight"], bound["bias"], bound["momentum"],
                                   bound["eps"], self.head)
        return func(*args, **kwargs)


def _bind_batch_norm(input, running_mean, running_var, weight=None, bias=None, training=False,
                     momentum=0.1, eps=1e-5):
    return dict(running_mean=running_mean, running_var=running_var, weight=weight, bias=bias,
                training=training, momentum=momentum, eps=eps)
