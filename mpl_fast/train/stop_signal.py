"""SIGTERM as a request to stop at the next step with a checkpoint of that step.

A cluster's preemption or a job's time limit sends SIGTERM and, after a grace period, SIGKILL;
torchrun forwards SIGTERM to every process. Python's default would end the run at once, losing
the steps since the last periodic checkpoint. While a run trains, the first SIGTERM only sets a
flag; the loop reads it between steps, saves last.pt and stops (`Stopped`). A second SIGTERM
ends the process at once, as the default would (a run stuck somewhere can still be stopped).
Under torchrun the replicas must leave at the same step, so they agree on it with one all-reduce
at the steps where the loop already waits for the device (log and checkpoint steps).
"""
import os
import signal
import threading


class Stopped(Exception):
    """The run stopped on SIGTERM after `step`, with its checkpoint `path` holding that step."""

    def __init__(self, step, path):
        super().__init__(f"stopped by SIGTERM at step {step}; {path} holds it")
        self.step, self.path = step, path


class StopSignal:
    """Catches SIGTERM while open (in the main thread; elsewhere it catches nothing)."""

    def __init__(self):
        self.received = self._installed = False
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
            self._installed = True

    def _handle(self, signum, frame):
        if self.received:  # the second one: the default's immediate end
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)
        self.received = True

    def agreed(self, dist, device, synced_step: bool) -> bool:
        """Whether to stop after this step: this process's flag, or under torchrun any replica's,
        read at synced steps alone (every replica calls this at the same steps)."""
        if not dist.enabled:
            return self.received
        if not synced_step:
            return False
        import torch

        flag = torch.tensor(1.0 if self.received else 0.0, device=device)
        return bool(dist.any(flag).item())

    def close(self):
        """The handler from before back (again: a no-op)."""
        if self._installed:
            # None: a handler not set from Python, which cannot be put back: the default then
            previous = signal.SIG_DFL if self._previous is None else self._previous
            signal.signal(signal.SIGTERM, previous)
            self._installed = False
