"""How much of the training loop waits for its data: host time blocked in the stream's next()
(the batch's move to the device included) against the whole loop, evaluations and checkpoint
saves left out. Nothing here synchronises with the GPU: the step's own host waits (its launches
once the queue is full, the loss read-back when logging) fall in the rest of the loop. A share
near 0 means the step sets the pace; near 1, the model may wait on the input pipeline (more
DALI threads, pipelines, or another placement help). On a GPU it is an upper bound: a DALI
pipeline can wait for its own GPU work, queued beside the step's, and with the step one CUDA
graph replay the host blocks there for want of anything else (an H200 CIFAR-10 run: 0.56, at 19.8 ms
a step against the step's 14.6 ms alone)."""
from typing import Optional


class DataWait:
    def __init__(self):
        self._fetch = self._loop = 0.0  # since the last share() call
        self._fetch_all = self._loop_all = 0.0  # this session

    def add(self, fetch_seconds: float, loop_seconds: float):
        """One loop iteration: its seconds waiting for the batch, and in all (eval and saves
        already taken out)."""
        self._fetch += fetch_seconds
        self._loop += loop_seconds
        self._fetch_all += fetch_seconds
        self._loop_all += loop_seconds

    def share(self) -> Optional[float]:
        """The share of loop time spent waiting for data since the last call (None: no
        iteration since), and start a new interval."""
        out = self._fetch / self._loop if self._loop > 0 else None
        self._fetch = self._loop = 0.0
        return out

    def session_share(self) -> Optional[float]:
        return self._fetch_all / self._loop_all if self._loop_all > 0 else None
