"""benchmarks/pseudo_label_quality.py: how often the labels a student learns from are right."""
import json
import runpy
from pathlib import Path

import pytest
import torch

from mpl_fast.train import config as cfg
from mpl_fast.train.loop import train

SCRIPT = runpy.run_path(str(Path(__file__).parents[1] / "benchmarks" / "pseudo_label_quality.py"))
label_quality, finish, main = SCRIPT["label_quality"], SCRIPT["finish"], SCRIPT["main"]
teacher_logits, TEACHER_BN = SCRIPT["teacher_logits"], SCRIPT["TEACHER_BN"]
TINY = ["data.batch_size=8", "data.mu=2", "train.log_every=1", "train.eval_every=100",
        "train.checkpoint_every=100", "train.finetune_steps=0", "train.eval_batch_size=128",
        "model.teacher=mlp", "model.student=mlp", "train.steps=6"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_label_quality_counts_each_row_as_a_loop_would(dtype):
    n, c = 37, 10
    z_weak, z_strong = (torch.randn(n, c).mul(3).to(dtype) for _ in range(2))
    truth = torch.randint(0, c, (n,))
    got = finish(label_quality(z_weak, z_strong, truth, temperature=0.5, uda_temperature=0.7,
                               threshold=0.6))
    weak_hits = strong_hits = p_true = top = kept = kept_hits = 0.0
    for zw, zs, y in zip(z_weak.double(), z_strong.double(), truth.tolist()):
        weak_hits += int(zw.argmax()) == y
        strong_hits += int(zs.argmax()) == y
        p = torch.softmax(zs / 0.5, dim=0)
        p_true += float(p[y])
        top += float(p.max())
        if float(torch.softmax(zw / 0.7, dim=0).max()) >= 0.6:
            kept += 1
            kept_hits += int(zw.argmax()) == y
    assert got["rows"] == n
    assert got["weak_top1"] == pytest.approx(weak_hits / n)
    assert got["strong_top1"] == pytest.approx(strong_hits / n)
    assert got["sampled_label_accuracy"] == pytest.approx(p_true / n)
    assert got["top_probability"] == pytest.approx(top / n)
    assert got["uda_mask_ratio"] == pytest.approx(kept / n)
    assert got["uda_kept_top1"] == (pytest.approx(kept_hits / kept) if kept else None)


def test_sampled_label_accuracy_is_what_sampling_gives():
    """The mean probability of the true class is the accuracy of labels drawn from the softmax:
    drawn 4000 times a row, the hit rate agrees to sampling noise."""
    n, c, draws = 50, 7, 4000
    z = torch.randn(n, c).mul(2)
    truth = torch.randint(0, c, (n,))
    expected = finish(label_quality(z, z, truth))["sampled_label_accuracy"]
    drawn = torch.multinomial(torch.softmax(z, dim=1), draws, replacement=True)
    hit_rate = (drawn == truth[:, None]).double().mean().item()
    assert abs(hit_rate - expected) < 4 * (0.25 / (n * draws)) ** 0.5
    # the weak view as the pseudo-label view (mpl.pseudo_label_view: weak)
    weak_view = finish(label_quality(z, z * 0, truth, view="weak"))
    assert weak_view["sampled_label_accuracy"] == pytest.approx(expected)
    assert finish(label_quality(z * 0, z, truth, view="weak"))["sampled_label_accuracy"] == \
        pytest.approx(1 / c)


def test_a_mask_that_keeps_nothing_has_no_top1():
    z = torch.zeros(5, 4)
    got = finish(label_quality(z, z, torch.zeros(5, dtype=torch.int64), threshold=0.9))
    assert got["uda_mask_ratio"] == 0 and got["uda_kept_top1"] is None


def test_the_script_on_a_run_appends_one_record(tmp_path, capsys):
    train(cfg.load("digits", TINY), tmp_path / "mpl")
    out = tmp_path / "results"
    assert main([str(tmp_path / "mpl"), "--batches", "3", "--out", str(out)]) == 0
    assert "over 48 unlabeled images" in capsys.readouterr().out
    (record,) = [json.loads(line) for line in (out / "pseudo_labels.jsonl").read_text()
                 .splitlines()]
    assert record["step"] == 6 and record["rows"] == 3 * 8 * 2 and record["device"] == "cpu"
    assert record["pseudo_labels"] == "sample" and record["pseudo_label_view"] == "strong"
    for key in ("weak_top1", "strong_top1", "sampled_label_accuracy", "top_probability",
                "uda_mask_ratio"):
        assert 0.0 <= record[key] <= 1.0, key
    # the top probability bounds the expected accuracy of a sampled label from above
    assert record["sampled_label_accuracy"] <= record["top_probability"]
    assert record["teacher_bn"] == TEACHER_BN["eval"]
    # a teacher without BatchNorm (mlp) labels each image alike however its batch is made up:
    # the same batches (the stream restarts at the checkpoint), the same figures
    for bn in ("joint", "apart"):
        assert main([str(tmp_path / "mpl"), "--batches", "3", "--out", str(out),
                     "--teacher-bn", bn]) == 0
    records = [json.loads(line) for line in (out / "pseudo_labels.jsonl").read_text()
               .splitlines()]
    assert [r["teacher_bn"] for r in records] == [TEACHER_BN[k] for k in ("eval", "joint", "apart")]
    for other in records[1:]:
        for key in ("weak_top1", "strong_top1", "sampled_label_accuracy", "top_probability",
                    "uda_mask_ratio"):
            assert other[key] == pytest.approx(record[key], abs=1e-6), key


def test_teacher_logits_normalise_as_each_bn_setting_says():
    """eval: running statistics; joint: one batch of the three views; apart: the labeled and
    strong views in one batch, the weak view in its own; shared: the weak view normalised with
    the labeled and strong views' statistics; running statistics never move."""
    from torch import nn

    from mpl_fast.mpl import MPLBatch

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3)).double()
    with torch.no_grad():  # running statistics away from their start, so eval differs
        net.train()
        net(torch.randn(64, 4, dtype=torch.float64) * 3 + 1)
    saved = {k: v.clone() for k, v in net.state_dict().items()}
    x_l, x_uw = (torch.randn(n, 4, dtype=torch.float64) for n in (5, 7))
    x_us = x_uw * 2 + 0.5  # the strong view: another distribution, so the batches differ
    b = MPLBatch(x_l, torch.zeros(5, dtype=torch.int64), x_uw, x_us)
    with torch.no_grad():
        got = {bn: teacher_logits(net, b, bn) for bn in ("eval", "joint", "apart", "shared")}
        for k, v in net.state_dict().items():
            assert torch.equal(v, saved[k]), k
        net.eval()
        want_eval = (net(x_uw), net(x_us))
        net.train()
        stats = {k: v.clone() for k, v in net.state_dict().items()}
        joint = net(torch.cat([x_l, x_uw, x_us]))
        want_joint = (joint[5:12], joint[12:])
        want_apart = (net(x_uw), net(torch.cat([x_l, x_us]))[5:])
        net.load_state_dict(stats)
        h = net[0](torch.cat([x_l, x_us]))
        bn = net[1]
        h_uw = (net[0](x_uw) - h.mean(0)) / (h.var(0, unbiased=False) + bn.eps).sqrt()
        want_shared = (net[3](torch.relu(h_uw * bn.weight + bn.bias)), want_apart[1])
    for bn, want in (("eval", want_eval), ("joint", want_joint), ("apart", want_apart),
                     ("shared", want_shared)):
        for g, w in zip(got[bn], want):
            assert torch.allclose(g, w, rtol=1e-12, atol=1e-12), bn
    assert not torch.allclose(got["apart"][0], got["joint"][0])
    assert not torch.allclose(got["shared"][0], got["apart"][0])
    assert not torch.allclose(got["eval"][0], got["joint"][0])


def test_the_script_refuses_a_results_folder_it_cannot_write_before_measuring(tmp_path,
                                                                               capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("x\n")
    with pytest.raises(SystemExit) as exit_:  # argparse's error, before the checkpoint is read
        main([str(tmp_path / "no_run"), "--out", str(blocker)])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert f"--out {blocker}: cannot write there" in err[-1], err
    assert blocker.read_text() == "x\n"


def test_the_script_refuses_a_run_without_a_teacher_in_one_line(tmp_path, capsys):
    train(cfg.load("digits_supervised", [k for k in TINY if not k.startswith("model.teacher")]),
          tmp_path / "sup")
    capsys.readouterr()
    assert main([str(tmp_path / "sup"), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "holds no teacher" in err and err.count("\n") == 1, err
    assert not (tmp_path / "r").exists()
    with pytest.raises(SystemExit) as stop:
        main([str(tmp_path / "sup"), "--batches", "0"])
    assert stop.value.code == 2
