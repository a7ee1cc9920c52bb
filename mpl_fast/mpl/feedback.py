"""Teacher feedback from the student's change: the estimators of MPL's meta-gradient.

All return tensors and never synchronise with the device.
"""
from typing import List, Optional

import torch
from torch import nn

from mpl_fast import ops


class MovingBaseline(nn.Module):
    """b <- b - (1 - decay)(b - h); returns h - b (a control variate for the score function).

    The baseline starts at 0 and lives in the state dict, so checkpoints carry it.
    """

    def __init__(self, decay: float):
        super().__init__()
        self.decay = decay
        self.register_buffer("value", torch.zeros((), dtype=torch.float32))

    def forward(self, h: torch.Tensor, skip: Optional[torch.Tensor] = None) -> torch.Tensor:
        """skip: a device flag (mpl_fast.mpl.nonfinite), 1 where the step is skipped: the
        baseline then keeps its value, as it does wherever h is not finite (no host read)."""
        if self.value.device != h.device:
            # Nobody calls .to() on the step object (only on its networks): follow the feedback's
            # device once, instead of mixing a CPU buffer into GPU math every step.
            self.value = self.value.to(h.device)
        b = self.value
        h_b = h.detach().to(b.dtype)
        if skip is None:
            b.sub_((1.0 - self.decay) * (b - h_b))
        else:
            keep = (skip > 0) | torch.logical_not(torch.isfinite(h_b))
            b.copy_(torch.where(keep, b, b - (1.0 - self.decay) * (b - h_b)))
        return h - b.to(h.dtype)


def loss_diff(ce_old: torch.Tensor, ce_new: torch.Tensor, sign: int = 1) -> torch.Tensor:
    """h = CE_old - CE_new (paper, sign +1): positive when the student improved on labels."""
    return (ce_old - ce_new) if sign > 0 else (ce_new - ce_old)


def dot(lr: float, grads_new: List[torch.Tensor], grads_unlabeled: List[torch.Tensor],
        sign: int = 1) -> torch.Tensor:
    """h = lr_S * <grad CE_l(theta'), grad CE(pseudo, S(x_us; theta))>: the first-order Taylor
    form of CE_old - CE_new for a plain-SGD student step, as one multi-tensor dot product."""
    h = lr * ops.multi_tensor_dot(grads_new, grads_unlabeled)
    return h if sign > 0 else -h


def grads_or_zeros(loss: torch.Tensor, params: List[torch.Tensor]) -> List[torch.Tensor]:
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return [g if g is not None else torch.zeros_like(p) for g, p in zip(grads, params)]


def second_order_term(student_logits_at, params: List[torch.Tensor], delta: List[torch.Tensor],
                      v: List[torch.Tensor], targets: torch.Tensor, lr: float, eps: float
                      ) -> torch.Tensor:
    """A surrogate whose teacher gradient is the first-order meta-gradient
    d CE_l(theta'(T)) / dT = -lr * d/dT <v, grad_theta CE(t(T), S(x_us; theta))>, v = grad CE_l at
    theta', with the Hessian-vector product as a central finite difference at theta:

        term = lr * |v| / (2 eps)
               * mean_rows sum_c t_c(T) * (logp(theta + eps u) - logp(theta - eps u))_c

    (u = v / |v|, so eps is a step length in parameter space). params hold theta' on entry and
    on exit; delta = theta - theta'. Perturbation and restore run in place with
    multi_tensor_axpby. student_logits_at() runs the student forward on the strong view under
    no_grad; targets are the (smoothed) soft pseudo labels carrying the teacher's graph.
    """
    norm = ops.multi_tensor_dot(v, v).sqrt()
    unit = torch._foreach_div(v, norm.clamp_min(torch.finfo(norm.dtype).tiny).to(v[0].dtype))
    with torch.no_grad():
        ops.multi_tensor_axpby(params, delta, 1.0, 1.0)  # theta
        ops.multi_tensor_axpby(params, unit, eps, 1.0)  # theta + eps u
        logp_plus = torch.log_softmax(student_logits_at().to(targets.dtype), dim=1)
        ops.multi_tensor_axpby(params, unit, -2.0 * eps, 1.0)  # theta - eps u
        logp_minus = torch.log_softmax(student_logits_at().to(targets.dtype), dim=1)
        ops.multi_tensor_axpby(params, unit, eps, 1.0)
        ops.multi_tensor_axpby(params, delta, -1.0, 1.0)  # back to theta'
        diff = logp_plus - logp_minus
        diff = torch.where(torch.isfinite(diff), diff, torch.zeros_like(diff))
    rows = targets.shape[0]
    return (lr * norm.to(targets.dtype) / (2.0 * eps)) * (targets * diff).sum() / max(rows, 1)


def student_params(model: nn.Module) -> List[torch.Tensor]:
    return [p for p in model.parameters() if p.requires_grad]


def snapshot(params: List[torch.Tensor]) -> List[torch.Tensor]:
    return [p.detach().clone() for p in params]


def current_grads(params: List[torch.Tensor]) -> List[torch.Tensor]:
    return [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p)
            for p in params]


def optimizer_lr(opt: torch.optim.Optimizer) -> float:
    lr = opt.param_groups[0]["lr"]
    return float(lr) if not isinstance(lr, torch.Tensor) else lr


def smoothed(probs: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    if label_smoothing <= 0:
        return probs
    return (1.0 - label_smoothing) * probs + label_smoothing / probs.shape[1]

