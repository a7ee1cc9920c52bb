"""The count of steps skipped for a non-finite loss, kept on the device.

Each step's skip flag (metrics["nonfinite"], mpl_fast.mpl.nonfinite) is added on the device;
the host reads the counts only where it waits for the device anyway (logging, checkpoints), so
counting costs the step no host synchronisation.
"""
import torch


class SkippedSteps:
    def __init__(self, device, total: int = 0, streak: int = 0):
        # [steps skipped in all, the current run of consecutive ones, the longest run since the
        # last read]
        self.counts = torch.tensor([total, streak, streak], dtype=torch.int64, device=device)

    def add(self, skip: torch.Tensor):
        """Count one step whose skip flag (0 or 1, a device scalar) is skip."""
        f = skip.to(torch.int64)
        total, streak, longest = self.counts.unbind()
        streak = (streak + 1) * f
        self.counts.copy_(torch.stack([total + f, streak, torch.maximum(longest, streak)]))

    def state(self):
        """(total, current streak): what a checkpoint keeps (read on the host)."""
        total, streak = (int(v) for v in self.counts[:2].tolist())
        return total, streak

    def read(self):
        """(total, current streak, longest streak since the last read), read on the host."""
        total, streak, longest = (int(v) for v in self.counts.tolist())
        self.counts[2] = streak
        return total, streak, longest
