"""One Meta Pseudo Labels step (../DESIGN.md, "The algorithm, precisely") as a plain object.

    step = MPLStep(teacher, student, teacher_opt, student_opt, MPLConfig())
    metrics = step(MPLBatch(x_l, y_l, x_uw, x_us), step_index)

Models, optimizers and batches in; a dict of 0-dim tensors out (nothing synchronises with the
device). Learning-rate schedules (including the student's wait at lr 0) belong to the caller's
schedulers: the step reads each optimizer's current lr.
"""
import contextlib
from dataclasses import dataclass
from typing import Dict, Optional

import torch
from torch import nn
from torch.profiler import record_function

from mpl_fast import ops
from mpl_fast.mpl import feedback, nonfinite
from mpl_fast.mpl.bn import frozen_bn_stats, uses_batch_statistics
from mpl_fast.mpl.config import (AUTO, WEAK_JOINT, WEAK_MODES, WEAK_SHARED,
                                  WEAK_THROUGH_BATCH_NORM, MPLConfig)
from mpl_fast.mpl.constant_rows import check_network, constant_rows
from mpl_fast.mpl.shared_statistics import SharedStatistics

# the profiler ranges an MPLStep records, in order (see mpl_fast.train.profiling);
# teacher_forward also holds the teacher's losses and the pseudo labels
PHASES = ("mpl/teacher_forward", "mpl/student_forward_backward_step", "mpl/student_new_forward",
          "mpl/feedback", "mpl/teacher_backward_step")


@dataclass
class MPLBatch:
    """A labeled batch (x_l, y_l) and an unlabeled batch in two views (x_uw weak, x_us strong).

    teacher_* replace the teacher's inputs where the teacher does not see images (Reduced MPL:
    the stored logits of a large teacher); by default the teacher sees the same images.
    y_u: the unlabeled images' true labels where the data has them (a labeled subset of a labeled
    set): read for the `pseudo/accuracy` diagnostic alone, never for training.
    """
    x_l: torch.Tensor
    y_l: torch.Tensor
    x_uw: torch.Tensor
    x_us: torch.Tensor
    teacher_l: Optional[torch.Tensor] = None
    teacher_uw: Optional[torch.Tensor] = None
    teacher_us: Optional[torch.Tensor] = None
    y_u: Optional[torch.Tensor] = None

    def check(self):
        """ValueError naming what does not fit: the two views of the unlabeled images (and the
        teacher's own inputs, where given) must be alike, one label a labeled row. Shapes only:
        nothing is read from the device."""
        pairs = [("x_uw", self.x_uw, "x_us", self.x_us)]
        if self.teacher_uw is not None or self.teacher_us is not None:
            pairs.append(("teacher_uw", self.teacher_uw, "teacher_us", self.teacher_us))
        for a, x, b, y in pairs:
            if x is None or y is None or x.shape != y.shape:
                raise ValueError(f"MPLBatch: {a} and {b} are two views of the same unlabeled "
                                 f"images and must be alike, got shapes "
                                 f"{_shape(x)} and {_shape(y)}")
        if self.y_l.dim() != 1 or self.y_l.shape[0] != self.x_l.shape[0]:
            raise ValueError(f"MPLBatch: y_l must hold one label a row of x_l "
                             f"({self.x_l.shape[0]} rows), got shape {_shape(self.y_l)}")

    def teacher_inputs(self):
        pick = lambda t, x: x if t is None else t  # noqa: E731
        return (pick(self.teacher_l, self.x_l), pick(self.teacher_uw, self.x_uw),
                pick(self.teacher_us, self.x_us))


def _shape(t):
    return None if t is None else list(t.shape)


def pseudo_label_accuracy(labels, probs, truth) -> torch.Tensor:
    """How often the student's pseudo labels are right: the share of hard labels (sampled or
    argmax) equal to the true ones; for soft targets, the mean probability of the true class."""
    if labels is None:
        return probs.gather(1, truth[:, None]).float().mean()
    return (labels == truth).float().mean()


