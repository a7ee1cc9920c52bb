"""The reason this project exists: MPL's teacher feedback checked against exact meta-gradients
(float64, tiny MLPs, plain-SGD students)."""
import copy

import pytest
import torch
from torch import nn
from torch.func import functional_call

from mpl_fast.mpl import MPLBatch, MPLConfig, MPLStep, preset

C, D, B, U = 3, 4, 5, 4


def mlp(seed, bn=False):
    torch.manual_seed(seed)
    layers = [nn.Linear(D, 8)] + ([nn.BatchNorm1d(8)] if bn else []) + [nn.Tanh(), nn.Linear(8, C)]
    return nn.Sequential(*layers).double()


def batch(seed=0, u=U):
    g = torch.Generator().manual_seed(seed)
    x_l = torch.randn(B, D, generator=g, dtype=torch.float64)
    y_l = torch.randint(0, C, (B,), generator=g)
    x_uw = torch.randn(u, D, generator=g, dtype=torch.float64)
    x_us = x_uw + 0.3 * torch.randn(u, D, generator=g, dtype=torch.float64)
    return MPLBatch(x_l, y_l, x_uw, x_us)


def make_step(config, lr_s=0.5, seed=1, fixed_labels=None, teacher=None, student=None):
    teacher = teacher or mlp(seed)
    student = student or mlp(seed + 100)
    t_opt = torch.optim.SGD(teacher.parameters(), lr=0.0)  # lr 0: the gradient stays in .grad
    s_opt = torch.optim.SGD(student.parameters(), lr=lr_s)
    step = MPLStep(teacher, student, t_opt, s_opt, config)
    if fixed_labels is not None:
        step.make_pseudo_labels = lambda z: (fixed_labels, fixed_labels, None)
    return step


def teacher_grad(step):
    return torch.cat([p.grad.flatten() for p in step.teacher.parameters()])


def supervised_grad(teacher, b, ls=0.0):
    teacher.zero_grad()
    z_l = teacher(torch.cat([b.x_l, b.x_uw, b.x_us]))[:B]
    nn.functional.cross_entropy(z_l, b.y_l, label_smoothing=ls).backward()
    g = torch.cat([p.grad.flatten() for p in teacher.parameters()])
    teacher.zero_grad()
    return g


def run_mpl_grad(config, b, **kw):
    """Teacher gradient of the MPL term alone (the step's gradient minus the supervised part)."""
    step = make_step(config, **kw)
    sup = supervised_grad(copy.deepcopy(step.teacher), b, config.teacher_label_smoothing)
    metrics = step(b)
    return teacher_grad(step) - sup, metrics, step


def exact_soft_meta_grad(teacher, student, b, lr, temperature=1.0, ls=0.0):
    """d CE_l(theta'(T)) / dT through one plain-SGD student step on soft pseudo labels."""
    tp = {k: v.detach().clone().requires_grad_() for k, v in teacher.named_parameters()}
    sp = {k: v.detach().clone().requires_grad_() for k, v in student.named_parameters()}
    z_us = functional_call(teacher, tp, (b.x_us,))
    q = torch.softmax(z_us / temperature, 1)
    t = (1 - ls) * q + ls / C
    logp = torch.log_softmax(functional_call(student, sp, (b.x_us,)), 1)
    l_u = -(t * logp).sum(1).mean()
    grads = torch.autograd.grad(l_u, list(sp.values()), create_graph=True)
    new = {k: v - lr * g for (k, v), g in zip(sp.items(), grads)}
    ce_l = nn.functional.cross_entropy(functional_call(student, new, (b.x_l,)), b.y_l)
    return torch.cat([g.flatten() for g in torch.autograd.grad(ce_l, list(tp.values()))])


def rel_err(a, b):
    return float((a - b).norm() / b.norm())


SECOND_ORDER = MPLConfig(pseudo_labels="soft", estimator="second_order", baseline_decay=None)


