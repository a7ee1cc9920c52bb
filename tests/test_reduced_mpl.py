import json

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


# -- Reduced MPL in the trainer: `mpl-fast logits`, then model.teacher=reduced ------------------

TINY = ["data.batch_size=8", "data.mu=2", "train.log_every=1", "train.eval_every=6",
        "train.checkpoint_every=6", "train.finetune_steps=0", "optim.student_wait_steps=2",
        "train.eval_batch_size=128", "train.device=cpu"]
REDUCED = ["model.teacher=reduced", "mpl.uda_weight=0"]


@pytest.fixture(scope="module")
def big_run(tmp_path_factory):
    """A short supervised digits run (the "large teacher") and the logits of its EMA student."""
    from mpl_fast.train import config as cfg, teacher_logits
    from mpl_fast.train.loop import train

    root = tmp_path_factory.mktemp("reduced")
    train(cfg.load("digits_supervised", TINY + ["train.steps=30"]), root / "big")
    network, report = teacher_logits.write(
        root / "logits", lambda: teacher_logits.from_checkpoint(root / "big"))
    assert network == "ema_student"
    return root, report


def _reduced(root, extra=()):
    from mpl_fast.train import config as cfg

    return cfg.load("digits", TINY + REDUCED + [f"model.teacher_logits={root / 'logits'}",
                                                *extra])


def test_logits_are_the_networks_on_each_image_in_order(big_run):
    from mpl_fast.data.logit_store import LogitStore
    from mpl_fast.train.loop import run_from_checkpoint

    root, report = big_run
    run, _, _ = run_from_checkpoint(root / "big")
    net = run.ema.module.eval()
    for split, x, y in (("train", run.data.split.train_x, run.data.split.train_y),
                        ("test", run.data.split.test_x, run.data.split.test_y)):
        store = LogitStore(root / "logits" / f"{split}.logits")
        with torch.no_grad():
            want = net(x)
        assert store.rows == len(x) and store.meta["network"] == "ema_student"
        assert torch.allclose(store[torch.arange(len(x))].float(), want, rtol=2e-3, atol=2e-3)
        assert report[split]["top1"] == pytest.approx((want.argmax(1) == y).float().mean().item())
    assert not (root / "logits" / ".partial").exists()


def test_reduced_teacher_sees_the_stored_rows_of_its_batch_and_starts_as_the_large_teacher(
        big_run):
    from mpl_fast.data.logit_store import LogitStore
    from mpl_fast.train.loop import Run

    root, report = big_run
    run = Run(_reduced(root, ["data.pad=0"]), root / "unused")  # views without shifts
    # a teacher without BatchNorm: 'auto' takes the weak view apart, and with no UDA nothing
    # reads it (the same rows as the strong view's: stored logits), so it is not computed
    assert run.step_fn.weak_no_grad and not run.step_fn.weak_view_read
    store = LogitStore(root / "logits" / "train.logits")
    for _ in range(3):
        b = run.data.next()
        split = run.data.split
        assert torch.equal(b.y_l, split.train_y[b.labeled_index])
        assert set(b.labeled_index.tolist()) <= set(split.labeled.tolist())
        assert torch.equal(b.teacher_l, store[b.labeled_index])
        assert torch.equal(b.teacher_us, store[b.unlabeled_index])
        assert b.teacher_uw is b.teacher_us
        # the images of the batch are the named ones (no shift: data.pad=0)
        assert torch.equal(b.x_l, split.train_x[b.labeled_index])
        assert torch.equal(b.x_uw, split.train_x[b.unlabeled_index])
    # the reduced teacher starts out predicting what the large teacher predicted: its test top-1
    # (from the stored test logits) is the large network's
    acc = run.evaluate()
    assert acc["eval/teacher_top1"] == pytest.approx(report["test"]["top1"])


def test_reduced_run_trains_the_teacher_and_resumes_exactly(big_run):
    from mpl_fast.train.loop import Run, train

    root, _ = big_run
    whole = train(_reduced(root, ["train.steps=12"]), root / "whole")
    train(_reduced(root, ["train.steps=6"]), root / "cut")
    cut = train(_reduced(root, ["train.steps=12"]), root / "cut", resume=True)
    assert cut["teacher_top1"] == whole["teacher_top1"] is not None
    a = torch.load(root / "whole" / "last.pt", weights_only=False)
    b = torch.load(root / "cut" / "last.pt", weights_only=False)
    for part in ("teacher", "student"):
        for key, value in a[part].items():
            assert torch.equal(value, b[part][key]), (part, key)
    start = Run(_reduced(root, ["train.steps=12"]), root / "unused").teacher.state_dict()
    assert any(not torch.equal(a["teacher"][k], v) for k, v in start.items())  # it learned
    steps = [json.loads(line) for line in (root / "whole" / "metrics.jsonl").open()]
    assert any(r.get("h", 0) != 0 for r in steps)  # the student's feedback reached it