def unwrapped(model: nn.Module) -> nn.Module:
    """The network inside a DistributedDataParallel wrapper (or the network itself)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def as_metric(value) -> torch.Tensor:
    """A metric from a float or from a tensor that changes later (a device lr, a scale)."""
    return value.detach().clone() if isinstance(value, torch.Tensor) else torch.tensor(value)


def teacher_views(teacher: nn.Module, batch: MPLBatch, weak_no_grad, weak_read: bool = True):
    """The teacher's logits (z_l, z_uw, z_us) as a step computes them (weak_no_grad as
    MPLStep resolves mpl.teacher_weak_no_grad):
    - False: one forward of the three inputs together;
    - True: one of the labeled and strong inputs, and the weak view in a forward of its own
      without autograd, normalised with its own batch statistics and not counted in the BN
      running statistics (those come from the labeled + strong forward, once a step); z_uw is
      None there where nothing reads it (weak_read false);
    - 'joint': one forward of the three, the weak view's rows last and outside autograd
      (mpl_fast.mpl.constant_rows): the values and statistics of False, a backward without them;
    - 'shared': as True, the weak view normalised with the labeled + strong forward's batch
      statistics (mpl_fast.mpl.shared_statistics) instead of its own.
    """
    t_l, t_uw, t_us = batch.teacher_inputs()
    n_l, n_u = t_l.shape[0], t_us.shape[0]
    if weak_no_grad == WEAK_JOINT:
        x = torch.cat([t_l, t_us, t_uw])
        with constant_rows(x.shape[0], n_u):
            z_l, z_us, z_uw = teacher(x).split([n_l, n_u, n_u])
        return z_l, z_uw.detach(), z_us
    if not weak_no_grad:
        return teacher(torch.cat([t_l, t_uw, t_us])).split([n_l, n_u, n_u])
    shared = SharedStatistics() if weak_no_grad == WEAK_SHARED and weak_read else None
    with shared.recorded() if shared else contextlib.nullcontext():
        z_l, z_us = teacher(torch.cat([t_l, t_us])).split([n_l, n_u])
    if not weak_read:
        return z_l, None, z_us
    with torch.no_grad(), shared.applied(teacher) if shared else frozen_bn_stats(teacher):
        return z_l, teacher(t_uw), z_us


def _check_networks(teacher, student, teacher_opt, student_opt):
    """ValueError where the step would train silently wrong: one network as both, or an
    optimizer holding the other network's parameters (the two passed in swapped order)."""
    own = {"teacher": {id(p) for p in teacher.parameters()},
           "student": {id(p) for p in student.parameters()}}
    if own["teacher"] & own["student"]:
        raise ValueError("MPLStep: the teacher and the student share parameters; MPL trains two "
                         "networks")
    for name, opt in (("teacher", teacher_opt), ("student", student_opt)):
        held = {id(p) for group in opt.param_groups for p in group["params"]}
        if not held <= own[name]:
            raise ValueError(f"MPLStep: {name}_opt holds parameters that are not the {name}'s "
                             "(teacher_opt and student_opt swapped?)")


