"""benchmarks/bn_recalibration.py: a run's networks tested with BatchNorm running statistics
recomputed on each view of its stream."""
import runpy
from pathlib import Path

import pytest
import torch
from torch import nn

from mpl_fast.train import config as cfg
from mpl_fast.train.loop import run_from_checkpoint, train
from mpl_fast.train.run_log import read_jsonl

SCRIPT = runpy.run_path(str(Path(__file__).parents[1] / "benchmarks" / "bn_recalibration.py"))
recomputed, view_batches, main = SCRIPT["recomputed"], SCRIPT["view_batches"], SCRIPT["main"]
# the digits preset's small_cnn: a network with BatchNorm
TINY = ["data.batch_size=8", "data.mu=2", "train.log_every=1", "train.eval_every=100",
        "train.checkpoint_every=100", "train.finetune_steps=0", "train.eval_batch_size=128",
        "train.steps=6"]


def test_recomputed_statistics_are_the_plain_average_of_each_batch_s_own():
    torch.manual_seed(0)
    conv, bn = nn.Conv2d(3, 5, 3, bias=False).double(), nn.BatchNorm2d(5, momentum=0.1).double()
    model = nn.Sequential(conv, bn, nn.ReLU(), nn.Conv2d(5, 4, 1).double(),
                          nn.BatchNorm2d(4).double())
    model.train()
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    # batches of unequal sizes and scales: each counts once, whatever its size
    batches = [torch.randn(n, 3, 7, 6, dtype=torch.float64) * s + s
               for n, s in ((5, 1.0), (2, 3.0), (9, 0.5))]
    got = recomputed(model, batches)
    with torch.no_grad():
        a = [conv(x) for x in batches]
    mean = torch.stack([y.mean(dim=(0, 2, 3)) for y in a]).mean(dim=0)
    var = torch.stack([y.var(dim=(0, 2, 3), unbiased=True) for y in a]).mean(dim=0)
    torch.testing.assert_close(got[1].running_mean, mean)
    torch.testing.assert_close(got[1].running_var, var)
    assert not got.training and all(not m.training for m in got.modules())
    # the weights are the model's, the model's own statistics and mode untouched
    for k, v in model.state_dict().items():
        assert torch.equal(v, saved[k]), k
        if "running" not in k and "num_batches" not in k:
            assert torch.equal(got.state_dict()[k], v), k
    assert model.training and bn.momentum == 0.1 and got[1].momentum == 0.1
    # in evaluation the copy normalises with those statistics
    x = batches[0][:2]
    with torch.no_grad():
        expected = (conv(x) - mean[None, :, None, None]) / (var[None, :, None, None]
                                                            + bn.eps).sqrt()
        expected = expected * bn.weight[None, :, None, None] + bn.bias[None, :, None, None]
        torch.testing.assert_close(got[:2](x), expected)


def _saved_top1(run_dir):
    """The checkpoint's networks tested as `mpl-fast eval` tests them."""
    run, _, _ = run_from_checkpoint(run_dir)
    return {k[5:-5]: v for k, v in run.evaluate().items() if k.endswith("_top1")}


def test_the_script_on_an_mpl_run_appends_one_record(tmp_path, capsys):
    train(cfg.load("digits", TINY), tmp_path / "mpl")
    out = tmp_path / "results"
    assert main([str(tmp_path / "mpl"), "--batches", "3", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    (record,) = read_jsonl(out / "bn_recalibration.jsonl")
    assert record["step"] == 6 and record["method"] == "mpl" and record["batches"] == 3
    assert record["images_per_view"] == {"labeled": 3 * 8, "weak": 3 * 8 * 2,
                                         "strong": 3 * 8 * 2}
    assert set(record["top1"]) == {"student", "ema_student", "teacher"}
    saved = _saved_top1(tmp_path / "mpl")
    for name, row in record["top1"].items():
        assert list(row) == ["saved", "labeled", "weak", "strong"]
        assert row["saved"] == pytest.approx(saved[name]), name
        assert all(0.0 <= v <= 1.0 for v in row.values())
        assert f"{row['saved']:9.4f}{row['labeled']:9.4f}" in printed
    # six steps at the preset's BN momentum leave the statistics near their start: recomputed
    # ones test differently for some network
    assert any(v != row["saved"] for row in record["top1"].values() for v in row.values())


def test_each_view_is_the_stream_s_own_in_its_order(tmp_path):
    train(cfg.load("digits", TINY), tmp_path / "mpl")
    views = view_batches(run_from_checkpoint(tmp_path / "mpl")[0], 2)
    run = run_from_checkpoint(tmp_path / "mpl")[0]  # the same stream, from the same position
    for i in range(2):
        batch = run.to_device(run.data.next())
        for view, x in (("labeled", batch.x_l), ("weak", batch.x_uw), ("strong", batch.x_us)):
            assert torch.equal(views[view][i], x), (view, i)


def test_a_run_compiled_in_training_is_recomputed_as_its_eager_twin(tmp_path):
    """GPU runs compile their networks in place (model.compile): a copy of such a network would
    still run the original's compiled forward, so nothing would be recomputed."""
    from mpl_fast.train import checkpoint

    train(cfg.load("digits", TINY), tmp_path / "mpl")
    assert main([str(tmp_path / "mpl"), "--batches", "2", "--out", str(tmp_path / "eager")]) == 0
    state = checkpoint.load(tmp_path / "mpl" / "last.pt")
    state["config"]["model"]["compile"] = "default"
    checkpoint.save(state, tmp_path / "mpl" / "last.pt")
    assert main([str(tmp_path / "mpl"), "--batches", "2", "--out", str(tmp_path / "compiled")]) == 0
    eager, compiled = (read_jsonl(tmp_path / out / "bn_recalibration.jsonl")[0]["top1"]
                       for out in ("eager", "compiled"))
    assert compiled == eager
    assert any(v != row["saved"] for row in eager.values() for v in row.values())


def test_a_supervised_run_is_recomputed_on_its_labeled_view_alone(tmp_path, capsys):
    # the last of two settings of a key holds: finetuning here, for a finetuned.pt
    train(cfg.load("digits_supervised", TINY + ["train.finetune_steps=2"]), tmp_path / "sup")
    out = tmp_path / "results"
    assert main([str(tmp_path / "sup"), "--batches", "2", "--out", str(out)]) == 0
    (record,) = read_jsonl(out / "bn_recalibration.jsonl")
    assert record["images_per_view"] == {"labeled": 2 * 8}
    assert set(record["top1"]) == {"student", "ema_student"}
    assert list(record["top1"]["student"]) == ["saved", "labeled"]
    capsys.readouterr()
    # the finetuned student alone is no run to draw views for
    assert main([str(tmp_path / "sup" / "finetuned.pt"), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "holds the finetuned student alone" in err and err.count("\n") == 1, err
    assert not (tmp_path / "r").exists()


def test_bad_input_stops_in_one_line_before_anything_is_written(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("x\n")
    with pytest.raises(SystemExit) as exit_:  # argparse's error, before the checkpoint is read
        main([str(tmp_path / "no_run"), "--out", str(blocker)])
    assert exit_.value.code == 2
    assert f"--out {blocker}: cannot write there" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        main([str(tmp_path / "no_run"), "--batches", "0"])
    assert exit_.value.code == 2
    capsys.readouterr()
    assert main([str(tmp_path / "no_run"), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("bn_recalibration: ") and err.count("\n") == 1, err
    assert not (tmp_path / "r").exists()