# The error curve (docs/meta_gradient.md): truncation O(eps^2) for large eps, rounding
# O(u / eps) for small eps; in float64 the minimum is near eps = 1e-5.
@pytest.mark.parametrize("eps, bound", [
    (1e-1, 1e-3), (1e-2, 1e-5), (1e-3, 1e-7), (1e-5, 1e-9), (1e-8, 1e-6), (1e-10, 1e-4),
])
def test_second_order_matches_exact_meta_gradient(eps, bound):
    b = batch(0)
    config = SECOND_ORDER.replace(fd_eps=eps, student_label_smoothing=0.1)
    teacher, student = mlp(1), mlp(101)
    exact = exact_soft_meta_grad(teacher, student, b, lr=0.5, ls=0.1)
    got, _, _ = run_mpl_grad(config, b, lr_s=0.5, teacher=copy.deepcopy(teacher),
                             student=copy.deepcopy(student))
    err = rel_err(got, exact)
    assert err < bound, err
    assert err < 1e-4 or eps >= 1e-1


def test_second_order_error_curve_has_a_minimum():
    b = batch(3)
    teacher, student = mlp(2), mlp(102)
    exact = exact_soft_meta_grad(teacher, student, b, lr=0.3)
    errs = {}
    for eps in (1e-1, 1e-5, 1e-10):
        got, _, _ = run_mpl_grad(SECOND_ORDER.replace(fd_eps=eps), b, lr_s=0.3,
                                 teacher=copy.deepcopy(teacher), student=copy.deepcopy(student))
        errs[eps] = rel_err(got, exact)
    assert errs[1e-5] < errs[1e-1] and errs[1e-5] < errs[1e-10], errs


def test_second_order_restores_student_weights():
    b = batch(1)
    step = make_step(SECOND_ORDER, lr_s=0.5)
    reference = make_step(MPLConfig(pseudo_labels="soft", estimator="loss_diff",
                                    mpl_term="official_soft", baseline_decay=None), lr_s=0.5)
    step(b)
    reference(b)  # the same student update, without perturbations
    for p, q in zip(step.student.parameters(), reference.student.parameters()):
        assert torch.allclose(p, q, rtol=0, atol=1e-12)


def _first_order_h(teacher, student, b, labels, lr):
    sp = {k: v.detach().clone().requires_grad_() for k, v in student.named_parameters()}
    loss_u = nn.functional.cross_entropy(functional_call(student, sp, (b.x_us,)), labels)
    g_u = torch.autograd.grad(loss_u, list(sp.values()))
    new = {k: (v - lr * g).detach().requires_grad_() for (k, v), g in zip(sp.items(), g_u)}
    ce_l = nn.functional.cross_entropy(functional_call(student, new, (b.x_l,)), b.y_l)
    g_l = torch.autograd.grad(ce_l, list(new.values()))
    return lr * sum((a * c).sum() for a, c in zip(g_l, g_u))


def test_dot_equals_exact_first_order_quantity():
    b = batch(2)
    labels = torch.tensor([0, 2, 1, 1])
    teacher, student = mlp(4), mlp(104)
    want = _first_order_h(teacher, student, b, labels, lr=0.2)
    cfg = MPLConfig(pseudo_labels="argmax", estimator="dot", baseline_decay=None)
    _, metrics, _ = run_mpl_grad(cfg, b, lr_s=0.2, fixed_labels=labels,
                                 teacher=copy.deepcopy(teacher), student=copy.deepcopy(student))
    assert abs(float(metrics["h"]) - float(want)) <= 1e-6 * abs(float(want))


def test_loss_diff_approaches_dot_as_lr_shrinks():
    b = batch(5)
    labels = torch.tensor([1, 0, 2, 2])
    teacher, student = mlp(6), mlp(106)
    gaps = []
    for lr in (0.3, 0.03, 0.003):
        hs = {}
        for est in ("loss_diff", "dot"):
            cfg = MPLConfig(pseudo_labels="argmax", estimator=est, baseline_decay=None)
            _, m, _ = run_mpl_grad(cfg, b, lr_s=lr, fixed_labels=labels,
                                   teacher=copy.deepcopy(teacher), student=copy.deepcopy(student))
            hs[est] = float(m["h"])
        assert hs["loss_diff"] * hs["dot"] > 0  # same sign
        gaps.append(abs(hs["loss_diff"] - hs["dot"]) / abs(hs["dot"]))
    assert gaps[0] > gaps[1] > gaps[2] and gaps[2] < 1e-2, gaps


