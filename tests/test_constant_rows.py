"""The weak view's rows constant in the teacher's joint forward (mpl_fast.mpl.constant_rows,
mpl.teacher_weak_no_grad=joint): the joint forward's values and BatchNorm statistics, a backward
without those rows."""
import copy

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from mpl_fast.mpl import MPLBatch, MPLConfig, MPLStep
from mpl_fast.mpl.constant_rows import check_network, constant_rows


class Net(nn.Module):
    """Every layer kind the mode handles: convolutions with and without bias (and with
    padding='same', which runs as two halves joined), BatchNorm with and without affine
    parameters (2d and 1d), a residual add, a linear head."""

    def __init__(self, classes=5):
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(6)
        self.conv = nn.Conv2d(6, 6, 3, padding="same")
        self.bn2 = nn.BatchNorm2d(6, affine=False, momentum=None)  # cumulative average
        self.fc1 = nn.Linear(6, 7)
        self.bn3 = nn.BatchNorm1d(7)
        self.head = nn.Linear(7, classes)

    def forward(self, x):
        x = torch.relu(self.bn1(self.stem(x)))
        x = torch.relu(x + self.bn2(self.conv(x)))
        x = torch.relu(self.bn3(self.fc1(x.mean((2, 3)))))
        return self.head(x)


def _images(rows, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, 3, 6, 6, generator=g, dtype=torch.float64)


def _loss(z, head):
    return z[:head].logsumexp(1).mean() + z[:head, 0].square().mean()


def _run(net, x, constant, head=None):
    """(logits, parameter gradient, buffers) of one forward + backward of _loss on the first
    `head` rows (default: the rows that are not constant)."""
    net.zero_grad()
    if constant:
        with constant_rows(x.shape[0], constant):
            z = net(x)
    else:
        z = net(x)
    _loss(z, head or x.shape[0] - constant).backward()
    grad = torch.cat([p.grad.flatten() for p in net.parameters()])
    return z.detach(), grad, [b.clone() for b in net.buffers()]


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_values_and_running_statistics_are_the_joint_forwards(train):
    torch.manual_seed(0)
    net = Net().double().train(train)
    x = _images(13, seed=1)
    for _ in range(2):  # the cumulative average needs two updates to tell a wrong count
        plain, mode = copy.deepcopy(net), copy.deepcopy(net)
        z, _, buffers = _run(plain, x, 0)
        z_c, _, buffers_c = _run(mode, x, 5)
        assert torch.allclose(z_c, z, rtol=1e-12, atol=1e-12)
        for b, b_c in zip(buffers, buffers_c):
            assert torch.allclose(b_c.double(), b.double(), rtol=1e-12, atol=1e-12)
        net = mode
    if not train:  # no batch statistics: only convolutions split, and nothing else changes
        grad = _run(copy.deepcopy(net), x, 0, head=8)[1]
        assert torch.allclose(_run(copy.deepcopy(net), x, 5)[1], grad, rtol=1e-10, atol=1e-12)


def test_gradient_is_the_joint_forwards_where_the_constant_rows_repeat_the_others():
    """Constant rows repeating the others (the same images, each once): the batch statistics are
    those of the others alone for every weight, so the joint forward's exact gradient is the
    gradient of a forward without the constant rows; with other constant rows it is not."""
    torch.manual_seed(2)
    net = Net().double().train()
    head = _images(7, seed=3)
    joint = _run(copy.deepcopy(net), torch.cat([head, head]), 0, head=7)[1]
    mode = _run(copy.deepcopy(net), torch.cat([head, head]), 7)[1]
    assert torch.allclose(mode, joint, rtol=1e-10, atol=1e-12)
    other = torch.cat([head, _images(7, seed=4)])
    assert not torch.allclose(_run(copy.deepcopy(net), other, 7)[1],
                              _run(copy.deepcopy(net), other, 0, head=7)[1], rtol=1e-3)


@pytest.mark.parametrize("affine", [True, False])
def test_batchnorm_gradient_is_that_of_the_rows_own_statistics_moved_onto_the_whole_batchs(affine):
    """The definition, written with torch's BatchNorm: the other rows normalised with their own
    statistics, then scaled and shifted by constants onto the whole batch's normalisation."""
    g = torch.Generator().manual_seed(15)
    x = torch.randn(9, 4, 3, 3, generator=g, dtype=torch.float64) * 2 + 1
    x[6:] = x[6:] * 3 - 2  # constant rows that do not look like the others
    weight = torch.randn(4, generator=g, dtype=torch.float64) if affine else None
    bias = torch.randn(4, generator=g, dtype=torch.float64) if affine else None
    probe = torch.randn(6, 4, 3, 3, generator=g, dtype=torch.float64)
    eps = 1e-5

    def grads(y_head, leaves):
        return torch.autograd.grad((y_head * probe).sum(), leaves)

    leaves = [t.clone().requires_grad_() for t in (x, weight, bias) if t is not None]
    x_in, params = leaves[0], (leaves[1:] or [None, None])
    with constant_rows(9, 3):
        y = torch.nn.functional.batch_norm(x_in, None, None, *params, True, 0.1, eps)
    got = grads(y[:6], leaves)

    ref_leaves = [t.clone().requires_grad_() for t in (x, weight, bias) if t is not None]
    x_ref, ref_params = ref_leaves[0], (ref_leaves[1:] or [None, None])
    with torch.no_grad():
        var_all, mean_all = torch.var_mean(x, dim=(0, 2, 3), correction=0)
        var_head, mean_head = torch.var_mean(x[:6], dim=(0, 2, 3), correction=0)
        scale = ((var_head + eps) / (var_all + eps)).sqrt()
        shift = (mean_head - mean_all) / (var_all + eps).sqrt()
    w_ref = scale if weight is None else ref_params[0] * scale
    b_ref = shift if weight is None else ref_params[0] * shift + ref_params[1]
    y_ref = torch.nn.functional.batch_norm(x_ref[:6], None, None, w_ref, b_ref, True, 0.0, eps)
    want = grads(y_ref, ref_leaves)
    assert torch.allclose(y[:6], y_ref, rtol=1e-10, atol=1e-12)
    for a, b in zip(got, want):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-12)
    assert not got[0][6:].any()


