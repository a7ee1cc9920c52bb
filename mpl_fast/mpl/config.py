"""MPL algorithm settings and the named presets (paper, official, kekmodel)."""
import dataclasses
import math
from dataclasses import dataclass
from typing import Optional, Union, get_args

PSEUDO_LABELS = ("sample", "argmax", "soft")
ESTIMATORS = ("loss_diff", "dot", "second_order")
MPL_TERMS = ("score", "official_soft")
CE_OLD_FORWARDS = ("separate", "joint")
AUTO = "auto"
WEAK_JOINT = "joint"  # teacher_weak_no_grad: the weak view's rows constant in the joint forward
WEAK_SHARED = "shared"  # teacher_weak_no_grad: apart, with the labeled + strong batch's statistics
WEAK_MODES = (AUTO, WEAK_JOINT, WEAK_SHARED)  # teacher_weak_no_grad's values besides true, false
# the settings that reach the teacher's BatchNorm through a torch-function mode (SyncBatchNorm,
# whose statistics are computed outside F.batch_norm, refused)
WEAK_THROUGH_BATCH_NORM = (WEAK_JOINT, WEAK_SHARED)


@dataclass(frozen=True)
class MPLConfig:
    """What one MPL step does. Defaults are the `paper` preset.

    pseudo_labels:   'sample' (a categorical draw from the teacher: the paper's unbiased
                     score-function estimator), 'argmax', or 'soft' (teacher probabilities).
    pseudo_label_view: which unlabeled view the pseudo labels come from: 'strong' or 'weak'.
    estimator:       teacher feedback: 'loss_diff' (h = CE_old - CE_new), 'dot'
                     (h = lr_S <grad CE_l(theta'), grad CE_u(theta)>) or 'second_order' (the
                     exact first-order meta-gradient for soft labels, finite-difference HVP).
    feedback_sign:   +1 is the paper's h = CE_old - CE_new; -1 reproduces the released code's
                     CE_new - CE_old (presets `official`, `kekmodel`).
    baseline_decay:  moving baseline b <- b - (1 - d)(b - h), h <- h - b; None for none.
    teacher_supervised_weight: weight of the teacher's own CE on labeled data (1 in the paper's
                     code; 0 leaves the teacher to the student's feedback and UDA alone).
    teacher_weak_no_grad: run the teacher's weak view in its own forward without autograd (less
                     backward work; skipped whole where nothing reads it: no UDA, pseudo labels
                     from the strong view). BN: that view is normalised with its own batch
                     statistics instead of the joint batch's, and leaves the running statistics
                     alone. 'auto' (default): on where that changes nothing, a teacher without
                     batch statistics (mpl_fast.mpl.bn.uses_batch_statistics), off otherwise.
                     'joint': the weak view stays in the joint forward (the same values and BN
                     statistics as false) with its rows outside autograd (mpl_fast.mpl.
                     constant_rows: about the backward work `true` saves; the teacher's gradient
                     leaves out how the weak view's activations move the BN statistics).
                     'shared': the weak view apart as with true, normalised layer by layer with
                     the labeled + strong forward's batch statistics (mpl_fast.mpl.
                     shared_statistics: true's work; both views of an image see one
                     normalisation, as in the joint forward, whose statistics also count the
                     weak view). Both same as true for a teacher without batch statistics.
    ce_old_forward:  where CE_old, the student's labeled loss before its step, comes from:
                     'separate' (a forward of x_l of its own with the old weights, without
                     autograd and not counted in the BN running statistics: normalised with the
                     labeled batch's statistics exactly like CE_new, so h measures the student's
                     step alone; the student's training forward then sees x_us alone) or 'joint'
                     (from the training forward on x_us and x_l together, as the released code and
                     the PyTorch port do: x_l is then normalised with the joint batch's statistics
                     for CE_old and its own for CE_new, and that difference, unrelated to the step
                     and to the pseudo labels, enters h: docs/meta_gradient.md measures it).
    mpl_term:        'score' = h * CE(pseudo labels, teacher logits); 'official_soft' =
                     h * CE(stopgrad(softmax z), z), the released TF code's term, whose gradient is
                     exactly zero (kept only to reproduce that code; not a working MPL).
    """
    pseudo_labels: str = "sample"
    pseudo_label_view: str = "strong"
    pseudo_label_temperature: float = 1.0
    estimator: str = "loss_diff"
    ce_old_forward: str = "separate"
    feedback_sign: int = 1
    baseline_decay: Optional[float] = 0.99
    mpl_term: str = "score"
    mpl_weight: float = 1.0
    teacher_supervised_weight: float = 1.0
    teacher_label_smoothing: float = 0.0
    student_label_smoothing: float = 0.0
    uda_weight: float = 0.0
    uda_temperature: float = 1.0
    uda_threshold: float = 0.0
    uda_ramp_steps: int = 0
    fd_eps: float = 1e-3
    teacher_weak_no_grad: Union[bool, str] = AUTO
    grad_clip: float = 0.0

    def __post_init__(self):
        def bad(key, msg):
            raise ValueError(f"mpl.{key}: {msg}")

        # Types first, so a value like 'none' (YAML's null is `null`) fails with its key named.
        for field in dataclasses.fields(self):
            if field.name == "teacher_weak_no_grad":
                continue  # true, false or one of WEAK_MODES: checked below
            value, optional = getattr(self, field.name), type(None) in get_args(field.type)
            kind = next(a for a in get_args(field.type) if a is not type(None)) if optional \
                else field.type
            if value is None and optional:
                continue
            if kind is float:
                ok = isinstance(value, (int, float)) and not isinstance(value, bool)
            elif kind is int:
                ok = isinstance(value, int) and not isinstance(value, bool)
            else:
                ok = isinstance(value, kind)
            if not ok:
                bad(field.name, f"must be {_TYPE_NAMES[kind]}{' or null' if optional else ''}, "
                    f"got {value!r}")
            if kind is float and not math.isfinite(value):  # NaN would pass every range test
                bad(field.name, f"must be finite, got {value}")
        if not (isinstance(self.teacher_weak_no_grad, bool)
                or self.teacher_weak_no_grad in WEAK_MODES):
            bad("teacher_weak_no_grad", f"must be true, false, {', '.join(WEAK_MODES[:-1])} or "
                f"{WEAK_MODES[-1]}, got {self.teacher_weak_no_grad!r}")
        if self.pseudo_labels not in PSEUDO_LABELS:
            bad("pseudo_labels", f"must be one of {PSEUDO_LABELS}, got {self.pseudo_labels!r}")
        if self.pseudo_label_view not in ("strong", "weak"):
            bad("pseudo_label_view", f"must be 'strong' or 'weak', got {self.pseudo_label_view!r}")
        if self.estimator not in ESTIMATORS:
            bad("estimator", f"must be one of {ESTIMATORS}, got {self.estimator!r}")
        if self.ce_old_forward not in CE_OLD_FORWARDS:
            bad("ce_old_forward", f"must be one of {CE_OLD_FORWARDS}, got {self.ce_old_forward!r}")
        if self.mpl_term not in MPL_TERMS:
            bad("mpl_term", f"must be one of {MPL_TERMS}, got {self.mpl_term!r}")
        if self.feedback_sign not in (1, -1):
            bad("feedback_sign", f"must be 1 or -1, got {self.feedback_sign!r}")
        if self.baseline_decay is not None and not 0.0 <= self.baseline_decay < 1.0:
            bad("baseline_decay", f"must be in [0, 1) or null, got {self.baseline_decay}")
        for key in ("pseudo_label_temperature", "uda_temperature", "fd_eps"):
            if not getattr(self, key) > 0:
                bad(key, f"must be > 0, got {getattr(self, key)}")
        for key in ("teacher_label_smoothing", "student_label_smoothing", "uda_threshold"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                bad(key, f"must be in [0, 1], got {getattr(self, key)}")
        for key in ("mpl_weight", "teacher_supervised_weight", "uda_weight", "grad_clip",
                    "uda_ramp_steps"):
            if getattr(self, key) < 0:
                bad(key, f"must be >= 0, got {getattr(self, key)}")
        if self.estimator == "second_order" and self.pseudo_labels != "soft":
            bad("estimator", "second_order differentiates through soft pseudo labels: set "
                "pseudo_labels: soft")
        if (self.pseudo_labels == "soft" and self.estimator != "second_order"
                and self.mpl_term != "official_soft"):
            bad("pseudo_labels", "soft labels with a score-function feedback have zero teacher "
                "gradient: use estimator: second_order (or the `official` preset to reproduce it)")

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)


