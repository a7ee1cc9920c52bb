"""A training step captured once in a CUDA graph and replayed (`train.cuda_graph`).

Every step of MPL launches thousands of small kernels; replaying them as one graph removes the
host's launch cost. What a graph needs, and where it comes from here:
- fixed input addresses: each batch is copied into static buffers allocated at capture;
- no host values baked in: learning rates are device tensors the schedulers fill in place
  (`optim.sgd(..., lr=tensor)`), and the step's own host-side schedule values (the UDA ramp) are
  written into device scalars before each replay (`step_fn.prepare_replay(step)`); the EMA's
  decay is computed on the device (mpl_fast.train.ema);
- no host synchronisation inside the step: a step whose losses are not finite is skipped by
  a flag on the device (mpl_fast.mpl.nonfinite), so a graphed run skips it as a plain run does;
- warm-up: the first steps run eagerly on a side stream (lazy allocations, autotuning), as
  torch.cuda.graph requires.
`emulate=True` runs the same static-buffer path without a graph (on any device), so everything
except the capture itself is tested on a CPU: each "replay" gets the step argument the capture
got, as a real replay would, so a host value derived from it that prepare_replay does not move on
shows there too.
"""
import dataclasses
from typing import Callable, Dict

import torch


WARMUP_STEPS = 3  # eager steps before the capture


class BatchShapeChanged(ValueError):
    """A batch whose shape differs from the one the graph was captured with."""


class GraphedStep:
    def __init__(self, step_fn: Callable, warmup_steps: int = WARMUP_STEPS,
                 emulate: bool = False):
        self.step_fn, self.warmup_steps, self.emulate = step_fn, warmup_steps, emulate
        self.calls = 0
        self.static_batch = None
        self.static_out: Dict[str, torch.Tensor] = None
        self.graph = None
        self.capture_step = None  # emulate: the step argument the "capture" saw

    def _prepare(self, step):
        prepare = getattr(self.step_fn, "prepare_replay", None)
        if prepare is not None:
            prepare(step)

    def _copy_in(self, batch):
        if self.static_batch is None:
            self.static_batch = dataclasses.replace(batch, **{
                f.name: getattr(batch, f.name).clone() for f in dataclasses.fields(batch)
                if isinstance(getattr(batch, f.name), torch.Tensor)})
            return
        for f in dataclasses.fields(batch):
            src, dst = getattr(batch, f.name), getattr(self.static_batch, f.name)
            if isinstance(src, torch.Tensor):
                if src.shape != dst.shape:
                    raise BatchShapeChanged(
                        f"train.cuda_graph needs batches of one shape: {f.name} was "
                        f"{list(dst.shape)} at capture, now {list(src.shape)}")
                dst.copy_(src, non_blocking=True)

    def __call__(self, batch, step: int):
        self._prepare(step)
        self.calls += 1
        if self.calls <= self.warmup_steps:
            if self.emulate:
                return self.step_fn(batch, step)
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                out = self.step_fn(batch, step)
            torch.cuda.current_stream().wait_stream(side)
            return out
        self._copy_in(batch)
        if self.emulate:
            # A replay runs what the capture recorded, host values of its step argument included
            # (only prepare_replay's device scalars move on), and its outputs are overwritten by
            # every replay: emulate both.
            if self.capture_step is None:
                self.capture_step = step
            out = self.step_fn(self.static_batch, self.capture_step)
            if self.static_out is None:
                self.static_out = {k: v.clone() for k, v in out.items()}
            for k, v in out.items():
                self.static_out[k].copy_(v)
            return dict(self.static_out)
        if self.graph is None:
            self.graph = torch.cuda.CUDAGraph()
            gen = getattr(self.step_fn, "generator", None)
            if gen is not None and gen.device.type == "cuda":
                self.graph.register_generator_state(gen)
            with torch.cuda.graph(self.graph):
                self.static_out = self.step_fn(self.static_batch, step)
        self.graph.replay()
        return dict(self.static_out)  # the tensors are overwritten by the next replay