def test_no_gradient_reaches_the_weights_through_the_constant_rows():
    torch.manual_seed(5)
    net = Net().double().train()
    x = _images(9, seed=6)
    with constant_rows(9, 4):
        z = net(x)
    params = list(net.parameters())
    grads = torch.autograd.grad(z[5:].square().sum(), params, allow_unused=True,
                                retain_graph=True)
    assert all(g is None or not g.any() for g in grads)
    grads = torch.autograd.grad(z[:5].square().sum(), params, allow_unused=True)
    assert all(g is not None and g.any() for g in grads)


def _flops(fn):
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def test_the_backward_skips_the_constant_rows():
    """Counted work: the mode's forward and backward cost a forward of every row plus the
    backward of the other rows alone."""
    torch.manual_seed(7)
    net = Net().double().train()
    x = _images(12, seed=8)

    def step(rows, constant=0, backward=True):
        def run():
            if constant:
                with constant_rows(rows.shape[0], constant):
                    z = net(rows)
            else:
                z = net(rows)
            if backward:
                _loss(z, rows.shape[0] - constant).backward()
        return run

    forward_all = _flops(step(x, backward=False))
    backward_head = _flops(step(x[:7])) - _flops(step(x[:7], backward=False))
    assert _flops(step(x, constant=5)) == forward_all + backward_head
    assert _flops(step(x)) > forward_all + backward_head


def test_mode_arguments_and_networks_it_refuses():
    with pytest.raises(ValueError, match="constant must be in"):
        constant_rows(4, 4)
    with pytest.raises(ValueError, match="constant must be in"):
        constant_rows(4, -1)
    check_network(Net(), "x")  # BatchNorm, convolutions, linear layers: fine
    with pytest.raises(ValueError, match="x: SyncBatchNorm"):
        check_network(nn.Sequential(nn.Conv2d(3, 4, 1), nn.SyncBatchNorm(4)), "x")
    with pytest.raises(ValueError, match=r"1 \(InstanceNorm2d\) keeps batch statistics"):
        check_network(nn.Sequential(nn.Conv2d(3, 4, 1),
                                    nn.InstanceNorm2d(4, track_running_stats=True)), "x")
    from mpl_fast.models.checkpointing import checkpoint_blocks
    from mpl_fast.models.registry import build_model

    wrn = build_model("wrn28_2", 10, image_size=32)
    checkpoint_blocks(wrn, limit=1)
    check_network(wrn, "x")  # recomputed under the mode (tests/test_checkpointing.py)


def _mpl_batch(seed, n_l=4, n_u=6):
    g = torch.Generator().manual_seed(seed)
    x = lambda n: torch.randn(n, 3, 6, 6, generator=g)  # noqa: E731
    return MPLBatch(x(n_l), torch.randint(0, 5, (n_l,), generator=g), x(n_u), x(n_u))


def _mpl_step(setting, teacher, student, **config):
    teacher, student = copy.deepcopy(teacher), copy.deepcopy(student)
    return MPLStep(teacher, student, torch.optim.SGD(teacher.parameters(), lr=0.1),
                   torch.optim.SGD(student.parameters(), lr=0.1),
                   MPLConfig(pseudo_labels="argmax", uda_weight=1.0, uda_temperature=0.7,
                             teacher_weak_no_grad=setting, **config))