def test_score_function_estimator_is_unbiased_by_enumeration():
    """E_y~T[teacher MPL gradient] equals (1/N_u) * d/dT E_y~T[CE_l(theta'(y))], exactly."""
    u = 2
    b = batch(7, u=u)
    teacher, student = mlp(8), mlp(108)
    lr = 0.4
    cfg = MPLConfig(pseudo_labels="sample", estimator="loss_diff", baseline_decay=None)
    tp = {k: v.detach().clone().requires_grad_() for k, v in teacher.named_parameters()}
    probs = torch.softmax(functional_call(teacher, tp, (b.x_us,)), 1)
    expected_loss = 0.0
    estimate = 0.0
    for y0 in range(C):
        for y1 in range(C):
            y = torch.tensor([y0, y1])
            p_y = (probs[0, y0] * probs[1, y1])
            got, metrics, step = run_mpl_grad(cfg, b, lr_s=lr, fixed_labels=y,
                                              teacher=copy.deepcopy(teacher),
                                              student=copy.deepcopy(student))
            estimate = estimate + p_y.detach() * got
            expected_loss = expected_loss + p_y * metrics["student/ce_new"].detach()
    exact = torch.cat([g.flatten() for g in torch.autograd.grad(expected_loss, list(tp.values()))])
    exact = exact / u
    cos = float(torch.nn.functional.cosine_similarity(estimate, exact, dim=0))
    assert cos > 0.999 and rel_err(estimate, exact) < 1e-8, (cos, rel_err(estimate, exact))


@pytest.mark.parametrize("name, overrides", [
    ("paper", {}),
    ("paper", {"estimator": "dot"}),
    ("paper", {"pseudo_labels": "argmax"}),
    ("kekmodel", {}),
    ("paper", {"pseudo_labels": "soft", "estimator": "second_order"}),
])
def test_working_presets_give_nonzero_teacher_mpl_gradient(name, overrides):
    b = batch(9)
    cfg = preset(name, **overrides).replace(baseline_decay=None)
    got, metrics, _ = run_mpl_grad(cfg, b, lr_s=0.5)
    assert float(metrics["h"]) != 0.0
    assert float(got.norm()) > 1e-6, got.norm()


def test_official_preset_has_zero_teacher_mpl_gradient():
    """The released TF code's soft MPL term: documented as a reproduction, not a working MPL."""
    b = batch(9)
    cfg = preset("official").replace(baseline_decay=None)
    got, metrics, _ = run_mpl_grad(cfg, b, lr_s=0.5)
    assert float(metrics["h"]) != 0.0
    assert float(got.norm()) < 1e-12


def test_feedback_sign_paper_vs_released():
    b = batch(11)
    labels = torch.tensor([0, 1, 2, 0])
    paper, _, _ = run_mpl_grad(MPLConfig(pseudo_labels="argmax", baseline_decay=None), b,
                               fixed_labels=labels)
    flipped, m, _ = run_mpl_grad(MPLConfig(pseudo_labels="argmax", baseline_decay=None,
                                           feedback_sign=-1), b, fixed_labels=labels)
    assert torch.allclose(paper, -flipped)
    # paper sign: h > 0 when the student's labeled loss went down
    assert (float(m["student/ce_old"]) - float(m["student/ce_new"])) * float(-m["h"]) > 0


def test_moving_baseline():
    cfg = MPLConfig(pseudo_labels="argmax", baseline_decay=0.9)
    step = make_step(cfg, fixed_labels=torch.tensor([0, 1, 2, 0]))
    m = step(batch(12))
    h = float(m["h"])
    assert float(m["baseline"]) == pytest.approx(0.1 * h, rel=1e-6)
    assert float(m["h_centered"]) == pytest.approx(0.9 * h, rel=1e-6)
    assert "baseline.value" in step.state_dict()


