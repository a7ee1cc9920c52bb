"""Exponential moving average of a model's weights and BatchNorm buffers."""
import copy

import torch
from torch import nn


class ModelEMA(nn.Module):
    """ema <- d * ema + (1 - d) * model, with d = min(decay, (t + 1) / (t + 10)) at update t,
    for parameters and floating-point buffers (BN running statistics); integer buffers copied."""

    def __init__(self, model: nn.Module, decay: float):
        super().__init__()
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.decay = decay
        self.register_buffer("updates", torch.zeros((), dtype=torch.int64))

    @torch.no_grad()
    def update(self, model: nn.Module):
        t = int(self.updates)
        d = min(self.decay, (t + 1) / (t + 10))
        # One foreach launch per kind instead of one per tensor: this runs every step, outside a
        # captured step's graph, and a ResNet has over a hundred BN buffers.
        ema = list(self.module.parameters())
        src = list(model.parameters())  # read under no_grad: no detach (one op a tensor) needed
        ints, int_src = [], []
        for e, b in zip(self.module.buffers(), model.buffers()):
            (ema if e.dtype.is_floating_point else ints).append(e)
            (src if e.dtype.is_floating_point else int_src).append(b)
        torch._foreach_lerp_(ema, src, 1.0 - d)
        if ints:
            torch._foreach_copy_(ints, int_src)
        self.updates += 1

    def forward(self, x):
        return self.module(x)
