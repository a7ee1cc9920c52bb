"""Exponential moving average of a model's weights and BatchNorm buffers, updated on the device
(no host value in it, so it runs inside the step's CUDA graph), and the step it follows."""
from typing import Optional

import torch
from torch import nn

from mpl_fast.models.compiling import eager_copy


class ModelEMA(nn.Module):
    """ema <- d * ema + (1 - d) * model, with d = min(decay, (t + 1) / (t + 10)) at update t,
    for parameters and floating-point buffers (BN running statistics); integer buffers copied.
    A skipped step (skip 1, a device scalar) changes nothing, its count included."""

    def __init__(self, model: nn.Module, decay: float):
        super().__init__()
        # a model compiled in place (model.compile) would have its copy run the model itself
        self.module = eager_copy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.decay = decay
        device = next(iter(model.parameters()), torch.empty(0)).device
        # on the model's device: the decay is computed there, without a host read
        self.register_buffer("updates", torch.zeros((), dtype=torch.int64, device=device))

    @torch.no_grad()
    def update(self, model: nn.Module, skip: Optional[torch.Tensor] = None):
        # 1 - d = max(1 - decay, 9 / (t + 10)), computed on the device
        weight = (self.updates.float() + 10.0).reciprocal().mul_(9.0).clamp_(min=1.0 - self.decay)
        if skip is not None:
            weight.mul_(1.0 - skip)
        # One foreach launch per kind instead of one per tensor (a ResNet has over a hundred BN
        # buffers). foreach lerp takes its weight as a host number: ema += weight * (model - ema)
        ema = list(self.module.parameters())
        src = list(model.parameters())  # read under no_grad: no detach (one op a tensor) needed
        ints, int_src = [], []
        for e, b in zip(self.module.buffers(), model.buffers()):
            (ema if e.dtype.is_floating_point else ints).append(e)
            (src if e.dtype.is_floating_point else int_src).append(b)
        step = torch._foreach_sub(src, ema)
        torch._foreach_mul_(step, weight)
        torch._foreach_add_(ema, step)
        if ints:  # a skipped step has put the model's back as they were (nonfinite.RunningStats)
            torch._foreach_copy_(ints, int_src)
        self.updates += 1 if skip is None else (1 - skip).to(torch.int64)

    def forward(self, x):
        return self.module(x)


class StepWithEMA:
    """The trainer's step: the method's step, then the EMA of its student, not updated where the
    step was skipped (metrics["nonfinite"]). One callable, so a CUDA graph captures both."""

    def __init__(self, step_fn, ema: ModelEMA, student: nn.Module):
        self.step_fn, self.ema, self.student = step_fn, ema, student

    def __call__(self, batch, step: int):
        metrics = self.step_fn(batch, step)
        self.ema.update(self.student, metrics.get("nonfinite"))
        return metrics

    # what mpl_fast.train.graphed.GraphedStep asks of the step it captures: the method's step's
    @property
    def prepare_replay(self):
        return getattr(self.step_fn, "prepare_replay", None)

    @property
    def generator(self):
        return getattr(self.step_fn, "generator", None)
