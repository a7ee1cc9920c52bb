"""A step whose losses are not finite is skipped on the device (mpl_fast.mpl.nonfinite): the
flag, the optimizer step it guards, the MPL and supervised steps under it, the feedback's
baseline, data-parallel agreement, and the loop's count of skips."""
import copy

import pytest
import torch
from torch import nn

from mpl_fast.mpl import MPLBatch, MPLConfig, MPLStep, MovingBaseline, feedback, nonfinite
from mpl_fast.train.skipped_steps import SkippedSteps
from mpl_fast.train.supervised import SupervisedStep

from tests.seeds import generator
from tests.step_state import learned_state

NAN, INF = float("nan"), float("inf")


def test_flag_is_one_where_any_loss_is_not_finite():
    one = torch.tensor(1.0)
    assert float(nonfinite.flag(one, torch.tensor([2.0, 3.0]))) == 0.0
    for bad in (NAN, INF, -INF):
        got = nonfinite.flag(one, torch.tensor([2.0, bad]), one)
        assert got.dtype == torch.float32 and got.dim() == 0 and float(got) == 1.0
    assert float(nonfinite.flag(torch.tensor(NAN, dtype=torch.bfloat16))) == 1.0


def _params(seed, shapes=((3, 5), (7,), (2, 2, 3))):
    g = generator(("nonfinite", seed))
    return [nn.Parameter(torch.randn(*s, generator=g, dtype=torch.float64)) for s in shapes]


def _sgd(params, **kw):
    kw = {"lr": 0.1, "momentum": 0.9, "nesterov": True, "weight_decay": 1e-3, **kw}
    return torch.optim.SGD(params, fused=True, **kw)


def _grads(params, seed, poison=False):
    g = generator(("nonfinite", seed))
    for p in params:
        p.grad = torch.randn(p.shape, generator=g, dtype=p.dtype)
        if poison:
            p.grad.view(-1)[0] = NAN


@pytest.mark.parametrize("nesterov", [True, False])
def test_a_skipped_step_changes_nothing_and_a_kept_one_is_a_plain_step(nesterov):
    params, plain = _params(1), _params(1)
    opt, ref = _sgd(params, nesterov=nesterov), _sgd(plain, nesterov=nesterov)
    # skipped first: fused SGD would have left its new momentum buffers uninitialised
    # (torch.empty_like); they start at zero, so the next step is exactly a first step
    _grads(params, 2, poison=True)
    nonfinite.step_unless(opt, torch.tensor(1.0))
    assert all(torch.equal(p, q) for p, q in zip(params, plain))
    assert all(torch.equal(opt.state[p]["momentum_buffer"], torch.zeros_like(p)) for p in params)
    assert not hasattr(opt, "found_inf")  # a later plain step() is not skipped by it
    for i in range(3):
        _grads(params, 10 + i)
        _grads(plain, 10 + i)
        nonfinite.step_unless(opt, torch.tensor(0.0))
        ref.step()
        for p, q in zip(params, plain):
            torch.testing.assert_close(p, q, rtol=1e-15, atol=1e-15)
            torch.testing.assert_close(opt.state[p]["momentum_buffer"],
                                       ref.state[q]["momentum_buffer"], rtol=1e-15, atol=1e-15)
    before = [p.detach().clone() for p in params]
    momentum = [opt.state[p]["momentum_buffer"].clone() for p in params]
    _grads(params, 20, poison=True)
    nonfinite.step_unless(opt, torch.tensor(1.0))
    assert all(torch.equal(p, b) for p, b in zip(params, before))
    assert all(torch.equal(opt.state[p]["momentum_buffer"], m) for p, m in zip(params, momentum))


def test_skipping_refuses_optimizers_that_cannot_skip_on_the_device():
    params = _params(3)
    _grads(params, 4)
    with pytest.raises(ValueError, match="fused optimizer"):
        nonfinite.step_unless(torch.optim.SGD(params, lr=0.1, foreach=True), torch.tensor(0.0))
    with pytest.raises(ValueError, match="dampening"):
        nonfinite.step_unless(_sgd(params, nesterov=False, dampening=0.1), torch.tensor(0.0))
    adam = torch.optim.Adam(params, lr=0.1, fused=True)  # any fused optimizer skips
    before = [p.detach().clone() for p in params]
    nonfinite.step_unless(adam, torch.tensor(1.0))
    assert all(torch.equal(p, b) for p, b in zip(params, before))


def test_the_baseline_keeps_its_value_on_a_skipped_step_or_a_nonfinite_h():
    b, ref = MovingBaseline(0.9), MovingBaseline(0.9)
    h = torch.tensor(0.5)
    assert float(b(h, torch.tensor(0.0))) == float(ref(h))  # kept: the plain update
    value = b.value.clone()
    b(torch.tensor(2.0), torch.tensor(1.0))  # skipped
    b(torch.tensor(NAN), torch.tensor(0.0))  # h not finite
    b(torch.tensor(INF), torch.tensor(0.0))
    assert torch.equal(b.value, value)


C, D, B, U = 3, 4, 5, 4


def mlp(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(D, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, C)).double()


def batch(seed=0):
    g = generator(("nonfinite", seed))
    x = lambda n: torch.randn(n, D, generator=g, dtype=torch.float64)  # noqa: E731
    return MPLBatch(x(B), torch.randint(0, C, (B,), generator=g), x(U), x(U))


def mpl_step(config=MPLConfig(uda_weight=1.0)):
    teacher, student = mlp(1), mlp(2)
    step = MPLStep(teacher, student, _sgd(teacher.parameters()), _sgd(student.parameters()),
                   config, generator=torch.Generator().manual_seed(3))
    step.skip_nonfinite = True
    return step