@pytest.mark.parametrize("ce_old_forward", ["separate", "joint"])
def test_bn_statistics_updated_once_per_step(ce_old_forward):
    b = batch(13)
    teacher, student = mlp(14, bn=True), mlp(114, bn=True)
    expected = copy.deepcopy(student)
    expected.train()
    with torch.no_grad():  # the one student forward that should count: its training forward
        expected(b.x_us if ce_old_forward == "separate" else torch.cat([b.x_us, b.x_l]))
    for estimator, labels in (("loss_diff", "argmax"), ("dot", "argmax"),
                              ("second_order", "soft")):
        cfg = MPLConfig(pseudo_labels=labels, estimator=estimator, baseline_decay=None,
                        ce_old_forward=ce_old_forward)
        step = make_step(cfg, teacher=copy.deepcopy(teacher), student=copy.deepcopy(student))
        step(b)
        for name, buf in step.student.named_buffers():
            assert torch.equal(buf, dict(expected.named_buffers())[name]), (estimator, name)


def _labeled_loss_change(student, b, labels, lr):
    """CE_l(theta) - CE_l(theta') through one plain-SGD step on CE(labels, S(x_us)), each loss
    from a forward of x_l alone (training-mode BN: the labeled batch's own statistics)."""
    student = copy.deepcopy(student)  # training-mode forwards move its running statistics
    sp = {k: v.detach().clone().requires_grad_() for k, v in student.named_parameters()}
    loss_u = nn.functional.cross_entropy(functional_call(student, sp, (b.x_us,)), labels)
    new = {k: v - lr * g for (k, v), g in zip(sp.items(),
                                             torch.autograd.grad(loss_u, list(sp.values())))}
    ce = [nn.functional.cross_entropy(functional_call(student, p, (b.x_l,)), b.y_l)
          for p in (sp, new)]
    return float((ce[0] - ce[1]).detach())


@pytest.mark.parametrize("lr", [0.5, 0.0])
def test_loss_diff_with_bn_student_is_the_change_of_the_labeled_loss(lr):
    """With BatchNorm in the student, h = CE_old - CE_new is the change the student's step made
    to its labeled loss only when CE_old normalises x_l as CE_new does (ce_old_forward
    'separate'); from the joint forward it carries the gap between normalising x_l with the
    joint batch's statistics and with its own, which has nothing to do with the step: with the
    student's lr at 0 (its wait steps) h is exactly 0 in one and that gap in the other."""
    b = batch(23)
    labels = torch.tensor([2, 0, 1, 1])
    student = mlp(123, bn=True)
    want = _labeled_loss_change(student, b, labels, lr)
    got = {}
    for where in ("separate", "joint"):
        cfg = MPLConfig(pseudo_labels="argmax", baseline_decay=None, ce_old_forward=where)
        _, m, _ = run_mpl_grad(cfg, b, lr_s=lr, fixed_labels=labels,
                               student=copy.deepcopy(student))
        got[where] = float(m["h"])
    if lr == 0.0:
        assert want == 0.0 and got["separate"] == 0.0
    else:
        assert got["separate"] == pytest.approx(want, rel=1e-10, abs=1e-14)
    assert abs(got["joint"] - want) > 1e-3, got  # the joint forward's normalisation gap


def test_second_order_with_bn_student_matches_exact_meta_gradient():
    """The finite-difference forwards see x_us alone; the step they differentiate must too."""
    b = batch(24)
    teacher, student = mlp(25), mlp(125, bn=True)
    exact = exact_soft_meta_grad(teacher, copy.deepcopy(student), b, lr=0.5)
    errs = {}
    for where in ("separate", "joint"):
        got, _, _ = run_mpl_grad(SECOND_ORDER.replace(fd_eps=1e-5, ce_old_forward=where), b,
                                 lr_s=0.5, teacher=copy.deepcopy(teacher),
                                 student=copy.deepcopy(student))
        errs[where] = rel_err(got, exact)
    assert errs["separate"] < 1e-8 and errs["joint"] > 1e-3, errs


