"""A supervised step (labels only): the `supervised` method, and the finetune phase."""
import contextlib

import torch
from torch import nn

from mpl_fast import ops
from mpl_fast.mpl import nonfinite
from mpl_fast.mpl.step import as_metric


class SupervisedStep:
    def __init__(self, model: nn.Module, opt: torch.optim.Optimizer, label_smoothing=0.0,
                 autocast_dtype=None):
        self.model, self.opt = model, opt
        self.label_smoothing = label_smoothing
        self.autocast_dtype = autocast_dtype
        # as MPLStep's: skip a non-finite step on the device (metrics["nonfinite"]), all replicas
        # together under DDP
        self.skip_nonfinite = False
        self.cross_replica_any = None

    def __call__(self, batch, step=0):
        x, y = batch.x_l, batch.y_l
        ctx = (torch.autocast(x.device.type, dtype=self.autocast_dtype)
               if self.autocast_dtype else contextlib.nullcontext())
        kept_stats = nonfinite.RunningStats(self.model) if self.skip_nonfinite else None
        with ctx:
            logits = self.model(x)
        loss = ops.soft_cross_entropy(logits, y, label_smoothing=self.label_smoothing)
        skip = (nonfinite.flag(loss, any_replica=self.cross_replica_any)
                if self.skip_nonfinite else None)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if skip is not None:  # after the backward, which saved the running statistics
            kept_stats.restore_where(skip)
        nonfinite.step_unless(self.opt, skip)
        metrics = {"student/loss": loss.detach(),
                   "lr/student": as_metric(self.opt.param_groups[0]["lr"])}
        if skip is not None:
            metrics["nonfinite"] = skip
        return metrics
