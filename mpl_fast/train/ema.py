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
        ema_p = list(self.module.parameters())
        src_p = [p.detach() for p in model.parameters()]
        torch._foreach_lerp_(ema_p, src_p, 1.0 - d)
        for e, s in zip(self.module.buffers(), model.buffers()):
            if e.dtype.is_floating_point:
                e.lerp_(s, 1.0 - d)
            else:
                e.copy_(s)
        self.updates += 1

    def forward(self, x):
        return self.module(x)