def test_ce_old_forward_changes_nothing_without_batchnorm():
    b = batch(26)
    out = {}
    for where in ("separate", "joint"):
        cfg = MPLConfig(pseudo_labels="argmax", uda_weight=1.0, ce_old_forward=where)
        step = make_step(cfg, seed=27, fixed_labels=torch.tensor([1, 2, 0, 1]))
        m = step(b)
        out[where] = (teacher_grad(step), torch.cat([p.flatten() for p in
                                                     step.student.parameters()]),
                      torch.stack([m["h"], m["student/ce_old"], m["student/loss"]]))
    for a, c in zip(out["separate"], out["joint"]):
        assert torch.allclose(a, c, rtol=1e-12, atol=1e-14)


def test_presets_ce_old_forward():
    assert preset("paper").ce_old_forward == "separate"
    assert preset("official").ce_old_forward == "joint"  # as the released code
    assert preset("kekmodel").ce_old_forward == "joint"  # as the PyTorch port


def test_uda_and_metrics():
    b = batch(15)
    cfg = preset("paper", uda_weight=8.0, uda_temperature=0.7, uda_threshold=0.0,
                 uda_ramp_steps=10, teacher_label_smoothing=0.15)
    step = make_step(cfg)
    m = step(b, step=4)
    assert float(m["uda/scale"]) == pytest.approx(8.0 * 5 / 10)
    assert float(m["uda/mask_ratio"]) == 1.0 and float(m["teacher/uda"]) > 0
    for key in ("teacher/loss", "student/loss", "student/ce_old", "student/ce_new", "h",
                "baseline", "lr/teacher", "lr/student"):
        assert torch.isfinite(torch.as_tensor(m[key])), key


def test_pseudo_accuracy_says_how_often_the_students_labels_are_right():
    """With the unlabeled images' true labels (MPLBatch.y_u), the step logs the share of its
    pseudo labels that are right; without them, nothing. Labels fixed here: 3 of 4 right."""
    b = batch(16)
    labels = torch.tensor([0, 1, 2, 0])
    assert "pseudo/accuracy" not in make_step(preset("paper"), fixed_labels=labels)(b, step=0)
    b.y_u = torch.tensor([0, 1, 2, 1])
    m = make_step(preset("paper"), fixed_labels=labels)(b, step=0)
    assert float(m["pseudo/accuracy"]) == pytest.approx(0.75)
    # argmax labels are the teacher's top class on the pseudo-label view (the strong one)
    step = make_step(preset("paper", pseudo_labels="argmax"))
    with torch.no_grad():
        top = step.teacher(b.x_us).argmax(dim=1)
    b.y_u = top
    assert float(step(b, step=0)["pseudo/accuracy"]) == 1.0
    b.y_u = (top + 1) % C
    assert float(make_step(preset("paper", pseudo_labels="argmax"))(b, step=0)[
        "pseudo/accuracy"]) == 0.0


def test_pseudo_accuracy_of_soft_targets_is_the_true_class_probability():
    from mpl_fast.mpl.step import pseudo_label_accuracy

    probs = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.1, 0.8]])
    truth = torch.tensor([1, 2])
    assert float(pseudo_label_accuracy(None, probs, truth)) == pytest.approx(0.55)
    assert float(pseudo_label_accuracy(torch.tensor([1, 0]), probs, truth)) == 0.5


def test_autocast_bf16_step_close_to_fp32():
    b = batch(16)
    to32 = lambda t: t.float()  # noqa: E731
    b32 = MPLBatch(to32(b.x_l), b.y_l, to32(b.x_uw), to32(b.x_us))
    results = []
    for dtype in (None, torch.bfloat16):
        teacher, student = mlp(17).float(), mlp(117).float()
        step = MPLStep(teacher, student, torch.optim.SGD(teacher.parameters(), lr=0.1),
                       torch.optim.SGD(student.parameters(), lr=0.1),
                       MPLConfig(pseudo_labels="argmax", baseline_decay=None),
                       autocast_dtype=dtype)
        results.append(step(b32))
    for key in ("teacher/loss", "student/loss", "student/ce_new"):
        first, second = float(results[0][key]), float(results[1][key])
        assert abs(first - second) < 0.05 * abs(first) + 1e-2