def test_reduced_settings_and_stores_are_checked(big_run, capsys):
    from mpl_fast import cli
    from mpl_fast.train import config as cfg
    from mpl_fast.train.loop import Run, TrainError

    root, _ = big_run
    logits = f"model.teacher_logits={root / 'logits'}"
    bad = [(["model.teacher=reduced", "mpl.uda_weight=0"], "needs model.teacher_logits"),
           (["model.teacher=reduced", logits], "UDA cannot run"),
           ([logits], "needs model.teacher=reduced"),
           (REDUCED + [logits, "model.checkpoint=teacher"], "without blocks"),
           (REDUCED + [logits, "model.reduced_temperature=0"], "must be > 0"),
           (REDUCED + [logits, "model.reduced_hidden=0"], "must be >= 1")]
    for overrides, message in bad:
        with pytest.raises(cfg.ConfigError, match=message):
            cfg.load("digits", overrides)
    with pytest.raises(cfg.ConfigError, match="needs method=mpl"):
        cfg.load("digits_supervised", REDUCED + [logits])
    # a store written for other data (another test split: other row counts), or none at all
    with pytest.raises(TrainError, match="1438 images of 10 classes: written for other data"):
        Run(_reduced(root, ["data.test_fraction=0.2"]), root / "unused")
    # the same counts, other images (digits' split_seed picks the test split): refused too
    with pytest.raises(TrainError, match="images of this run's train split or their order"):
        Run(_reduced(root, ["data.split_seed=1"]), root / "unused")
    with pytest.raises(TrainError, match="no logit store"):
        Run(cfg.load("digits", TINY + REDUCED + [f"model.teacher_logits={root}"]), root / "x")
    # the command: stores are not replaced unless told; networks a checkpoint lacks are refused
    before = (root / "logits" / "train.logits").read_bytes()
    args = ["logits", "--checkpoint", str(root / "big"), "--out", str(root / "logits")]
    assert cli.main(args) == 2
    assert "already holds teacher logits" in capsys.readouterr().err
    assert (root / "logits" / "train.logits").read_bytes() == before
    assert cli.main(args[:-1] + [str(root / "other"), "--network", "teacher"]) == 2
    assert "no image teacher" in capsys.readouterr().err.splitlines()[-1]
    assert not (root / "other").exists()


def test_a_failed_store_write_leaves_nothing(tmp_path):
    from mpl_fast.data.logit_store import write_folder

    def failing():
        yield torch.zeros(4, 3)
        raise RuntimeError("disk gone")

    with pytest.raises(RuntimeError):
        write_folder(tmp_path, {"test": (2, iter([torch.zeros(2, 3)])), "train": (8, failing())})
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="4 rows given, 8 announced"):
        write_folder(tmp_path, {"train": (8, iter([torch.zeros(4, 3)]))})
    assert list(tmp_path.iterdir()) == []


def test_eval_command_evaluates_a_reduced_teacher_from_its_stored_logits(big_run, capsys):
    from mpl_fast import cli

    from mpl_fast.train.loop import train

    root, _ = big_run
    summary = train(_reduced(root, ["train.steps=6"]), root / "evaluated")
    capsys.readouterr()
    assert cli.main(["eval", "--checkpoint", str(root / "evaluated")]) == 0
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.startswith("teacher_top1"))
    assert float(line.split()[1]) == pytest.approx(summary["teacher_top1"], abs=1e-4)


@pytest.mark.slow
def test_logits_under_torchrun_share_the_work_and_store_what_one_process_stores(big_run, tmp_path):
    """A large teacher over ImageNet's 1.28M images is hours on one GPU: under torchrun each
    process runs the network on its share of each split (batches of 100: 1258 training rows in
    13 batches, 539 test rows in 6, over 4 processes, the last with one and two batches) and
    rank 0 writes the stores from their shards: byte for byte the stores one process writes,
    the same report line, printed once, no shard left."""
    from tests.test_train import _launcher, _run_ok, _subprocess_env

    root, _ = big_run
    done = {n: _run_ok([*_launcher(n), "logits", "--checkpoint", str(root / "big"), "--out",
                        str(tmp_path / f"p{n}"), "--batch-size", "100"],
                       _subprocess_env(OMP_NUM_THREADS="1"))
            for n in (1, 4)}
    for split in ("train", "test"):
        one, four = (tmp_path / f"p{n}" / f"{split}.logits" for n in (1, 4))
        assert one.read_bytes() == four.read_bytes(), split
        assert (json.loads(one.with_name(one.name + ".json").read_text())
                == json.loads(four.with_name(four.name + ".json").read_text()))
    assert done[4].stdout == done[1].stdout.replace("p1", "p4")
    assert done[1].stdout.count("logits ->") == 1
    assert "train 1258 rows" in done[1].stdout, done[1].stdout
    assert sorted(p.name for p in (tmp_path / "p4").iterdir()) == [
        "test.logits", "test.logits.json", "train.logits", "train.logits.json"]


