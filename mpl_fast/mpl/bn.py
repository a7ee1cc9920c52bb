"""Forwards that use batch statistics but leave BatchNorm running statistics untouched."""
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
