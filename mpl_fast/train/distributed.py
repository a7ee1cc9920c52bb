"""Data parallelism through torch.distributed: launched by torchrun (which sets RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT), NCCL on GPUs, gloo on CPUs."""
import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class Context:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    def barrier(self):
        if self.enabled:
            dist.barrier()

    def _all_reduced(self, t: torch.Tensor, op) -> torch.Tensor:
        """An all-reduce of a copy of t (t itself with one replica); no host synchronisation."""
        if not self.enabled:
            return t
        t = t.detach().clone()
        dist.all_reduce(t, op=op)
        return t

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        """The sum of t over replicas."""
        return self._all_reduced(t, dist.ReduceOp.SUM)

    def any(self, flag: torch.Tensor) -> torch.Tensor:
        """1 where any replica's flag (0 or 1) is 1."""
        return self._all_reduced(flag, dist.ReduceOp.MAX)

    def broadcast_buffers(self, module: torch.nn.Module):
        """Rank 0's buffers (BatchNorm statistics) into every replica's module: without
        SyncBatchNorm each replica's statistics follow its own slice of the batch (DDP sends rank
        0's at each forward, then the forward updates them locally)."""
        if self.enabled:
            for b in module.buffers():
                dist.broadcast(b, src=0)

    def mean(self, t: torch.Tensor) -> torch.Tensor:
        """The average of t over replicas (an all-reduce; no host synchronisation)."""
        return self.sum(t) / self.world if self.enabled else t


# The process group this process started, kept from destruction until the process ends. A gloo
# worker thread drops a finished collective's tensors under the group's lock, and a tensor Python
# also holds needs the GIL for that; so the group's destructor, run with the GIL held (by the
# last reference to it going, e.g. DDP's reducer), could wait on that lock forever (seen: `eval`
# under torchrun hung so), and a worker still dropping one at interpreter exit aborted the
# process ("terminate called without an active exception", SIGABRT; seen now and then after
# train, eval and logits had done their work).
_started = []


def init(device_type: str) -> Context:
    """The run's place among torchrun's processes (one process: Context()). ValueError where a
    process would have no GPU of its own: more processes on this node than it shows GPUs (CUDA's
    "invalid device ordinal" traceback a rank otherwise), checked before any rendezvous."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Context()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    gpus = torch.cuda.device_count()
    if device_type == "cuda" and local_rank >= gpus:
        raise ValueError(f"local rank {local_rank} has no GPU of its own: this node shows {gpus} "
                         f"(torchrun --nproc_per_node={gpus} at most, or check "
                         "CUDA_VISIBLE_DEVICES)")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
        _started.append(dist.group.WORLD)
    return Context(dist.get_rank(), dist.get_world_size(), local_rank)


def shutdown():
    """Destroy the process group (NCCL's communicators are closed cleanly); its object lives on
    until end_process."""
    if dist.is_initialized():
        dist.destroy_process_group()


def started() -> bool:
    """Whether this process started a process group (see end_process)."""
    return bool(_started)


def end_process(code: int):
    """End a process that started a process group: stdout and stderr flushed, then os._exit
    without the interpreter's teardown (see _started), once the command's files are closed."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