def _same(a, b):
    return all(torch.equal(x, y) for x, y in zip(a, b)) and len(a) == len(b)


def test_the_guarded_mpl_step_is_the_plain_step_where_losses_are_finite():
    guarded, plain = mpl_step(), mpl_step()
    plain.skip_nonfinite = False
    for i in range(3):
        got, want = guarded(batch(i), i), plain(batch(i), i)
        assert float(got["nonfinite"]) == 0.0 and "nonfinite" not in want
        for k in want:
            assert torch.equal(got[k], want[k]), k
    for name in ("student", "teacher", "baseline"):
        assert _same(learned_state(guarded)[name], learned_state(plain)[name]), name


def test_running_stats_are_put_back_where_a_step_is_skipped():
    net = mlp(5)
    bn = net[1]
    kept = nonfinite.RunningStats(net)
    net(batch(6).x_us * NAN)  # a training-mode forward: NaN running statistics
    assert not torch.isfinite(bn.running_mean).all() and int(bn.num_batches_tracked) == 1
    kept.restore_where(torch.tensor(1.0))
    fresh = nn.BatchNorm1d(8).double()
    assert torch.equal(bn.running_mean, fresh.running_mean)
    assert torch.equal(bn.running_var, fresh.running_var)
    assert int(bn.num_batches_tracked) == 0  # the batch counted nowhere
    kept = nonfinite.RunningStats(net)
    net(batch(7).x_us)
    net(batch(8).x_us)
    moved = [bn.running_mean.clone(), bn.running_var.clone()]
    kept.restore_where(torch.tensor(0.0))  # kept step: as the forwards left them
    assert torch.equal(bn.running_mean, moved[0]) and torch.equal(bn.running_var, moved[1])
    assert not torch.equal(moved[0], fresh.running_mean) and int(bn.num_batches_tracked) == 2
    nonfinite.RunningStats(nn.Linear(2, 2)).restore_where(torch.tensor(1.0))  # no BN: nothing


def test_a_nonfinite_student_loss_skips_the_whole_mpl_step():
    step = mpl_step()
    step(batch(0), 0)  # momentum buffers and a baseline to keep
    before = learned_state(step)
    b = batch(1)
    b.x_us = b.x_us * NAN
    metrics = step(b, 1)
    assert float(metrics["nonfinite"]) == 1.0 and not torch.isfinite(metrics["student/loss"])
    after = learned_state(step)
    for name in ("student", "teacher", "baseline"):
        assert _same(before[name], after[name]), name


def test_a_nonfinite_feedback_skips_the_teacher_alone(monkeypatch):
    step = mpl_step()
    step(batch(0), 0)
    before = learned_state(step)
    monkeypatch.setattr(feedback, "loss_diff", lambda old, new, sign=1: (old - new) * NAN)
    metrics = step(batch(1), 1)
    after = learned_state(step)
    assert float(metrics["nonfinite"]) == 1.0 and torch.isfinite(metrics["student/loss"])
    assert not _same(before["student"], after["student"])  # its losses were finite: it stepped
    assert _same(before["teacher"], after["teacher"])
    assert _same(before["baseline"], after["baseline"])


def test_every_replica_skips_where_any_replica_flags():
    """A replica whose own losses are finite still gets the averaged, non-finite gradient of one
    whose are not: the flag it acts on is the replicas' agreement (cross_replica_any)."""
    step, seen = mpl_step(), []

    def another_replica_flags(flag):
        seen.append(float(flag))
        return torch.ones_like(flag)

    step(batch(0), 0)
    before = learned_state(step)
    step.cross_replica_any = another_replica_flags
    metrics = step(batch(1), 1)
    assert seen == [0.0, 0.0]  # asked twice: before the student's step, before the teacher's
    assert float(metrics["nonfinite"]) == 1.0
    assert all(_same(before[k], v) for k, v in learned_state(step).items())


def test_the_supervised_step_skips_a_nonfinite_loss():
    model = mlp(4)
    step = SupervisedStep(model, _sgd(model.parameters()))
    step.skip_nonfinite = True
    plain_model = copy.deepcopy(model)
    plain = SupervisedStep(plain_model, _sgd(plain_model.parameters()))
    for i in range(2):
        got, want = step(batch(i), i), plain(batch(i), i)
        assert float(got["nonfinite"]) == 0.0 and torch.equal(got["student/loss"],
                                                                 want["student/loss"])
    state = lambda m: [t.detach().clone() for t in m.state_dict().values()  # noqa: E731
                       if t.is_floating_point()]
    before = state(model)
    assert _same(before, state(plain_model))
    b = batch(5)
    b.x_l = b.x_l * NAN
    assert float(step(b, 2)["nonfinite"]) == 1.0
    assert _same(before, state(model))  # weights and BatchNorm running statistics


def test_skipped_steps_are_counted_on_the_device():
    skips = SkippedSteps("cpu")
    for f in (0, 1, 1, 0, 1, 1, 1, 0):
        skips.add(torch.tensor(float(f)))
    assert skips.read() == (5, 0, 3)  # total, current run, longest run since the last read
    assert skips.read() == (5, 0, 0)  # the longest run restarts from the current one
    skips.add(torch.tensor(1.0))
    assert skips.state() == (6, 1) and skips.read() == (6, 1, 1)
    resumed = SkippedSteps("cpu", 6, 1)  # from a checkpoint: the run goes on where it was
    resumed.add(torch.tensor(1.0))
    assert resumed.read() == (7, 2, 2)
