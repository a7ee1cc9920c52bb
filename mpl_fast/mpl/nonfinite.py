"""Skipping an optimizer step whose loss is not finite, decided on the device.

torch's fused optimizers read `optimizer.found_inf`, the flag torch.amp.GradScaler sets, and
leave the parameters and their state (momentum) as they were where it is nonzero. A flag
computed from the losses on the device therefore skips a bad step without the host ever reading
a loss: no host synchronisation, so the same step runs eagerly ahead of the GPU and inside a
CUDA graph.
"""
from typing import Callable, Optional

import torch


def flag(*losses: torch.Tensor, any_replica: Optional[Callable] = None) -> torch.Tensor:
    """1.0 (float32, 0-dim, on the losses' device) where any of the losses holds a NaN or an
    infinity, else 0.0. any_replica (data parallelism): the flag every replica acts on, set where
    any replica's is (a replica whose losses are finite still gets the averaged, non-finite
    gradient of one whose losses are not)."""
    # one tensor of every entry first: a few launches whatever the number of losses
    every = torch.cat([loss.detach().reshape(-1).float() for loss in losses])
    skip = torch.logical_not(torch.isfinite(every).all()).float()
    return skip if any_replica is None else any_replica(skip)


def supports_skipping(optimizer: torch.optim.Optimizer) -> bool:
    """Whether optimizer.step() honours found_inf (torch's fused optimizers, fused=True)."""
    return bool(getattr(optimizer, "_step_supports_amp_scaling", False))


def step_unless(optimizer: torch.optim.Optimizer, skip: Optional[torch.Tensor]):
    """optimizer.step(), leaving parameters and optimizer state untouched where skip is 1.

    skip None: a plain step. Raises ValueError for an optimizer that cannot skip on the device.
    """
    if skip is None:
        optimizer.step()
        return
    if not supports_skipping(optimizer):
        raise ValueError(f"skipping non-finite steps on the device needs a fused optimizer "
                         f"(fused=True), got {type(optimizer).__name__} without it")
    if isinstance(optimizer, torch.optim.SGD):
        _zero_new_momentum(optimizer)
    optimizer.found_inf = skip
    try:
        optimizer.step()
    finally:
        del optimizer.found_inf  # as GradScaler does: a later step() is not skipped by it


def _zero_new_momentum(optimizer: torch.optim.SGD):
    """Fused SGD's first step fills new momentum buffers (torch.empty_like) from the gradients:
    skipped, it would leave them uninitialised for every later step. Zeros instead give the same
    first step where there is no dampening (buffer = momentum * 0 + gradient)."""
    for group in optimizer.param_groups:
        if group["momentum"] == 0:
            continue
        for p in group["params"]:
            state = optimizer.state[p]
            if p.grad is None or state.get("momentum_buffer") is not None:
                continue
            if group["dampening"] != 0:
                raise ValueError("skipping non-finite steps on the device needs SGD without "
                                 "dampening (its first step cannot start from zero momentum)")
            state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)


class RunningStats:
    """A network's BatchNorm running statistics (and batch counts) as they were before a step's
    forwards, put back where the step is skipped: a batch whose losses are not finite often has
    non-finite activations too, which would stay in the running statistics (and every later
    evaluation) for good. A few launches a step whatever the number of layers: per kind (the
    float statistics, the int64 counts) one concatenation to keep, one to compare and one
    multi-tensor copy back."""

    def __init__(self, network: torch.nn.Module):
        norms = [m for m in network.modules()
                 if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
        kinds = ([b for m in norms for b in (m.running_mean, m.running_var) if b is not None],
                 [m.num_batches_tracked for m in norms if m.num_batches_tracked is not None])
        self.kinds = [buffers for buffers in kinds if buffers]
        self.before = [self._flat(buffers) for buffers in self.kinds]

    @staticmethod
    def _flat(buffers) -> torch.Tensor:
        return torch.cat([b.detach().reshape(-1) for b in buffers])

    def restore_where(self, skip: torch.Tensor):
        """Back to the kept values where skip is 1 (no host read); as they are where it is 0."""
        for buffers, before in zip(self.kinds, self.before):
            kept = torch.where(skip > 0, before, self._flat(buffers))
            torch._foreach_copy_(buffers, [part.view_as(b) for part, b in
                                           zip(kept.split([b.numel() for b in buffers]),
                                               buffers)])