@pytest.mark.parametrize("bad", [
    dict(estimator="second_order"),  # needs soft labels
    dict(pseudo_labels="soft"),  # zero-gradient score term
    dict(feedback_sign=0), dict(baseline_decay=1.0), dict(fd_eps=0.0), dict(estimator="x"),
    dict(ce_old_forward="both"),
    # a NaN passes every range test; an infinite weight, temperature or step is no setting
    dict(grad_clip=float("nan")), dict(mpl_weight=float("inf")), dict(fd_eps=float("inf")),
    dict(pseudo_label_temperature=float("inf")), dict(uda_weight=float("nan")),
])
def test_config_rejects_bad_values(bad):
    with pytest.raises(ValueError, match="mpl\\."):
        MPLConfig(**bad)


@pytest.mark.parametrize("key, value, message", [
    ("baseline_decay", "none", "must be a number or null, got 'none'"),
    ("mpl_weight", "2", "must be a number, got '2'"),
    ("uda_ramp_steps", 1.5, "must be an integer"),
    ("feedback_sign", True, "must be an integer"),
    ("teacher_weak_no_grad", 1, "must be true, false, auto, joint or shared, got 1"),
    ("teacher_weak_no_grad", "yes", "must be true, false, auto, joint or shared, got 'yes'"),
    ("estimator", 3, "must be a string"),
])
def test_config_names_the_key_of_a_value_of_the_wrong_type(key, value, message):
    with pytest.raises(ValueError, match=f"mpl.{key}: {message}"):
        MPLConfig(**{key: value})
    assert MPLConfig(baseline_decay=None, mpl_weight=2).mpl_weight == 2  # ints are numbers


def test_the_step_refuses_networks_and_batches_that_would_train_wrong_or_fail_obscurely():
    """Optimizers passed in swapped order trained silently wrong; one network as both was
    accepted; views of different sizes failed inside torch.split."""
    teacher, student = mlp(1), mlp(2)
    t_opt = torch.optim.SGD(teacher.parameters(), lr=0.1)
    s_opt = torch.optim.SGD(student.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="teacher_opt holds parameters that are not the teacher"):
        MPLStep(teacher, student, s_opt, t_opt)
    with pytest.raises(ValueError, match="student_opt holds parameters that are not the student"):
        MPLStep(teacher, student, t_opt, torch.optim.SGD(teacher.parameters(), lr=0.1))
    with pytest.raises(ValueError, match="share parameters"):
        MPLStep(teacher, teacher, t_opt, t_opt)
    # an optimizer over part of its network (a frozen layer) is the user's choice
    MPLStep(teacher, student, t_opt, torch.optim.SGD(student[0].parameters(), lr=0.1))
    step = MPLStep(teacher, student, t_opt, s_opt, MPLConfig(uda_weight=1.0))
    good = batch(3)
    before = [p.detach().clone() for p in [*teacher.parameters(), *student.parameters()]]
    bad = [MPLBatch(good.x_l, good.y_l, good.x_uw, good.x_us[:-1]),
           MPLBatch(good.x_l, good.y_l[:-1], good.x_uw, good.x_us),
           MPLBatch(good.x_l, good.y_l, good.x_uw, good.x_us, teacher_uw=good.x_uw)]
    for b, says in zip(bad, ("x_uw and x_us", "y_l must hold one label a row",
                             "teacher_uw and teacher_us")):
        with pytest.raises(ValueError, match=says):
            step(b)
    after = [*teacher.parameters(), *student.parameters()]
    assert all(torch.equal(x, y) for x, y in zip(before, after))  # refused before any update
    step(good)  # and the good batch trains
    assert not torch.equal(before[0], next(teacher.parameters()))


