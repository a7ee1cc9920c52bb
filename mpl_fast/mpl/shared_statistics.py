"""A forward without autograd normalised with another forward's batch statistics.

Why: with a BatchNorm teacher, the weak view's forward apart (mpl.teacher_weak_no_grad=true) is
normalised with that view's own batch statistics, while UDA trains the strong view, normalised
with the labeled + strong batch's, to agree with it; at CPU scale that cost the MPL student 18
points (docs/cifar10.md). `shared` keeps the forward apart (the same work: no backward through
the weak view) but hands its BatchNorm layers the statistics the labeled + strong forward
computed, layer by layer, so both views of an image pass through one normalisation, as they do
in the joint forward (whose statistics also count the weak view).

`SharedStatistics.recorded()` around the forward with autograd keeps each training-mode
F.batch_norm's batch mean and inverse standard deviation (torch's native_batch_norm computes
them with its output: no extra pass, the same values, gradient and running-statistics update as
F.batch_norm); `.applied(model)` around the forward without autograd normalises the n-th
training-mode F.batch_norm of the network with the n-th recorded statistics, leaving the running
statistics and the batch counters alone. Any network built from torch's layers needs no change;
a layer that computes batch statistics some other way (SyncBatchNorm) is refused by
constant_rows.check_network.
"""
import contextlib

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from mpl_fast.mpl.bn import frozen_bn_stats
from mpl_fast.mpl.constant_rows import bind_batch_norm


class SharedStatistics:
    """The batch statistics of one forward, for one forward after it (module docstring)."""

    def __init__(self):
        self.statistics = []  # (mean, invstd) of each training-mode F.batch_norm, in call order

    def recorded(self):
        self.statistics.clear()
        return _Recording(self.statistics)

    @contextlib.contextmanager
    def applied(self, model: nn.Module):
        """The forward of `model` inside normalises with the recorded statistics; its BatchNorm
        layers neither move their running statistics nor count the batch."""
        with frozen_bn_stats(model), _Applying(self.statistics):
            yield


def _training_batch_norm(func, args, kwargs):
    """F.batch_norm's arguments as a dict where the call normalises with batch statistics."""
    if func is not F.batch_norm:
        return None
    a = bind_batch_norm(*args, **kwargs)
    a["input"] = args[0] if args else kwargs["input"]
    return a if a["training"] else None


class _Recording(TorchFunctionMode):
    def __init__(self, statistics):
        super().__init__()
        self.statistics = statistics
        self.open = True  # closed on exit: a checkpointed block's recomputation records nothing

    def __exit__(self, *exc):
        self.open = False
        return super().__exit__(*exc)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        a = _training_batch_norm(func, args, kwargs)
        if a is None:
            return func(*args, **kwargs)
        y, mean, invstd = torch.ops.aten.native_batch_norm(
            a["input"], a["weight"], a["bias"], a["running_mean"], a["running_var"], True,
            a["momentum"], a["eps"])
        if self.open:
            self.statistics.append((mean.detach(), invstd.detach()))
        return y


class _Applying(TorchFunctionMode):
    def __init__(self, statistics):
        super().__init__()
        self.statistics, self.used = statistics, 0

    def __exit__(self, *exc):
        result = super().__exit__(*exc)
        if exc[0] is None and self.used != len(self.statistics):
            raise RuntimeError(f"shared batch statistics: the forward normalised {self.used} "
                               f"times, the recorded one {len(self.statistics)}")
        return result

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        a = _training_batch_norm(func, args, kwargs)
        if a is None:
            return func(*args, **kwargs)
        if self.used >= len(self.statistics):
            raise RuntimeError("shared batch statistics: the forward normalises more often than "
                               f"the recorded one ({len(self.statistics)} times)")
        mean, invstd = self.statistics[self.used]
        self.used += 1
        x = a["input"]
        wide = torch.promote_types(x.dtype, torch.float32)  # bf16 and fp16 as torch's BN: in fp32
        shape = [1, -1] + [1] * (x.dim() - 2)
        scale = invstd if a["weight"] is None else invstd * a["weight"].to(wide)
        y = (x.to(wide) - mean.view(shape)) * scale.view(shape)
        if a["bias"] is not None:
            y = y + a["bias"].to(wide).view(shape)
        return y.to(x.dtype)
