import pytest
import torch
from torch import nn

from mpl_fast.data.logit_store import LogitStore, precompute_logits
from mpl_fast.mpl import MPLBatch, MPLConfig, MPLStep
from mpl_fast.mpl.reduced import ReducedTeacher

C, D = 5, 6


def test_store_round_trip_and_errors(tmp_path):
    torch.manual_seed(0)
    big = nn.Sequential(nn.Linear(D, 32), nn.ReLU(), nn.Linear(32, C))
    x = torch.randn(300, D)
    store = precompute_logits(big, x, tmp_path / "logits.f16", batch_size=64)
    assert len(store) == 300 and store.classes == C
    with torch.no_grad():
        want = big(x)
    got = store[torch.tensor([0, 7, 299])]
    assert got.dtype == torch.float16
    assert torch.allclose(got.float(), want[[0, 7, 299]], rtol=1e-3, atol=1e-3)
    assert not list(tmp_path.glob("*.tmp"))
    with pytest.raises(FileNotFoundError):
        LogitStore(tmp_path / "missing")
    (tmp_path / "logits.f16").write_bytes(b"\0" * 10)
    with pytest.raises(ValueError, match="expected"):
        LogitStore(tmp_path / "logits.f16")


def test_reduced_teacher_starts_as_the_large_teacher_and_learns_from_feedback(tmp_path):
    torch.manual_seed(1)
    big = nn.Sequential(nn.Linear(D, 32), nn.ReLU(), nn.Linear(32, C))
    x = torch.randn(200, D)
    y = torch.randint(0, C, (200,))
    store = precompute_logits(big, x, tmp_path / "logits.f16")
    teacher = ReducedTeacher(C, hidden=16)
    with torch.no_grad():
        assert torch.equal(teacher(store[torch.arange(200)]).argmax(1),
                           store[torch.arange(200)].float().argmax(1))
    student = nn.Sequential(nn.Linear(D, 16), nn.ReLU(), nn.Linear(16, C))
    step = MPLStep(teacher, student, torch.optim.SGD(teacher.parameters(), lr=0.1),
                   torch.optim.SGD(student.parameters(), lr=0.1),
                   MPLConfig(pseudo_labels="argmax", baseline_decay=None))
    lab, unl = torch.arange(20), torch.arange(20, 84)
    before = [p.detach().clone() for p in teacher.parameters()]
    m = step(MPLBatch(x[lab], y[lab], x[unl], x[unl], teacher_l=store[lab],
                      teacher_uw=store[unl], teacher_us=store[unl]))
    assert torch.isfinite(m["teacher/loss"]) and float(m["h"]) != 0.0
    moved = [not torch.equal(a, b) for a, b in zip(before, teacher.parameters())]
    assert any(moved)


def test_reduced_teacher_rejects_bad_sizes():
    with pytest.raises(ValueError):
        ReducedTeacher(1)