def test_teacher_supervised_weight_zero_leaves_only_the_meta_gradient():
    b = batch(17)
    teacher, student = mlp(18), mlp(118)
    exact = exact_soft_meta_grad(teacher, student, b, lr=0.5)
    step = make_step(SECOND_ORDER.replace(fd_eps=1e-5, teacher_supervised_weight=0.0), lr_s=0.5,
                     teacher=copy.deepcopy(teacher), student=copy.deepcopy(student))
    step(b)
    assert rel_err(teacher_grad(step), exact) < 1e-8


def test_teacher_weak_view_without_autograd():
    """Same step without autograd on the weak view: BN counted once (from labeled + strong), and
    with a BN-free teacher exactly the same teacher gradient."""
    b = batch(19)
    cfg = MPLConfig(pseudo_labels="argmax", baseline_decay=None, uda_weight=2.0,
                    uda_temperature=0.7)
    grads = []
    for no_grad in (False, True):
        step = make_step(cfg.replace(teacher_weak_no_grad=no_grad), seed=20)
        step(b)
        grads.append(teacher_grad(step))
    assert torch.allclose(grads[0], grads[1], rtol=1e-10, atol=1e-12)
    teacher = mlp(21, bn=True)
    expected = copy.deepcopy(teacher)
    with torch.no_grad():
        expected(torch.cat([b.x_l, b.x_us]))
    step = make_step(cfg.replace(teacher_weak_no_grad=True), teacher=teacher)
    step(b)
    for name, buf in step.teacher.named_buffers():
        assert torch.equal(buf, dict(expected.named_buffers())[name]), name


def test_what_counts_as_a_network_with_batch_statistics():
    """'auto' runs the teacher's weak view apart only where no layer looks across the batch or
    keeps running statistics: batch-independent layers pass, anything with running statistics
    does not (compiled or wrapped networks included)."""
    from mpl_fast.mpl.bn import uses_batch_statistics
    from mpl_fast.mpl.reduced import ReducedTeacher

    class RunningVar(nn.Module):  # EvoNorm-B0's kind: not a BatchNorm, keeps running_var
        def __init__(self):
            super().__init__()
            self.register_buffer("running_var", torch.ones(8))

    free = [mlp(1), nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8)),
            nn.Sequential(nn.Conv2d(3, 8, 3), nn.GroupNorm(2, 8)), nn.InstanceNorm2d(8),
            ReducedTeacher(10)]
    batched = [mlp(1, bn=True), nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)),
               nn.SyncBatchNorm(8), nn.InstanceNorm2d(8, track_running_stats=True),
               nn.Sequential(nn.Linear(4, 8), RunningVar()),
               torch.compile(mlp(1, bn=True))]
    assert [uses_batch_statistics(m) for m in free] == [False] * len(free)
    assert [uses_batch_statistics(m) for m in batched] == [True] * len(batched)


@pytest.mark.parametrize("bn", [False, True], ids=["bn_free", "bn"])
def test_auto_weak_view_without_autograd_only_where_it_changes_nothing(bn):
    """The default 'auto': a BatchNorm-free teacher gets the weak view without autograd (the
    same teacher gradient as the joint forward's), a teacher with BatchNorm the joint forward
    (the same gradient and running statistics as teacher_weak_no_grad false)."""
    b = batch(23)
    cfg = MPLConfig(pseudo_labels="argmax", baseline_decay=None, uda_weight=2.0,
                    uda_temperature=0.7)
    assert cfg.teacher_weak_no_grad == "auto"
    steps = {}
    for setting in ("auto", False, True):
        steps[setting] = make_step(cfg.replace(teacher_weak_no_grad=setting),
                                   teacher=mlp(24, bn=bn))
        steps[setting](b)
    assert steps["auto"].weak_no_grad is (not bn)
    assert [steps[s].weak_no_grad for s in (False, True)] == [False, True]
    same_as = steps[True] if not bn else steps[False]
    assert torch.allclose(teacher_grad(steps["auto"]), teacher_grad(same_as), rtol=1e-10,
                          atol=1e-12)
    for (name, buf), other in zip(steps["auto"].teacher.named_buffers(),
                                  same_as.teacher.buffers()):
        assert torch.equal(buf, other), name
    if bn:  # and not the same as the weak view apart, which a BN teacher computes otherwise
        assert not torch.allclose(teacher_grad(steps["auto"]), teacher_grad(steps[True]))


