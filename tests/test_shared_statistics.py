"""The teacher's weak view apart, normalised with the labeled + strong forward's batch statistics
(mpl_fast.mpl.shared_statistics, mpl.teacher_weak_no_grad=shared)."""
import copy

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from mpl_fast.mpl.shared_statistics import SharedStatistics
from mpl_fast.mpl.step import teacher_views
from tests.test_constant_rows import Net, _images, _mpl_batch, _mpl_step


def _recorded_then_applied(net, x, x_apart):
    """(training forward of x, forward of x_apart with x's statistics, buffers after both)."""
    shared = SharedStatistics()
    with shared.recorded():
        z = net(x)
    with torch.no_grad(), shared.applied(net):
        z_apart = net(x_apart)
    return z, z_apart, [b.clone() for b in net.buffers()]


def test_rows_normalised_with_their_batchs_statistics_are_that_batchs_rows():
    """A row's output depends on its batch only through the statistics: normalised with a
    batch's statistics, any of that batch's rows (fewer, reordered) come out as in that batch's
    own forward; the training forward itself is torch's, values and running statistics."""
    torch.manual_seed(1)
    net = Net().double().train()
    x = _images(9, seed=2)
    plain = copy.deepcopy(net)
    want = plain(x)
    z, z_apart, buffers = _recorded_then_applied(net, x, x[[7, 2, 5]])
    assert torch.equal(z, want)
    assert torch.allclose(z_apart, want[[7, 2, 5]], rtol=1e-12, atol=1e-12)
    for got, expected in zip(buffers, plain.buffers()):  # the running statistics moved once
        assert torch.equal(got, expected)