_TYPE_NAMES = {float: "a number", int: "an integer", str: "a string", bool: "true or false"}

PRESETS = {
    # The paper's algorithm: sampled hard labels, h = CE_old - CE_new with a moving baseline,
    # CE_old and CE_new computed alike (ce_old_forward 'separate'; the paper does not say).
    "paper": MPLConfig(),
    # What the released TF code does: soft targets, h = CE_new - CE_old, baseline, and the soft
    # MPL term CE(stopgrad(softmax z), z), whose gradient is exactly zero. A reproduction of
    # released code, NOT a working MPL: its teacher gets no feedback from the student. CE_old
    # from the student's joint forward on x_us and x_l, as there.
    "official": MPLConfig(pseudo_labels="soft", estimator="loss_diff", feedback_sign=-1,
                          baseline_decay=0.99, mpl_term="official_soft", ce_old_forward="joint"),
    # The popular PyTorch port: argmax labels from the weak view, h = CE_new - CE_old, no
    # baseline, CE_old from the joint forward.
    "kekmodel": MPLConfig(pseudo_labels="argmax", pseudo_label_view="weak", feedback_sign=-1,
                          baseline_decay=None, ce_old_forward="joint"),
}


def preset(name: str, **overrides) -> MPLConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown MPL preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name].replace(**overrides)
