"""Forwards that use batch statistics but leave BatchNorm running statistics untouched, and
whether a network has any."""
import contextlib

from torch import nn


@contextlib.contextmanager
def frozen_bn_stats(model: nn.Module):
    """Inside, training-mode BatchNorm layers normalise with batch statistics as usual but do
    not update running_mean / running_var / num_batches_tracked. MPL's extra student forwards
    (CE_new, the finite-difference forwards) must not count as extra BN updates."""
    layers = [m for m in model.modules()
              if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    for m in layers:
        m.track_running_stats = False
    try:
        yield
    finally:
        for m in layers:
            m.track_running_stats = True


def uses_batch_statistics(model: nn.Module) -> bool:
    """True where a forward's outputs may depend on which other images share its batch, or
    where a forward moves running statistics: any BatchNorm layer (SyncBatchNorm and timm's
    BatchNormAct2d are ones), and, to be safe, any layer holding a running_mean or running_var
    buffer (InstanceNorm tracking them, EvoNorm-B0, frozen BatchNorm). Such a network's images
    cannot be split between forwards without changing what it computes."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) or keeps_running_statistics(m)
               for m in model.modules())


def keeps_running_statistics(module: nn.Module) -> bool:
    """Whether the layer itself (not its children) holds a running_mean or running_var buffer."""
    return any(name in ("running_mean", "running_var")
               for name, _ in module.named_buffers(recurse=False))