def test_mpl_step_with_the_weak_rows_constant():
    """teacher_weak_no_grad='joint': the joint forward's losses and BN statistics, the teacher's
    backward of the forward apart (the same counted work), a teacher update near the joint
    one's (without the teacher's supervised loss: all of it through the strong view's logits,
    UDA's and the feedback's, which must keep their gradient)."""
    torch.manual_seed(9)
    teacher, student = Net(), Net()
    b = _mpl_batch(10)
    steps = {s: _mpl_step(s, teacher, student, teacher_supervised_weight=0.0)
             for s in (False, "joint", True)}
    assert steps["joint"].weak_no_grad == "joint"
    metrics = {s: step(b, 0) for s, step in steps.items()}
    for key in ("teacher/ce_labeled", "teacher/uda", "uda/mask_ratio", "student/ce_old",
                "student/ce_new", "h", "teacher/loss"):
        assert torch.allclose(metrics["joint"][key], metrics[False][key], rtol=1e-5, atol=1e-6), key
    assert not torch.allclose(metrics[True]["teacher/ce_labeled"],
                              metrics[False]["teacher/ce_labeled"], rtol=1e-5, atol=1e-6)
    for (name, buf), other in zip(steps["joint"].teacher.named_buffers(),
                                  steps[False].teacher.buffers()):
        assert torch.allclose(buf.float(), other.float(), rtol=1e-5, atol=1e-6), name
    moved = {s: torch.cat([(p - q).flatten() for p, q in zip(step.teacher.parameters(),
                                                             teacher.parameters())])
             for s, step in steps.items()}
    cosine = torch.nn.functional.cosine_similarity(moved["joint"], moved[False], dim=0)
    assert cosine > 0.9 and moved["joint"].norm() > 0.5 * moved[False].norm()
    work = {s: _flops(lambda s=s: _mpl_step(s, teacher, student)(b, 0)) for s in steps}
    assert work["joint"] == work[True] < work[False]


def test_mpl_step_joint_setting_without_batch_statistics_runs_the_view_apart():
    """A teacher without batch statistics computes each row alike in any forward: 'joint' then
    takes the forward apart, which skips the weak rows' forward too."""
    plain = nn.Sequential(nn.Flatten(), nn.Linear(108, 5))
    step = _mpl_step("joint", plain, Net())
    assert step.weak_no_grad is True


def test_mpl_step_refuses_a_teacher_it_cannot_split():
    teacher = nn.Sequential(nn.Conv2d(3, 4, 1), nn.SyncBatchNorm(4), nn.AdaptiveAvgPool2d(1),
                            nn.Flatten(), nn.Linear(4, 5))
    with pytest.raises(ValueError, match="mpl.teacher_weak_no_grad=joint: SyncBatchNorm"):
        _mpl_step("joint", teacher, Net())


def test_config_takes_joint_and_names_the_choices():
    from mpl_fast.train import config as cfg

    assert MPLConfig(teacher_weak_no_grad="joint").teacher_weak_no_grad == "joint"
    with pytest.raises(ValueError, match="must be true, false, auto, joint or shared"):
        MPLConfig(teacher_weak_no_grad="apart")
    # a run's config: a later --set replaces an earlier one of another kind, and a wrong word
    # names the choices whatever came before it
    key = "mpl.teacher_weak_no_grad"
    assert cfg.get(cfg.load("digits", [f"{key}=true", f"{key}=joint"]), key) == "joint"
    assert cfg.get(cfg.load("digits", [f"{key}=joint", f"{key}=false"]), key) is False
    assert cfg.get(cfg.load("digits"), key) is None  # the preset's value
    with pytest.raises(cfg.ConfigError, match=f"{key}=joint does not go with train.sync_bn"):
        cfg.load("digits", [f"{key}=joint", "train.sync_bn=true"])
    for checkpointed in ("student", "teacher", "both"):
        cfg.load("digits", [f"{key}=joint", f"model.checkpoint={checkpointed}"])
    for before in ([], [f"{key}=true"]):
        with pytest.raises(cfg.ConfigError, match=key + r" must be one of \[False, True, 'auto', "
                           r"'joint', 'shared'\], got 'apart'"):
            cfg.load("digits", before + [f"{key}=apart"])


def test_bf16_autocast_stays_near_the_joint_forward():
    torch.manual_seed(11)
    net = Net().train()
    x = _images(10, seed=12).float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z = copy.deepcopy(net)(x)
        with constant_rows(10, 4):
            z_c = copy.deepcopy(net)(x)
    assert z_c.dtype == z.dtype
    assert torch.allclose(z_c.float(), z.float(), rtol=0.05, atol=0.05)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_on_a_gpu_the_gradient_is_the_cpus(channels_last):
    """The CUDA path (the head's statistics from batch_norm_stats, cuDNN's convolutions) against
    the float64 CPU one, and bf16 autocast near it."""
    torch.manual_seed(13)
    net = Net().double().train()
    x = _images(11, seed=14)
    _, want, want_buffers = _run(copy.deepcopy(net), x, 4)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    gpu = copy.deepcopy(net).float().cuda().to(memory_format=fmt)
    x_gpu = x.float().cuda().contiguous(memory_format=fmt)
    _, got, got_buffers = _run(gpu, x_gpu, 4)
    assert torch.allclose(got.double().cpu(), want, rtol=1e-3, atol=1e-4)
    for b, b_want in zip(got_buffers, want_buffers):
        assert torch.allclose(b.double().cpu(), b_want.double(), rtol=1e-4, atol=1e-5)
    gpu = copy.deepcopy(net).float().cuda().to(memory_format=fmt)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        _, got_bf16, _ = _run(gpu, x_gpu, 4)
    assert (got_bf16.double().cpu() - want).norm() < 0.05 * want.norm()