@pytest.mark.parametrize("bn", [False, True], ids=["bn_free", "bn"])
@pytest.mark.parametrize("uda_weight, view, weak_forwards", [
    (0.0, "strong", 0), (1.0, "strong", 1), (0.0, "weak", 1)])
def test_a_weak_view_nothing_reads_is_not_computed(bn, uda_weight, view, weak_forwards):
    """With the weak view apart, no UDA and pseudo labels from the strong view, the teacher
    runs no forward on it at all, and the step is the one that ran it without autograd."""
    b = batch(25)
    cfg = MPLConfig(pseudo_labels="argmax", baseline_decay=None, uda_weight=uda_weight,
                    pseudo_label_view=view, teacher_weak_no_grad=True)
    steps = []
    for skip in (True, False):
        step = make_step(cfg, teacher=mlp(26, bn=bn))
        step.weak_view_read = not skip or step.weak_view_read  # False: the weak forward runs
        rows = []
        step.teacher.register_forward_hook(lambda m, args, out: rows.append(args[0].shape[0]))
        step(b)
        steps.append((step, rows))
    (skipped, rows), (ran, ran_rows) = steps
    assert ran_rows == [B + U, U]
    assert rows == [B + U] + [U] * weak_forwards
    assert torch.allclose(teacher_grad(skipped), teacher_grad(ran), rtol=1e-10, atol=1e-12)
    for buf, other in zip(skipped.teacher.buffers(), ran.teacher.buffers()):
        assert torch.equal(buf, other)


def test_moving_baseline_values_and_device():
    from mpl_fast.mpl.feedback import MovingBaseline

    base = MovingBaseline(0.9)
    out = [float(base(torch.tensor(h))) for h in (1.0, 1.0, -2.0)]
    b1 = 0.1
    b2 = b1 + 0.1 * (1.0 - b1)
    b3 = b2 + 0.1 * (-2.0 - b2)
    assert out == pytest.approx([1.0 - b1, 1.0 - b2, -2.0 - b3])
    assert float(base.value) == pytest.approx(b3)
    # The buffer follows the feedback's device (a GPU step whose MPLStep was never .to()'d);
    # "meta" stands in for a second device on a CPU-only machine.
    centered = base(torch.zeros((), device="meta"))
    assert base.value.device.type == "meta" and centered.device.type == "meta"
    assert "value" in dict(base.named_buffers())


@pytest.mark.parametrize("config", [
    MPLConfig(pseudo_labels="argmax", uda_weight=1.0),
    MPLConfig(pseudo_labels="argmax", estimator="dot"),
    MPLConfig(pseudo_labels="soft", estimator="second_order", baseline_decay=None),
    MPLConfig(pseudo_labels="argmax", teacher_weak_no_grad=True),
], ids=["loss_diff", "dot", "second_order", "weak_no_grad"])
def test_step_runs_on_another_device_without_cpu_state_leaking_in(config):
    # "meta" stands in for a GPU: every tensor the step computes must come out on the models'
    # device (a CPU buffer mixed into GPU math costs a copy each step, or fails); only the
    # host-side schedule values (uda/scale, the lrs) are CPU scalars.
    dev = torch.device("meta")

    def net():
        return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                             nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10)).to(dev)

    teacher, student = net(), net()
    step = MPLStep(teacher, student, torch.optim.SGD(teacher.parameters(), lr=0.1, momentum=0.9),
                   torch.optim.SGD(student.parameters(), lr=0.1, momentum=0.9), config)
    b = MPLBatch(torch.empty(4, 3, 8, 8, device=dev), torch.zeros(4, dtype=torch.long, device=dev),
                 torch.empty(8, 3, 8, 8, device=dev), torch.empty(8, 3, 8, 8, device=dev))
    for i in range(2):
        metrics = step(b, i)
    host = {"uda/scale", "lr/teacher", "lr/student"}
    assert {k for k, v in metrics.items() if v.device != dev} == host
    assert all(buf.device == dev for buf in step.buffers())
