"""Reduced MPL: a small teacher over a large teacher's stored predictions.

A large teacher is trained (or loaded) once and its logits on the whole training set are
stored (mpl_fast.data.logit_store). MPL then runs with a `ReducedTeacher` beside the student:
its input is the large teacher's logits for the batch (MPLBatch.teacher_l / teacher_uw /
teacher_us), so only one large network (the student) is in memory. UDA has no second view of
stored logits, so Reduced MPL runs without it.
"""
import torch
from torch import nn


class ReducedTeacher(nn.Module):
    """log_softmax(big / T) + MLP(softmax(big / T)); the MLP's last layer starts at zero, so the
    reduced teacher starts out predicting exactly what the large teacher predicts."""

    def __init__(self, num_classes: int, hidden: int = 128, temperature: float = 1.0):
        super().__init__()
        if num_classes < 2 or hidden < 1 or not temperature > 0:
            raise ValueError("ReducedTeacher needs num_classes >= 2, hidden >= 1, temperature > 0")
        self.temperature = temperature
        self.net = nn.Sequential(nn.Linear(num_classes, hidden), nn.ReLU(),
                                 nn.Linear(hidden, num_classes))
        nn.init.zeros_(self.net[2].weight)
        nn.init.zeros_(self.net[2].bias)

    def forward(self, big_logits: torch.Tensor) -> torch.Tensor:
        dtype = self.net[0].weight.dtype
        logp = torch.log_softmax(big_logits.to(dtype) / self.temperature, dim=1)
        return logp + self.net(logp.exp())