class MPLStep(nn.Module):
    """Teacher/student MPL update. State (the moving baseline) is in the state dict."""

    def __init__(self, teacher: nn.Module, student: nn.Module,
                 teacher_opt: torch.optim.Optimizer, student_opt: torch.optim.Optimizer,
                 config: MPLConfig = MPLConfig(), autocast_dtype: Optional[torch.dtype] = None,
                 generator: Optional[torch.Generator] = None):
        super().__init__()
        _check_networks(teacher, student, teacher_opt, student_opt)
        self.teacher, self.student = teacher, student
        self.teacher_opt, self.student_opt = teacher_opt, student_opt
        self.config = config
        self.autocast_dtype = autocast_dtype
        self.generator = generator
        self.baseline = (feedback.MovingBaseline(config.baseline_decay)
                         if config.baseline_decay is not None else None)
        # config.teacher_weak_no_grad resolved: 'auto' is on where it changes nothing (a teacher
        # without batch statistics computes each image alike whichever forward it is in), and
        # so are 'joint' and 'shared' there, where the forward apart computes the same
        wanted = config.teacher_weak_no_grad
        if wanted in WEAK_MODES and not uses_batch_statistics(teacher):
            wanted = True
        self.weak_no_grad = False if wanted == AUTO else wanted
        if self.weak_no_grad in WEAK_THROUGH_BATCH_NORM:
            check_network(teacher, f"mpl.teacher_weak_no_grad={self.weak_no_grad}")
        # whether anything reads the teacher's weak view (UDA's targets, weak pseudo labels)
        self.weak_view_read = config.uda_weight > 0 or config.pseudo_label_view == "weak"
        # True: an optimizer step whose losses are not finite is skipped on the device (no host
        # synchronisation; mpl_fast.mpl.nonfinite), and metrics["nonfinite"] says 1 for the step.
        # Needs fused optimizers. The trainer sets it.
        self.skip_nonfinite = False
        # Optional mean across data-parallel replicas for the labeled losses that form h, so that
        # every replica uses the feedback of the global batch, and "any replica" for the skip
        # flags (all replicas skip together); set by the trainer under DDP.
        self.cross_replica_mean = None
        self.cross_replica_any = None
        # Set by prepare_replay (CUDA-graph runs): the UDA ramp's value as a device scalar,
        # written before each replay instead of a Python float baked into the graph.
        self.uda_scale_buffer = None

    # -- pieces a user (or a test) may call or replace -----------------------------------------
    def autocast(self, device: torch.device):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=self.autocast_dtype)

    def uda_scale(self, step: int) -> float:
        c = self.config
        if c.uda_weight == 0:
            return 0.0
        ramp = min(1.0, (step + 1) / c.uda_ramp_steps) if c.uda_ramp_steps > 0 else 1.0
        return c.uda_weight * ramp

    def prepare_replay(self, step: int):
        """Write this step's host-side values into device scalars (see train/graphed.py)."""
        if self.uda_scale_buffer is None:
            device = next(self.teacher.parameters()).device
            self.uda_scale_buffer = torch.zeros((), device=device)
        self.uda_scale_buffer.fill_(self.uda_scale(step))

    def make_pseudo_labels(self, teacher_logits: torch.Tensor):
        """(targets for the student, labels or None, probs) from teacher logits (no grad)."""
        c = self.config
        mode = "sample" if c.pseudo_labels == "sample" else "argmax"
        pl = ops.pseudo_labels(teacher_logits.detach(), temperature=c.pseudo_label_temperature,
                               mode=mode, generator=self.generator)
        if c.pseudo_labels == "soft":
            return pl.probs, None, pl.probs
        return pl.labels, pl.labels, pl.probs

    def teacher_forward(self, batch: MPLBatch):
        """The teacher's logits on the labeled, weak and strong inputs (see teacher_views)."""
        return teacher_views(self.teacher, batch, self.weak_no_grad, self.weak_view_read)

    def student_forward(self, batch: MPLBatch):
        """The student's logits on x_us (for its step) and on x_l (for CE_old), old weights."""
        n_u = batch.x_us.shape[0]
        if self.config.ce_old_forward == "separate":
            # x_l in a forward of its own, normalised with its own batch statistics as CE_new's
            # forward is, so that CE_old - CE_new holds the step's effect alone; no autograd (CE_old
            # is a value) and no BN running-statistics update (that is the x_us forward's)
            with torch.no_grad(), frozen_bn_stats(self.student), self.autocast(batch.x_l.device):
                s_l = self.student(batch.x_l)
            with self.autocast(batch.x_us.device):
                return self.student(batch.x_us), s_l
        with self.autocast(batch.x_l.device):
            s = self.student(torch.cat([batch.x_us, batch.x_l]))
        return s.split([n_u, batch.x_l.shape[0]])

    def _replica_mean(self, grads):
        """The average of a list of gradients over data-parallel replicas (one all-reduce)."""
        if self.cross_replica_mean is None or not grads:
            return grads
        flat = self.cross_replica_mean(torch.cat([g.reshape(-1) for g in grads]))
        return [part.view_as(g) for part, g in zip(flat.split([g.numel() for g in grads]), grads)]

    # -- the step ---------------------------------------------------------------------------
    def forward(self, batch: MPLBatch, step: int = 0) -> Dict[str, torch.Tensor]:
        batch.check()
        c = self.config
        dev = batch.x_l.device
        y_l = batch.y_l
        n_u = batch.x_us.shape[0]
        params = feedback.student_params(self.student)
        lr_s = feedback.optimizer_lr(self.student_opt)
        lr_t = feedback.optimizer_lr(self.teacher_opt)

        # BN running statistics to put back where the step is skipped (non-finite losses)
        if self.skip_nonfinite:
            teacher_stats = nonfinite.RunningStats(self.teacher)
            student_stats = nonfinite.RunningStats(self.student)

        # 1. teacher: supervised + UDA; 2. pseudo labels (one profiler range for both)
        with record_function("mpl/teacher_forward"):
            with self.autocast(dev):
                z_l, z_uw, z_us = self.teacher_forward(batch)
            t_ce = ops.soft_cross_entropy(z_l, y_l, label_smoothing=c.teacher_label_smoothing)
            uda_scale = (self.uda_scale(step) if self.uda_scale_buffer is None
                         else self.uda_scale_buffer)
            if c.uda_weight > 0:
                uda, uda_mask = ops.uda_loss(z_uw, z_us, temperature=c.uda_temperature,
                                             threshold=c.uda_threshold)
            else:
                uda = torch.zeros((), device=dev)
                uda_mask = torch.zeros(n_u, device=dev)
            source = z_us if c.pseudo_label_view == "strong" else z_uw
            targets, labels, probs = self.make_pseudo_labels(source)

        # 3. student on pseudo labels; CE_old on labels with the same (old) weights
        with record_function("mpl/student_forward_backward_step"):
            s_us, s_l = self.student_forward(batch)
            s_loss = ops.soft_cross_entropy(s_us, targets,
                                            label_smoothing=c.student_label_smoothing)
            with torch.no_grad():
                ce_old = ops.soft_cross_entropy(s_l.detach(), y_l)
            # a step is skipped whole where the losses known before the student's step are not
            # finite, and the teacher's alone where its own loss is not (the student has stepped)
            skip = (nonfinite.flag(s_loss, t_ce, uda, any_replica=self.cross_replica_any)
                    if self.skip_nonfinite else None)
            self.student_opt.zero_grad(set_to_none=True)
            s_loss.backward()
            if skip is not None:  # after the backward, which saved the running statistics
                student_stats.restore_where(skip)
            if c.grad_clip > 0:
                nn.utils.clip_grad_norm_(params, c.grad_clip, foreach=True)
            grads_u = feedback.current_grads(params) if c.estimator == "dot" else None
            theta = feedback.snapshot(params) if c.estimator == "second_order" else None
            nonfinite.step_unless(self.student_opt, skip)

        # 4. student on labels with the new weights (BN statistics not updated again)
        with record_function("mpl/student_new_forward"):
            need_grad = c.estimator in ("dot", "second_order")
            # a forward whose gradient autograd.grad takes (dot, second_order) bypasses a DDP
            # wrapper: DDP would wait for a backward that never comes; its gradient is averaged
            # across replicas below instead
            student = unwrapped(self.student) if need_grad else self.student
            with frozen_bn_stats(self.student), torch.set_grad_enabled(need_grad), \
                    self.autocast(dev):
                s_l_new = student(batch.x_l)
            ce_new = ops.soft_cross_entropy(s_l_new, y_l)

        # 5. feedback
        with record_function("mpl/feedback"):
            if c.estimator == "second_order":
                v = self._replica_mean(feedback.grads_or_zeros(ce_new, params))
                with torch.no_grad():  # delta is a value: autograd need not track it
                    ops.multi_tensor_axpby(theta, params, -1.0, 1.0)  # theta <- theta - theta'

                def strong_logits():
                    with frozen_bn_stats(self.student), self.autocast(dev):
                        return unwrapped(self.student)(batch.x_us)

                q = torch.softmax(z_us.to(torch.promote_types(z_us.dtype, torch.float32))
                                  / c.pseudo_label_temperature, dim=1)
                mpl = feedback.second_order_term(strong_logits, params, theta, v,
                                                 feedback.smoothed(q, c.student_label_smoothing),
                                                 lr_s, c.fd_eps)
                h = centered = mpl.detach()  # the surrogate's value: its teacher gradient is exact
            else:
                # dot: grads_u were averaged across replicas by DDP's backward, grad CE_new here
                grads_new = (self._replica_mean(feedback.grads_or_zeros(ce_new, params))
                             if c.estimator == "dot" else None)
                if self.cross_replica_mean is not None:
                    ce_old = self.cross_replica_mean(ce_old)
                    ce_new = self.cross_replica_mean(ce_new)
                if c.estimator == "dot":
                    h = feedback.dot(lr_s, grads_new, grads_u, c.feedback_sign)
                else:
                    h = feedback.loss_diff(ce_old, ce_new.detach(), c.feedback_sign)
                centered = self.baseline(h, skip) if self.baseline is not None else h
                if c.mpl_term == "score":
                    # the mean over unlabeled rows, as in the paper's code: the gradient estimates
                    # (1 / N_u) * d E[CE_l(theta')] / dT
                    mpl = centered.detach() * ops.soft_cross_entropy(z_us, labels)
                else:  # the released code's soft term: CE(stopgrad(softmax z), z), zero gradient
                    wide = torch.promote_types(z_us.dtype, torch.float32)
                    q_const = torch.softmax(z_us.detach().to(wide), 1)
                    mpl = centered.detach() * ops.soft_cross_entropy(z_us, q_const)

        # 6. teacher step
        with record_function("mpl/teacher_backward_step"):
            t_loss = c.teacher_supervised_weight * t_ce + uda_scale * uda + c.mpl_weight * mpl
            if skip is not None:
                skip = torch.maximum(skip, nonfinite.flag(t_loss,
                                                          any_replica=self.cross_replica_any))
            self.teacher_opt.zero_grad(set_to_none=True)
            t_loss.backward()
            if c.grad_clip > 0:
                nn.utils.clip_grad_norm_(feedback.student_params(self.teacher), c.grad_clip,
                                         foreach=True)
            nonfinite.step_unless(self.teacher_opt, skip)
            if skip is not None:
                teacher_stats.restore_where(skip)

        metrics = {
            "teacher/loss": t_loss.detach(), "teacher/ce_labeled": t_ce.detach(),
            "teacher/uda": uda.detach(), "teacher/mpl": mpl.detach(),
            "student/loss": s_loss.detach(), "student/ce_old": ce_old.detach(),
            "student/ce_new": ce_new.detach(), "h": h.detach(),
            "h_centered": centered.detach(),
            "baseline": (self.baseline.value.detach() if self.baseline is not None
                         else torch.zeros((), device=dev)),
            "uda/mask_ratio": uda_mask.mean() if n_u else torch.zeros((), device=dev),
            "uda/scale": as_metric(uda_scale), "lr/teacher": as_metric(lr_t),
            "lr/student": as_metric(lr_s),
        }
        if batch.y_u is not None and n_u:
            metrics["pseudo/accuracy"] = pseudo_label_accuracy(labels, probs, batch.y_u)
        if skip is not None:
            metrics["nonfinite"] = skip
        return metrics