@pytest.mark.slow
def test_eval_under_torchrun_shares_the_stored_logits_as_one_process_reads_them(big_run):
    """Under torchrun each replica evaluates the reduced teacher on its share of the stored test
    logits, with the labels of those rows: the table one process prints (6 batches of 100 over
    2 replicas)."""
    from mpl_fast.train.loop import train
    from tests.test_train import _launcher, _run_ok, _subprocess_env

    root, _ = big_run
    train(_reduced(root, ["train.steps=6"]), root / "shared")
    tables = [_run_ok([*_launcher(n), "eval", "--checkpoint", str(root / "shared"), "--set",
                       "train.eval_batch_size=100"], _subprocess_env(OMP_NUM_THREADS="1")).stdout
              for n in (1, 2)]
    assert tables[1] == tables[0] and "teacher_top1" in tables[0], tables


@pytest.mark.parametrize("device,graphed", [
    ("cpu", "emulate"), pytest.param("cuda", True, marks=pytest.mark.gpu)])
def test_reduced_run_in_the_graphed_step_path_trains_like_the_plain_one(big_run, monkeypatch,
                                                                        device, graphed):
    """train.cuda_graph (emulate: its static-buffer path without the capture, on a CPU): the
    stored teacher inputs are copied into the static batch like the images, so every logged loss
    and h equals the plain run's (fp32, TF32 off)."""
    from mpl_fast.train.loop import train

    if device == "cpu":
        monkeypatch.setenv("MPL_FAST_BACKEND", "torch")
    else:
        monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
        monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    root, _ = big_run
    rows = {}
    for mode in (False, graphed):
        out = root / f"graphed_{device}_{mode}"
        train(_reduced(root, ["train.steps=10", f"train.cuda_graph={mode}", "train.amp=off",
                              f"train.device={device}"]), out)
        rows[mode] = [json.loads(line) for line in (out / "metrics.jsonl").open()]
    assert [r["step"] for r in rows[False]] == [r["step"] for r in rows[graphed]]
    for a, b in zip(rows[False], rows[graphed]):
        for key in ("teacher/loss", "student/loss"):
            assert b[key] == pytest.approx(a[key], rel=1e-5), (a["step"], key)
        # h is a difference of two losses near 1: their float32 rounding (the graphed path's
        # learning rates are float32 device tensors) is what it may differ by
        assert b["h"] == pytest.approx(a["h"], abs=1e-5), a["step"]
    assert any(r["h"] != 0 for r in rows[graphed])


def test_logits_of_a_named_model_with_its_weights(big_run, tmp_path, capsys):
    """--model NAME --weights FILE: the same stores as the checkpoint's network, from a bare state
    dict or one wrapped by a training script (DDP's module. prefixes too); bad weights and flag
    mixes stop with one line and write nothing."""
    from mpl_fast import cli

    root, _ = big_run
    state = torch.load(root / "big" / "last.pt", weights_only=False)
    ema = {k[len("module."):]: v for k, v in state["ema"].items() if k.startswith("module.")}
    torch.save(ema, tmp_path / "bare.pt")
    torch.save({"state_dict": {"module." + k: v for k, v in ema.items()}, "epoch": 3},
               tmp_path / "wrapped.pt")
    want = (root / "logits" / "train.logits").read_bytes()
    for name in ("bare", "wrapped"):  # over the default config's data: the big run's images
        assert cli.main(["logits", "--model", "small_cnn",
                         "--weights", str(tmp_path / f"{name}.pt"),
                         "--out", str(tmp_path / name)]) == 0
        assert (tmp_path / name / "train.logits").read_bytes() == want
        meta = json.loads((tmp_path / name / "train.logits.json").read_text())
        assert meta["model"] == "small_cnn" and meta["weights"].endswith(f"{name}.pt")
    capsys.readouterr()
    bad = [(["--model", "small_cnn"], "needs its weights"),
           (["--model", "small_cnn", "--weights", str(tmp_path / "none.pt")], "no such file"),
           (["--model", "wrn28_2", "--weights", str(tmp_path / "bare.pt")],
            "do not fit model wrn28_2 with 10 classes: Missing key"),
           (["--model", "small_cnn", "--weights", str(root / "big" / "last.pt")],
            "a checkpoint of mpl-fast train: --checkpoint"),
           (["--model", "small_cnn", "--pretrained"], "mpl-fast's own network"),
           (["--model", "timm:resnet18", "--pretrained"], "embedded digits"),
           (["--model", "small_cnn", "--weights", str(tmp_path / "bare.pt"), "--network",
             "student"], "--network picks a network of a --checkpoint"),
           (["--checkpoint", str(root / "big"), "--config", "digits"], "--config goes with")]
    for args, message in bad:
        assert cli.main(["logits", *args, "--out", str(tmp_path / "bad")]) == 2, args
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], (args, err)
        assert not (tmp_path / "bad").exists()
