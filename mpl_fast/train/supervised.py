"""A supervised step (labels only): the `supervised` method, and the finetune phase."""
import contextlib

import torch
from torch import nn

from mpl_fast import ops
from mpl_fast.mpl.step import as_metric


class SupervisedStep:
    def __init__(self, model: nn.Module, opt: torch.optim.Optimizer, label_smoothing=0.0,
                 autocast_dtype=None):
        self.model, self.opt = model, opt
        self.label_smoothing = label_smoothing
        self.autocast_dtype = autocast_dtype
        self.finite_check = None

    def __call__(self, batch, step=0):
        x, y = batch.x_l, batch.y_l
        ctx = (torch.autocast(x.device.type, dtype=self.autocast_dtype)
               if self.autocast_dtype else contextlib.nullcontext())
        with ctx:
            logits = self.model(x)
        loss = ops.soft_cross_entropy(logits, y, label_smoothing=self.label_smoothing)
        if self.finite_check is not None:
            self.finite_check(loss)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        return {"student/loss": loss.detach(),
                "lr/student": as_metric(self.opt.param_groups[0]["lr"])}
