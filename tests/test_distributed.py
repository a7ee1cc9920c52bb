"""mpl_fast.train.distributed under torchrun (gloo on CPU processes)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_train import _run_ok

# What a torchrun command does with its process group: init, a DDP-wrapped network (its
# constructor imports torch._dynamo), an all-reduce, shutdown; then the names of the threads left.
SCRIPT = r"""
import os, sys
import torch
assert "torch._dynamo" not in sys.modules  # as in `mpl-fast logits` and `eval`
from mpl_fast.train import distributed
ctx = distributed.init("cpu")
net = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(3, 2))
net(torch.randn(4, 3)).sum().backward()
total = ctx.sum(torch.ones(()))
del net
distributed.shutdown()
threads = sorted(open(f"/proc/self/task/{t}/comm").read().strip()
                 for t in os.listdir("/proc/self/task"))
# one write a line: print's separate newline may land after the other rank's line
sys.stdout.write(f"rank {ctx.rank} total {float(total):g} threads {','.join(threads)}\n")
"""


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads Linux's /proc")
def test_shutdown_ends_the_gloo_groups_threads(tmp_path):
    """A gloo group that outlived destroy_process_group left its threads running into
    interpreter exit, where one of them now and then aborted a finished `mpl-fast logits` or
    `eval` (SIGABRT, 'terminate called without an active exception'): after shutdown() no
    gloo thread is left."""
    script = tmp_path / "group.py"
    script.write_text(SCRIPT)
    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]))
    done = _run_ok([sys.executable, "-m", "torch.distributed.run", "--standalone",
                    "--nproc_per_node=2", str(script)], env)
    lines = sorted(line for line in done.stdout.splitlines() if line.startswith("rank "))
    assert [line.split(" threads ")[0] for line in lines] == ["rank 0 total 2", "rank 1 total 2"]
    for line in lines:
        threads = line.split(" threads ")[1].split(",")
        assert not [t for t in threads if "gloo" in t], line