@pytest.mark.parametrize("name", ["resnet18d", "efficientnet_b0", "densenet121"])
def test_timm_networks_record_each_batch_norm_and_apply_it(name):
    """timm's own normalisation layers (BatchNormAct2d in EfficientNet, BN in DenseNet's
    concatenating blocks) reach F.batch_norm too: the same property as above, every layer
    counted (not in CI, which has no timm)."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(21)
    net = timm.create_model(name, num_classes=10).double().train()
    n_layers = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in net.modules())
    x = torch.randn(6, 3, 64, 64, dtype=torch.double)
    plain = copy.deepcopy(net)
    want = plain(x)
    z, z_apart, buffers = _recorded_then_applied(net, x, x[[4, 1]])
    assert torch.equal(z, want)
    assert torch.allclose(z_apart, want[[4, 1]], rtol=1e-10, atol=1e-10)
    for got, expected in zip(buffers, plain.buffers()):
        assert torch.equal(got, expected)
    with SharedStatistics().recorded() as recording:  # every layer counted
        net(x)
    assert len(recording.statistics) == n_layers > 10


def test_the_forward_apart_is_not_normalised_with_its_own_statistics():
    """The weak view's rows differ from the forward of that view alone (its own statistics,
    mpl.teacher_weak_no_grad=true), and from a joint forward of all the rows."""
    torch.manual_seed(3)
    net = Net().double().train()
    x, x_apart = _images(8, seed=4), _images(5, seed=5) * 2 + 1
    _, z_apart, _ = _recorded_then_applied(copy.deepcopy(net), x, x_apart)
    with torch.no_grad():
        own = copy.deepcopy(net)(x_apart)
        joint = copy.deepcopy(net)(torch.cat([x, x_apart]))[8:]
    assert (z_apart - own).abs().max() > 1e-2 and (z_apart - joint).abs().max() > 1e-2


def test_teacher_views_shared_is_true_but_for_the_weak_logits():
    """'shared': the labeled and strong logits, their gradient and the BN running statistics of
    the forward apart (true), exactly; the weak logits those of the weak rows normalised with
    the labeled + strong batch's statistics; the same counted work as true."""
    torch.manual_seed(6)
    net = Net().double().train()
    b = _mpl_batch(7)
    b = type(b)(b.x_l.double(), b.y_l, b.x_uw.double(), b.x_us.double())

    def views(setting):
        teacher = copy.deepcopy(net)
        z_l, z_uw, z_us = teacher_views(teacher, b, setting)
        (z_l.logsumexp(1).sum() + z_us[:, 0].sum()).backward()
        grads = [p.grad for p in teacher.parameters()]
        return z_l, z_uw, z_us, grads, list(teacher.buffers())

    got, apart = views("shared"), views(True)
    for a, b_ in zip(got[3] + got[4], apart[3] + apart[4]):
        assert torch.equal(a, b_)
    assert torch.equal(got[0], apart[0]) and torch.equal(got[2], apart[2])
    assert not got[1].requires_grad
    head = torch.cat([b.x_l, b.x_us])
    _, want, _ = _recorded_then_applied(copy.deepcopy(net), head, b.x_uw)
    assert torch.allclose(got[1], want, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(got[1], apart[1], rtol=1e-3, atol=1e-3)

    def flops(setting):
        with FlopCounterMode(display=False) as counter:
            views(setting)
        return counter.get_total_flops()
    assert flops("shared") == flops(True) < flops(False)


def test_a_network_that_normalises_another_number_of_times_is_refused():
    """The n-th BatchNorm of the forward apart takes the n-th recorded statistics: a forward
    that calls BatchNorm more or fewer times than the recorded one (control flow on the batch)
    stops with a RuntimeError instead of normalising with another layer's statistics."""
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.BatchNorm1d(3), nn.BatchNorm1d(3)

        def forward(self, x):
            x = self.a(x)
            return self.b(x) if x.shape[0] > 4 else x

    for recorded, apart, match in ((6, 3, "normalised 1 times, the recorded one 2"),
                                   (3, 6, "normalises more often than the recorded one")):
        shared = SharedStatistics()
        net = Branchy().train()
        with shared.recorded():
            net(torch.randn(recorded, 3))
        with pytest.raises(RuntimeError, match=match), torch.no_grad(), shared.applied(net):
            net(torch.randn(apart, 3))


def test_checkpointed_blocks_record_once_and_give_the_plain_networks_views():
    """A checkpointed teacher (model.checkpoint): the recomputation in backward runs under the
    recording mode again (CheckpointedBlock re-enters it) but records nothing more, so the
    statistics, views, gradients and buffers are the plain network's."""
    from mpl_fast.models.checkpointing import checkpoint_blocks
    from mpl_fast.models.wrn import WideResNet

    torch.manual_seed(8)
    plain = WideResNet(5, depth=10, widen=1).double().train()
    ckpt = copy.deepcopy(plain)
    assert checkpoint_blocks(ckpt) > 0
    x, x_apart = _images(6, seed=9), _images(4, seed=10)
    results = []
    for net in (plain, ckpt):
        shared = SharedStatistics()
        with shared.recorded():
            z = net(x)
        z.square().sum().backward()
        recorded = len(shared.statistics)
        with torch.no_grad(), shared.applied(net):
            z_apart = net(x_apart)
        results.append((recorded, z, z_apart, [p.grad for p in net.parameters()],
                        list(net.buffers())))
    (n0, *plain_results), (n1, *ckpt_results) = results
    assert n0 == n1 == sum(isinstance(m, nn.BatchNorm2d) for m in plain.modules())
    for a, b in zip(plain_results[:2], ckpt_results[:2]):
        assert torch.equal(a, b)
    for a, b in zip(plain_results[2] + plain_results[3], ckpt_results[2] + ckpt_results[3]):
        assert torch.allclose(a.double(), b.double(), rtol=1e-12, atol=1e-12)


def test_mpl_step_shared_and_the_settings_around_it():
    """The step resolves and checks 'shared' as 'joint' (the forward apart for a teacher
    without batch statistics; SyncBatchNorm refused), and its metrics are true's where the
    weak view does not enter (the labeled loss) and not where it does (UDA)."""
    torch.manual_seed(11)
    teacher, student = Net(), Net()
    assert _mpl_step("shared", teacher, student).weak_no_grad == "shared"
    plain = nn.Sequential(nn.Flatten(), nn.Linear(108, 5))
    assert _mpl_step("shared", plain, student).weak_no_grad is True
    sync = nn.Sequential(nn.Conv2d(3, 4, 1), nn.SyncBatchNorm(4), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(4, 5))
    with pytest.raises(ValueError, match="mpl.teacher_weak_no_grad=shared: SyncBatchNorm"):
        _mpl_step("shared", sync, student)
    b = _mpl_batch(12)
    metrics = {s: _mpl_step(s, teacher, student)(b, 0) for s in ("shared", True)}
    assert torch.equal(metrics["shared"]["teacher/ce_labeled"], metrics[True]["teacher/ce_labeled"])
    assert not torch.allclose(metrics["shared"]["teacher/uda"], metrics[True]["teacher/uda"])


def test_config_takes_shared():
    from mpl_fast.mpl import MPLConfig
    from mpl_fast.train import config as cfg

    assert MPLConfig(teacher_weak_no_grad="shared").teacher_weak_no_grad == "shared"
    key = "mpl.teacher_weak_no_grad"
    assert cfg.get(cfg.load("digits", [f"{key}=shared"]), key) == "shared"
    with pytest.raises(cfg.ConfigError, match=f"{key}=shared does not go with train.sync_bn"):
        cfg.load("digits", [f"{key}=shared", "train.sync_bn=true"])


def test_bf16_autocast_keeps_the_dtype_and_stays_near_float32():
    torch.manual_seed(13)
    net = Net().train()
    x, x_apart = _images(10, seed=14).float(), _images(4, seed=15).float()
    _, want, _ = _recorded_then_applied(copy.deepcopy(net), x, x_apart)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z, got, _ = _recorded_then_applied(copy.deepcopy(net), x, x_apart)
    assert got.dtype == z.dtype
    assert torch.allclose(got.float(), want, rtol=0.05, atol=0.05)
    # a bf16 input normalised in float32 and rounded once, as torch's BatchNorm does
    bn = nn.BatchNorm1d(16).train()
    with torch.no_grad():
        bn.weight.uniform_(0.5, 2), bn.bias.uniform_(-1, 1)
    x, x_apart = (torch.randn(rows, 16).mul(3).add(1).bfloat16() for rows in (64, 64))
    _, want, _ = _recorded_then_applied(copy.deepcopy(bn), x.float(), x_apart.float())
    z, got, _ = _recorded_then_applied(copy.deepcopy(bn), x, x_apart)
    assert z.dtype == got.dtype == torch.bfloat16
    assert torch.allclose(got.float(), want, rtol=2 ** -8, atol=1e-6)


@pytest.mark.slow
def test_compiled_teacher_gives_the_eager_views():
    """model.compile: dynamo traces both modes (the statistics recorded in the compiled
    training forward, applied in the compiled forward apart; no graph break): the eager views,
    gradient and buffers."""
    from torch._dynamo.utils import counters

    from mpl_fast.models.compiling import compile_net
    from mpl_fast.models.wrn import WideResNet
    from mpl_fast.mpl import MPLBatch

    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(19)
    net = WideResNet(5, depth=10, widen=1).train()
    g = torch.Generator().manual_seed(20)
    x = lambda n: torch.randn(n, 3, 16, 16, generator=g)  # noqa: E731
    b = MPLBatch(x(4), torch.randint(0, 5, (4,), generator=g), x(6), x(6))
    results = []
    for compiled in (False, True):
        teacher = copy.deepcopy(net)
        if compiled:
            compile_net(teacher, "default")
        for _ in range(2):  # the second call runs the compiled code without compiling
            teacher.zero_grad()
            z_l, z_uw, z_us = teacher_views(teacher, b, "shared")
            (z_l.logsumexp(1).sum() + z_us[:, 0].sum()).backward()
        results.append([z_l, z_uw, z_us] + [p.grad for p in teacher.parameters()]
                       + list(teacher.buffers()))
    assert counters["stats"]["unique_graphs"] >= 2 and not counters["graph_break"]
    for a, b_ in zip(*results):
        assert torch.allclose(a.float(), b_.float(), rtol=1e-4, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_on_a_gpu_the_views_are_the_cpus(channels_last):
    """The CUDA path (native_batch_norm's statistics on the GPU, cuDNN's convolutions) against
    the float64 CPU one, and bf16 autocast near it, in the memory layout the trainer uses."""
    torch.manual_seed(16)
    net = Net().double().train()
    x, x_apart = _images(11, seed=17), _images(5, seed=18)
    want, want_apart, _ = _recorded_then_applied(copy.deepcopy(net), x, x_apart)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    gpu = copy.deepcopy(net).float().cuda().to(memory_format=fmt)
    on_gpu = [t.float().cuda().contiguous(memory_format=fmt) for t in (x, x_apart)]
    got, got_apart, _ = _recorded_then_applied(copy.deepcopy(gpu), *on_gpu)
    assert torch.allclose(got.double().cpu(), want, rtol=1e-4, atol=1e-5)
    assert torch.allclose(got_apart.double().cpu(), want_apart, rtol=1e-4, atol=1e-5)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        _, half_apart, _ = _recorded_then_applied(copy.deepcopy(gpu), *on_gpu)
    assert half_apart.dtype == torch.bfloat16
    assert torch.allclose(half_apart.double().cpu(), want_apart, rtol=0.05, atol=0.05)
