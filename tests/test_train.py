"""The trainer: config, schedules, optimizer groups, EMA, checkpoints, exact resume after
SIGKILL (also during a save), non-finite skipping, outputs."""
import json
import os
import re
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from mpl_fast import cli
from mpl_fast.train import checkpoint, config as cfg, optim, schedules
from mpl_fast.train.ema import ModelEMA
from mpl_fast.train.loop import Run, TrainError, train
from tests import seeds

TINY = ["data.batch_size=8", "data.mu=2", "train.log_every=1", "train.eval_every=10",
        "train.checkpoint_every=10", "train.finetune_steps=0", "optim.student_wait_steps=3",
        "train.eval_batch_size=128"]


def test_config_presets_and_errors(tmp_path):
    for name in cfg.preset_names():
        cfg.load(name)
    c = cfg.load("digits", ["train.steps=7", "optim.teacher_lr=0.1", "data.hw_decoder_load=0.5"])
    assert c["data"]["hw_decoder_load"] == 0.5
    assert c["train"]["steps"] == 7 and c["optim"]["teacher_lr"] == 0.1
    for bad, key in ((["train.stepz=1"], "train.stepz"), (["train.steps=0"], "train.steps"),
                     (["data.batch_size=x"], "data.batch_size"),
                     (["mpl.estimator=x"], "mpl.estimator"),
                     (["method=x"], "method"), (["train.ema_decay=1.5"], "train.ema_decay"),
                     (["data.decode_device=tpu"], "data.decode_device"),
                     (["data.augment_device=cpu"], "data.augment_device"),
                     (["data.steps_per_run=0"], "data.steps_per_run"),
                     (["data.hw_decoder_load=2"], "data.hw_decoder_load"),
                     (["data.hw_decoder_load=yes"], "data.hw_decoder_load"),
                     # folder settings on the embedded data would be ignored silently
                     (["data.root=/data/cifar10"], "data.root"),
                     (["data.image_size=32"], "data.image_size"),
                     (["data.labeled_percent=10"], "data.labeled_percent"),
                     # YAML's .nan and .inf are numbers; a NaN passes every range test
                     (["optim.momentum=.nan"], "optim.momentum"),
                     (["optim.teacher_lr=.inf"], "optim.teacher_lr"),
                     (["mpl.grad_clip=.nan"], "mpl.grad_clip"),
                     (["mpl.uda_weight=.inf"], "mpl.uda_weight"),
                     (["data.hw_decoder_load=.nan"], "data.hw_decoder_load"),
                     (["train.finetune_lr=-.inf"], "train.finetune_lr"),
                     # numpy's seeds: a traceback after the run's folder was made
                     (["train.seed=-1"], "train.seed"), (["train.seed=4294967296"], "train.seed"),
                     (["data.split_seed=-3"], "data.split_seed"),
                     # each used to fail later: in numpy, torch, DALI or a comparison with None
                     (["data.pad=8"], "data.pad"), (["data.labeled_per_class=null"],
                                                    "data.labeled_per_class"),
                     (["train.steps=null"], "train.steps"), (["optim.momentum=1"], "optim.momentum"),
                     (["model.bn_momentum=1.5"], "model.bn_momentum"),
                     (["model.bn_momentum=x"], "model.bn_momentum"),
                     (["data.num_threads=0"], "data.num_threads"),
                     (["train.steps=[1, 2"], "train.steps")):  # was YAML's ParserError
        with pytest.raises(cfg.ConfigError, match=key.replace(".", "\\.")):
            cfg.load("digits", bad)
    folder_data = ["data.root=/data/cifar10"]  # image_size 32, cutout 16
    for bad, key in ((["data.image_size=0"], "data.image_size"),
                     (["data.cutout=32"], "data.cutout"),
                     (["data.image_size=16"], "data.cutout"),
                     (["data.labeled_percent=0"], "data.labeled_percent"),
                     (["data.labeled_percent=101"], "data.labeled_percent"),
                     (["data.labeled_percent=x"], "data.labeled_percent"),
                     (["data.randaugment_m=-1"], "data.randaugment_m"),
                     (["data.randaugment_n=-1"], "data.randaugment_n"),
                     (["data.split_list=5"], "data.split_list")):
        with pytest.raises(cfg.ConfigError, match=key.replace(".", "\\.")):
            cfg.load("cifar10_4k_short", [*folder_data, *bad])
    edge = cfg.load("cifar10_4k_short", [*folder_data, "data.cutout=31", "model.bn_momentum=1",
                                         "data.labeled_percent=100", "data.randaugment_m=30"])
    assert edge["data"]["cutout"] == 31 and edge["data"]["labeled_percent"] == 100.0
    folder = cfg.load("digits", ["data.name=image_folder", "data.root=/data/cifar10",
                                 "data.image_size=32", "data.labeled_percent=10"])
    assert folder["data"]["root"] == "/data/cifar10" and folder["data"]["image_size"] == 32
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  steps: 3\n")
    assert cfg.load(str(f))["train"]["steps"] == 3
    f.write_text("train: [1, 2\n")
    with pytest.raises(cfg.ConfigError, match="YAML"):
        cfg.load(str(f))
    # a key given twice: PyYAML kept the last one without a word; merge keys may still repeat
    f.write_text("train:\n  steps: 3\n  seed: 1\n  steps: 4\n")
    with pytest.raises(cfg.ConfigError, match="key 'steps' given twice \\(line 4\\)"):
        cfg.load(str(f))
    f.write_text("train:\n  steps: 3\nmpl:\n  uda_weight: 1.0\ntrain:\n  seed: 2\n")
    with pytest.raises(cfg.ConfigError, match="key 'train' given twice"):
        cfg.load(str(f))
    f.write_text("optim: &o\n  momentum: 0.8\n  nesterov: false\n"
                 "train:\n  steps: 3\n")
    assert cfg.load(str(f))["optim"]["momentum"] == 0.8  # anchors still read
    f.write_text("train:\n  <<: {steps: 3, seed: 1}\n  steps: 5\n")  # a merge, overridden
    assert [cfg.load(str(f))["train"][k] for k in ("steps", "seed")] == [5, 1]
    f.write_bytes(b"\xff\xfe\x00 not text")  # was a UnicodeDecodeError traceback
    with pytest.raises(cfg.ConfigError, match="cannot read it as UTF-8 text"):
        cfg.load(str(f))
    with pytest.raises(cfg.ConfigError, match="unknown config"):
        cfg.load("nonexistent_preset")


def test_a_config_saved_before_ce_old_forward_existed_reads_as_joint():
    """Runs saved before mpl.ce_old_forward existed took CE_old from the joint forward; read back,
    their config says so (a resumed comparison then sees the difference instead of mixing the two),
    while a config saved since keeps what it holds."""
    saved = cfg.load("digits")
    assert cfg.from_saved(saved)["mpl"]["ce_old_forward"] is None  # the preset's: separate
    assert cfg.mpl_config(cfg.from_saved(saved)).ce_old_forward == "separate"
    del saved["mpl"]["ce_old_forward"]
    old = cfg.from_saved(saved)
    assert old["mpl"]["ce_old_forward"] == "joint" and cfg.mpl_config(old).ce_old_forward == "joint"


def test_bare_off_is_the_word_not_false(tmp_path):
    # YAML 1.1 reads `off` as false; train.amp's choice is the word "off" (first seen on a GPU)
    assert cfg.load("digits", ["train.amp=off"])["train"]["amp"] == "off"
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  amp: off\n  cuda_graph: off\n")
    c = cfg.load(str(f))
    assert c["train"]["amp"] == "off" and c["train"]["cuda_graph"] is False
    for bad in ("train.amp=on", "train.amp=true", "model.checkpoint=off"):
        with pytest.raises(cfg.ConfigError, match=bad.split("=")[0].replace(".", "\\.")):
            cfg.load("digits", [bad])


def test_schedules():
    f = schedules.wait_warmup_cosine(wait=10, warmup=5, total=100)
    assert all(f(s) == 0.0 for s in range(10))
    assert f(10) == pytest.approx(1 / 5) and f(14) == pytest.approx(1.0)
    assert f(99) < 0.01 and f(50) < f(20)
    g = schedules.warmup_cosine(0, 100)
    assert g(0) == pytest.approx(1.0) and g(100) == pytest.approx(0.0)


def test_no_weight_decay_on_bn_and_bias():
    model = nn.Sequential(nn.Conv2d(1, 4, 3, bias=False), nn.BatchNorm2d(4), nn.Flatten(),
                          nn.Linear(4, 2))
    groups = optim.param_groups(model, 5e-4)
    decayed = {id(p) for p in groups[0]["params"]}
    assert decayed == {id(model[0].weight), id(model[3].weight)}
    assert groups[1]["weight_decay"] == 0.0 and len(groups[1]["params"]) == 3


def test_ema_decay_schedule_and_buffers():
    model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    ema = ModelEMA(model, decay=0.99)
    w0 = ema.module[0].weight.clone()
    with torch.no_grad():
        model[0].weight.add_(1.0)
        model[1].running_mean.fill_(2.0)
        model[1].num_batches_tracked.fill_(7)
    ema.update(model)  # t = 0: d = min(0.99, 1/10)
    assert torch.allclose(ema.module[0].weight, 0.1 * w0 + 0.9 * model[0].weight)
    assert torch.allclose(ema.module[1].running_mean, torch.full((2,), 1.8))
    assert torch.allclose(ema.module[1].running_var, torch.ones(2))  # lerp of equal values
    assert int(ema.module[1].num_batches_tracked) == 7  # integer buffers are copied


def test_the_ema_of_a_network_compiled_in_place_runs_its_own_weights():
    from mpl_fast.models.compiling import compile_net

    model = nn.Sequential(nn.Linear(2, 2), nn.ReLU())
    compile_net(model, "default")
    ema = ModelEMA(model, decay=0.99)
    with torch.no_grad():
        ema.module[0].weight.zero_()
        ema.module[0].bias.fill_(3.0)
    torch.testing.assert_close(ema(torch.randn(5, 2)), torch.full((5, 2), 3.0))


def test_ema_follows_its_decay_on_the_device_and_skips_what_the_step_skipped():
    """Against a float64 EMA with the decay min(decay, (t + 1) / (t + 10)) taken on the host:
    a skipped step (a device flag of 1) changes neither the average nor its count t, so the
    next update uses the decay the skipped one would have used."""
    torch.manual_seed(seeds.fresh("ema"))
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    ema = ModelEMA(model, decay=0.6)  # (t + 1) / (t + 10) passes 0.6 at t = 13
    want = {k: v.double().clone() for k, v in ema.module.state_dict().items()
            if v.is_floating_point()}
    t = 0
    skips = [0, 1, 0, 0, 1, 1] + [0] * 14
    for i, skip in enumerate(skips):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
            model[1].running_mean.add_(torch.randn(4))
            model[1].num_batches_tracked.fill_(i)
        ema.update(model, torch.tensor(float(skip)))
        if not skip:
            d = min(0.6, (t + 1) / (t + 10))
            for k, v in model.state_dict().items():
                if k in want:
                    want[k] = d * want[k] + (1 - d) * v.double()
            t += 1
        assert int(ema.updates) == t
        for k, v in ema.module.state_dict().items():
            if k in want:
                assert torch.allclose(v.double(), want[k], rtol=1e-5, atol=1e-5), (i, k)
        # integer buffers are copied (on a skipped step the model's were put back by the step)
        assert int(ema.module[1].num_batches_tracked) == i
    assert t == 17 and t > 13  # the decay's cap was reached
    ema.update(model)  # without a flag: an update
    assert int(ema.updates) == 18


def _metrics(path):
    """The logged rows without their wall-clock measurements (time/*), which differ from run to
    run: everything else of a resumed run must equal the uninterrupted one."""
    return [{k: v for k, v in json.loads(line).items() if not k.startswith("time/")}
            for line in path.read_text().splitlines()]


def _subprocess_env(**extra):
    # the plain-torch loss kernels: these runs test resuming, and the interpreted Triton ones
    # would add a third to each run's time
    return dict(os.environ, MPL_FAST_BACKEND="torch", **extra)


def _run_ok(cmd, env, **kwargs):
    """subprocess.run(cmd) that must succeed; a failure shows the command's stderr (a torchrun
    launch's tail names the rank and the error), not only its exit status."""
    done = subprocess.run(cmd, capture_output=True, timeout=600, env=env, text=True, **kwargs)
    assert done.returncode == 0, f"exit {done.returncode}: {done.stderr[-4000:]}"
    # torch 2.9's gloo prints a line of its own on stdout as each process joins a group
    done.stdout = "".join(line for line in done.stdout.splitlines(keepends=True)
                          if not GLOO_JOINED.match(line))
    return done


GLOO_JOINED = re.compile(r"\[Gloo\] Rank \d+ is connected to \d+ peer ranks")


def _train_cmd(out, steps, *extra):
    return [sys.executable, "-m", "mpl_fast.cli", "train", "--out", str(out), "--steps",
            str(steps), "--device", "cpu", *sum((["--set", s] for s in TINY), []), *extra]


def _wait_for_step(path, step, proc, timeout=300):
    end = time.time() + timeout
    while time.time() < end:
        if path.exists():
            # the complete lines alone: the run may be writing the last one as it is read
            text = path.read_text()
            lines = [json.loads(x) for x in text[:text.rfind("\n") + 1].splitlines() if x.strip()]
            if lines and lines[-1]["step"] >= step:
                return
        if proc.poll() is not None:
            raise AssertionError(f"run ended early: {proc.returncode}")
        time.sleep(0.05)
    raise AssertionError("timed out waiting for the run")


@pytest.mark.slow
def test_sigterm_saves_the_step_it_stops_at_and_resume_goes_on_exactly(tmp_path):
    """A cluster's preemption (SIGTERM, then SIGKILL after a grace period) used to end the run at
    once, losing the steps since the last periodic checkpoint. Now the step under way finishes,
    last.pt is written at it, one line says so (exit status 143), and --resume continues as if
    the run had never stopped."""
    steps = 30
    env = _subprocess_env()
    ref = tmp_path / "ref"
    subprocess.run(_train_cmd(ref, steps), check=True, capture_output=True, timeout=600, env=env)
    want = _metrics(ref / "metrics.jsonl")

    run = tmp_path / "stopped"
    proc = subprocess.Popen(_train_cmd(run, steps), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, env=env, text=True)
    _wait_for_step(run / "metrics.jsonl", 12, proc)  # past the step-10 checkpoint
    os.kill(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM
    stopped_at = checkpoint.load(run / "last.pt")["step"]
    assert 12 <= stopped_at < steps and stopped_at % 10 != 0  # not a periodic checkpoint's step
    assert _metrics(run / "metrics.jsonl")[-1]["step"] == stopped_at
    assert err.splitlines()[-1] == (f"mpl-fast: stopped by SIGTERM at step {stopped_at}; "
                                    f"{run / 'last.pt'} holds it: the same command with "
                                    "--resume continues from there")
    assert not (run / "summary.json").exists()
    subprocess.run(_train_cmd(run, steps, "--resume"), check=True, capture_output=True,
                   timeout=600, env=env)
    assert _metrics(run / "metrics.jsonl") == want


def test_sigterm_keeps_its_usual_handling_outside_the_training_loop(tmp_path, monkeypatch):
    """Only the loop's steps have anything to save; during the final evaluation and finetuning
    (last.pt already at the last step) SIGTERM ends the run at once, as without mpl-fast."""
    from mpl_fast.train import loop

    before = signal.getsignal(signal.SIGTERM)
    during = []
    real_finetune = loop.finetune

    def finetune(*args, **kwargs):
        during.append(signal.getsignal(signal.SIGTERM))
        return real_finetune(*args, **kwargs)

    monkeypatch.setattr(loop, "finetune", finetune)
    train(cfg.load("digits", TINY + ["train.steps=2", "train.finetune_steps=1"]), tmp_path)
    assert during == [before] and signal.getsignal(signal.SIGTERM) is before


@pytest.mark.slow
def test_sigterm_to_torchrun_stops_every_replica_at_one_step(tmp_path):
    """torchrun forwards SIGTERM to each process; the replicas agree on the step to stop at (one
    leaving early would leave the others waiting in an all-reduce), rank 0 writes last.pt there
    and alone says so."""
    env = _subprocess_env(OMP_NUM_THREADS="1")
    out = tmp_path / "ddp"
    proc = subprocess.Popen(_ddp_cmd(out, 5000, 2, "--set", "train.checkpoint_every=5000",
                                     "--set", "train.eval_every=5000"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, text=True)
    _wait_for_step(out / "metrics.jsonl", 15, proc)
    os.kill(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=120)  # a replica left behind would hang here
    stopped_at = checkpoint.load(out / "last.pt")["step"]
    assert 15 <= stopped_at < 5000
    assert _metrics(out / "metrics.jsonl")[-1]["step"] == stopped_at
    assert err.count(f"mpl-fast: stopped by SIGTERM at step {stopped_at}; ") == 1


@pytest.mark.slow
def test_exact_resume_after_sigkill_and_kill_during_save(tmp_path):
    steps = 30
    env = _subprocess_env()
    run_to_end = lambda cmd, env=env: subprocess.run(  # noqa: E731
        cmd, check=True, capture_output=True, timeout=600, env=env)
    ref = tmp_path / "ref"
    run_to_end(_train_cmd(ref, steps))
    want = _metrics(ref / "metrics.jsonl")

    # SIGKILL mid-run, after the step-10 and step-20 checkpoints
    run = tmp_path / "killed"
    proc = subprocess.Popen(_train_cmd(run, steps), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=env)
    _wait_for_step(run / "metrics.jsonl", 24, proc)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert _metrics(run / "metrics.jsonl")[-1]["step"] < steps
    run_to_end(_train_cmd(run, steps, "--resume"))
    assert _metrics(run / "metrics.jsonl") == want

    # killed while writing the step-20 last.pt: the step-10 checkpoint stays usable
    run = tmp_path / "killed_in_save"
    proc = subprocess.run(_train_cmd(run, steps), capture_output=True, timeout=600,
                          env=_subprocess_env(MPL_FAST_FAULT="kill-during-save:last.pt:2"))
    assert proc.returncode == 137
    assert (run / "last.pt.tmp").exists()
    assert checkpoint.load(run / "last.pt")["step"] == 10
    run_to_end(_train_cmd(run, steps, "--resume"))
    assert _metrics(run / "metrics.jsonl") == want


def test_run_outputs_and_summary(tmp_path):
    config = cfg.load("digits", TINY + ["train.steps=20", "train.finetune_steps=5",
                                        "train.log_every=2"])
    summary = train(config, tmp_path)
    for name in ("config.yaml", "split.json", "metrics.jsonl", "summary.json", "curves.png",
                 "last.pt", "best.pt", "finetuned.pt"):
        assert (tmp_path / name).exists(), name
    assert json.loads((tmp_path / "summary.json").read_text()) == summary
    for key in ("student_top1", "ema_student_top1", "teacher_top1", "finetuned_student_top1"):
        assert 0.0 <= summary[key] <= 1.0
    rows = _metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(2, 21, 2))
    assert {"teacher/loss", "student/loss", "h", "uda/mask_ratio", "lr/student"} <= set(rows[0])
    assert rows[0]["lr/student"] == 0.0  # the student waits
    # the finetuning's loss, every log_every steps and at its last, on its own TensorBoard axis
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    tuned = events.Scalars("finetune/loss")
    assert [e.step for e in tuned] == [2, 4, 5]
    assert all(0.0 < e.value < 10.0 for e in tuned)
    assert [e.step for e in events.Scalars("student/loss")] == list(range(2, 21, 2))
    # digits knows every image's class: how often the pseudo labels are right, every logged step
    assert all(0.0 <= r["pseudo/accuracy"] <= 1.0 for r in rows)
    assert summary["device"] == "cpu" and summary["torch"] == torch.__version__
    assert any("eval/ema_student_top1" in r for r in rows)
    assert list((tmp_path / "tensorboard").iterdir())
    assert (tmp_path / "curves.png").read_bytes()[:4] == b"\x89PNG"


def test_the_share_of_loop_time_spent_waiting_for_data_is_logged(tmp_path, monkeypatch):
    """time/data_wait (each log) and summary data_wait_share: the loop's time blocked in the
    data's next(), evaluations and saves left out. A stream that stalls 30 s a batch makes it
    nearly all of the loop; the in-memory digits, a small part. The stall is on a clock of the
    test's own (perf_counter moved on inside next()), so the shares do not depend on how fast
    this machine runs the step (a real 0.4 s sleep gave 0.37 on a loaded 2-core machine)."""
    import time

    monkeypatch.setenv("MPL_FAST_BACKEND", "torch")  # a quicker step (no interpreted kernels)

    from mpl_fast.data.stream import InMemoryStream

    overrides = TINY + ["train.steps=12", "train.log_every=4", "train.eval_every=6",
                        "train.checkpoint_every=6"]
    fast = train(cfg.load("digits", overrides), tmp_path / "fast")
    real_next = InMemoryStream.next

    stalled = [0.0]
    real_clock = time.perf_counter
    monkeypatch.setattr(time, "perf_counter", lambda: real_clock() + stalled[0])

    def slow_next(self):
        stalled[0] += 30.0
        return real_next(self)
    monkeypatch.setattr(InMemoryStream, "next", slow_next)
    slow = train(cfg.load("digits", overrides), tmp_path / "slow")
    assert 0.0 <= fast["data_wait_share"] < 0.5 and 0.9 < slow["data_wait_share"] <= 1.0
    for run in ("fast", "slow"):
        rows = [json.loads(line)
                for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        shares = [r["time/data_wait"] for r in rows]
        assert [r["step"] for r in rows] == [4, 6, 8, 12] and len(shares) == 4
        assert all(0.0 <= v <= 1.0 for v in shares)
    assert min(shares) > 0.9  # the slow run's, each interval


def test_supervised_runs_draw_labeled_batches_alone_and_resume_exactly(tmp_path, monkeypatch):
    """The supervised method never asks the data for unlabeled views (on a GPU the DALI stream
    would decode and augment mu*B images a step for nothing), and a run resumed from its
    checkpoint ends where the uninterrupted one does."""
    from mpl_fast.data.stream import InMemoryStream

    def no_unlabeled(self):
        raise AssertionError("a supervised run drew an unlabeled batch")

    monkeypatch.setattr(InMemoryStream, "next", no_unlabeled)
    config = cfg.load("digits_supervised", TINY + ["train.steps=20"])
    train(config, tmp_path / "whole")
    train(cfg.load("digits_supervised", TINY + ["train.steps=10"]), tmp_path / "cut")
    train(config, tmp_path / "cut", resume=True)
    want = _metrics(tmp_path / "whole" / "metrics.jsonl")
    assert _metrics(tmp_path / "cut" / "metrics.jsonl") == want
    whole = torch.load(tmp_path / "whole" / "last.pt", weights_only=False)
    cut = torch.load(tmp_path / "cut" / "last.pt", weights_only=False)
    for key, value in whole["student"].items():
        assert torch.equal(value, cut["student"][key]), key


def test_a_batch_that_does_not_split_over_the_processes_is_a_data_error():
    """Under torchrun, data.batch_size=7 over 2 processes ended in a ValueError traceback on each
    rank; a DataError is what the trainer turns into one line."""
    from mpl_fast.data.sources import build_data
    from mpl_fast.data.splits import DataError

    d = cfg.load("digits", ["data.batch_size=7"])["data"]
    with pytest.raises(DataError, match="data.batch_size=7 must divide by the world size 2"):
        build_data(d, 1, torch.device("cpu"), rank=1, world=2)
    assert build_data(d, 1, torch.device("cpu"), rank=0, world=1) is not None


def test_sync_bn_under_torchrun_on_cpus_is_refused_before_the_networks(tmp_path, monkeypatch):
    """On CPUs (gloo), SyncBatchNorm failed inside DDP's constructor with a traceback a rank."""
    from mpl_fast.train import distributed, loop

    monkeypatch.setattr(loop.distributed, "init", lambda device_type: distributed.Context(0, 2))
    config = cfg.load("digits", TINY + ["train.sync_bn=true", "train.device=cpu",
                                        "data.batch_size=8"])
    with pytest.raises(loop.TrainError, match="train.sync_bn needs CUDA devices"):
        loop.Run(config, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_more_processes_on_a_node_than_its_gpus_is_one_line_before_any_rendezvous(
        tmp_path, monkeypatch, capsys):
    """torchrun --nproc_per_node=4 on a node showing 2 GPUs: local ranks 2 and 3 failed in
    torch.cuda.set_device ("invalid device ordinal", a traceback each), after the others had
    joined the process group; now each says it in one line, before any rendezvous."""
    import torch.distributed as dist

    from mpl_fast import cli

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "3")
    out = tmp_path / "run"
    args = ["train", "--out", str(out), "--device", "cuda", *[f"--set={s}" for s in TINY]]
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "local rank 3 has no GPU of its own: this node shows 2" in err
    assert "--nproc_per_node=2" in err
    assert not dist.is_initialized() and not out.exists()


@pytest.mark.slow
def test_resume_under_torchrun_without_the_checkpoint_says_where_it_must_be(tmp_path):
    """Every process of a torchrun reads DIR/last.pt on resume, so on nodes that do not share
    the run folder's filesystem the others have none: the line says so (in one process it
    names the missing file alone)."""
    (tmp_path / "empty").mkdir()
    done = [subprocess.run([*_ddp_cmd(tmp_path / "empty", 4, n), "--resume"], text=True,
                           capture_output=True, timeout=600,
                           env=_subprocess_env(OMP_NUM_THREADS="1")) for n in (1, 2)]
    lines = [[ln for ln in d.stderr.splitlines() if ln.startswith("mpl-fast: error:")]
             for d in done]
    assert done[0].returncode == 2 and done[1].returncode != 0
    assert lines[0] == [f"mpl-fast: error: --resume: no checkpoint at {tmp_path}/empty/last.pt"]
    # each process finds no checkpoint; torchrun stops the other once one has ended, which may
    # be before it has said so
    assert len(lines[1]) in (1, 2) and all(
        "put the run folder on a filesystem all nodes share" in ln for ln in lines[1]), lines
    assert list((tmp_path / "empty").iterdir()) == []


def test_resuming_a_run_past_its_steps_is_refused_and_changes_nothing(tmp_path, capsys):
    """A run at step 4 resumed with --steps 2 trained nothing, evaluated and finetuned again and
    rewrote config.yaml with 2 steps; now it stops in one line, its files as they were."""
    from mpl_fast import cli

    run_dir = tmp_path / "run"
    args = ["train", "--out", str(run_dir), *[f"--set={s}" for s in TINY]]
    assert cli.main([*args, "--steps", "4"]) == 0
    before = {f.name: f.read_bytes() for f in run_dir.iterdir() if f.is_file()}
    capsys.readouterr()
    assert cli.main([*args, "--steps", "2", "--resume"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "at step 4, past train.steps=2" in err, err
    assert {f.name: f.read_bytes() for f in run_dir.iterdir() if f.is_file()} == before
    assert cli.main([*args, "--steps", "5", "--resume"]) == 0  # more steps continue it
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == 5


@pytest.mark.parametrize("graph", [False, "emulate"])
def test_nonfinite_loss_is_skipped_and_never_reaches_weights(tmp_path, graph):
    """A step whose losses are not finite is skipped on the device (no host read of a loss):
    weights, BatchNorm statistics and counts, momentum, the feedback's baseline and the EMA of
    the student stay as they were, graphed or not; the run counts it, and stops after
    max_nonfinite_skips consecutive ones."""
    config = cfg.load("digits", TINY + ["train.steps=6", "train.max_nonfinite_skips=3",
                                        "train.device=cpu", f"train.cuda_graph={graph}"])
    run_dir = tmp_path / "nan"
    from mpl_fast.data import stream as stream_mod
    from mpl_fast.train import loop

    original_next = stream_mod.InMemoryStream.next
    calls = {"n": 0}

    def poisoned(self):
        batch = original_next(self)
        calls["n"] += 1
        if calls["n"] == 2:
            batch.x_l = batch.x_l * float("nan")
            batch.x_us = batch.x_us * float("nan")
        return batch

    stream_mod.InMemoryStream.next = poisoned
    seen = []
    # the trainer's step: the MPL step and the EMA update after it (what a graph captures)
    original_step = loop.StepWithEMA.__call__

    from tests.step_state import ema_state, flat, learned_state

    state = lambda trainer_step: (flat(learned_state(trainer_step.step_fn))  # noqa: E731
                                  + ema_state(trainer_step.ema))

    def spy(self, batch, step=0):
        before = state(self)
        metrics = original_step(self, batch, step)
        after = state(self)
        seen.append((float(metrics["nonfinite"]), len(before) == len(after) and all(
            torch.equal(a, b) for a, b in zip(before, after))))
        return metrics

    loop.StepWithEMA.__call__ = spy
    try:
        summary = train(config, run_dir)
    finally:
        stream_mod.InMemoryStream.next = original_next
        loop.StepWithEMA.__call__ = original_step
    # the second step skipped and changed nothing; every other step changed the weights
    assert seen[1] == (1.0, True)
    assert [flag for flag, _ in seen] == [0.0, 1.0, 0.0, 0.0, 0.0, 0.0]
    assert not any(unchanged for flag, unchanged in seen if flag == 0.0)
    assert summary["nonfinite_skipped"] == 1
    rows = _metrics(run_dir / "metrics.jsonl")
    assert [r["nonfinite_skipped"] for r in rows] == [0, 1, 1, 1, 1, 1]
    assert all("nonfinite" not in r for r in rows)
    # the skipped step's row says it was skipped, without its NaN losses (and h)
    assert ["h" in r and "teacher/loss" in r for r in rows] == [True, False, True, True, True,
                                                                True]
    assert torch.load(run_dir / "last.pt", weights_only=False)["skipped"] == 1

    def all_nan(self):
        batch = original_next(self)
        batch.x_l = batch.x_l * float("nan")
        return batch

    stream_mod.InMemoryStream.next = all_nan
    try:
        with pytest.raises(TrainError, match="3 consecutive steps"), \
                warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            train(config, tmp_path / "allnan")
    finally:
        stream_mod.InMemoryStream.next = original_next
    # skipped from the first step on: the optimizers' step() ran (on the device it changed
    # nothing), so torch's scheduler-order warning does not come up
    assert not [w for w in caught if "lr_scheduler" in str(w.message)]
    assert _metrics(tmp_path / "allnan" / "metrics.jsonl")[-1]["nonfinite_skipped"] == 3


def test_corrupt_and_mismatched_checkpoints(tmp_path, capsys):
    config = cfg.load("digits", TINY + ["train.steps=10"])
    train(config, tmp_path)
    last = tmp_path / "last.pt"
    other = cfg.load("digits", TINY + ["train.steps=10", "model.student=wrn28_2"])
    with pytest.raises(checkpoint.CheckpointError, match="model.student"):
        Run(other, tmp_path).load_state_dict(checkpoint.load(last), last)
    # where and how it executes is not what it learned: a checkpoint moves to another machine
    # (the H200 run's last.pt, compiled and with its data under /tmp, evaluated on a CPU)
    elsewhere = cfg.load("digits", TINY + ["train.steps=10", "model.compile=default",
                                           "data.num_threads=1", "train.device=cpu"])
    assert {"model.compile", "data.num_threads", "data.root"} <= cfg.EXECUTION_KEYS
    Run(elsewhere, tmp_path).load_state_dict(checkpoint.load(last), last)
    state = checkpoint.load(last)
    state["config"]["data"]["root"] = "/tmp/elsewhere"
    Run(config, tmp_path).load_state_dict(state, last)
    # a CUDA generator's state (16 bytes) does not fit the CPU sampler: reseeded from the step
    state["mpl_gen"] = torch.zeros(16, dtype=torch.uint8)
    run = Run(config, tmp_path)
    run.load_state_dict(state, last)
    expected = torch.Generator().manual_seed(config["train"]["seed"] + 2 + 7919 * 10)
    assert torch.equal(run.mpl_gen.get_state(), expected.get_state())
    state["config"]["model"]["compile"] = "default"  # with a key that does matter, named alone
    state["config"]["model"]["student"] = "wrn28_2"
    with pytest.raises(checkpoint.CheckpointError, match=r"settings \(model\.student\)"):
        Run(config, tmp_path).load_state_dict(state, last)
    data = last.read_bytes()
    last.write_bytes(data[: len(data) // 2])
    with pytest.raises(checkpoint.CheckpointError, match="corrupt or truncated"):
        checkpoint.load(last)
    args = ["train", "--out", str(tmp_path), "--resume", "--steps", "20",
            *sum((["--set", s] for s in TINY), [])]
    capsys.readouterr()
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert "corrupt or truncated" in err and err.count("\n") == 1


def test_a_new_run_does_not_replace_a_run_unless_told(tmp_path, capsys):
    """Training again into a folder that holds a run stops before anything is written; with
    --overwrite the new run replaces it whole (no checkpoint, curve or event file of the old
    one left to mix with the new)."""
    tiny = sum((["--set", s] for s in TINY), [])
    train(cfg.load("digits", TINY + ["train.steps=10"]), tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    capsys.readouterr()
    assert cli.main(["train", "--out", str(tmp_path), "--steps", "6", *tiny]) == 2
    err = capsys.readouterr().err
    assert "already holds a run" in err and "--overwrite" in err and err.count("\n") == 1, err
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()} == before
    with pytest.raises(SystemExit):  # one or the other
        cli.main(["train", "--out", str(tmp_path), "--resume", "--overwrite", *tiny])
    capsys.readouterr()
    assert cli.main(["train", "--out", str(tmp_path), "--steps", "6", "--overwrite", *tiny]) == 0
    assert checkpoint.load(tmp_path / "last.pt")["step"] == 6
    assert checkpoint.load(tmp_path / "best.pt")["step"] == 6
    assert _metrics(tmp_path / "metrics.jsonl")[-1]["step"] == 6
    assert json.loads((tmp_path / "summary.json").read_text())["steps"] == 6
    assert len(list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))) == 1


def test_ctrl_c_says_where_the_run_can_continue_from(tmp_path, capsys, monkeypatch):
    from mpl_fast.train import loop

    real_step = loop.MPLStep.forward
    stop_at = {"step": 13}

    def interrupted_at(self, batch, step=0):
        if step + 1 == stop_at["step"]:
            raise KeyboardInterrupt
        return real_step(self, batch, step)

    monkeypatch.setattr(loop.MPLStep, "forward", interrupted_at)
    args = ["train", "--out", str(tmp_path), "--steps", "20",
            *sum((["--set", s] for s in TINY), [])]
    capsys.readouterr()
    assert cli.main(args) == 130
    err = capsys.readouterr().err
    # the run's first line says what it does; its last, where it can continue from
    assert err.splitlines()[0] == ("mpl on digits (100 labeled of 1258, 539 test), teacher "
                                   "small_cnn, student small_cnn, batch 8 + 2x unlabeled, 20 steps "
                                   f"from scratch on cpu -> {tmp_path}")
    assert err.splitlines()[-1] == (f"mpl-fast: interrupted; {tmp_path / 'last.pt'} holds step "
                                    f"10: the same command with --resume continues from there")
    stop_at["step"] = None
    assert cli.main([*args, "--resume"]) == 0
    assert "20 steps from step 10 on cpu" in capsys.readouterr().err.splitlines()[0]
    assert checkpoint.load(tmp_path / "last.pt")["step"] == 20
    # UDA only is the MPL method without its feedback: the first line says which
    assert cli.main([*args, "--steps", "1", "--overwrite", "--set", "mpl.mpl_weight=0"]) == 0
    captured = capsys.readouterr()
    assert captured.err.splitlines()[0].startswith(
        "mpl without feedback (mpl.mpl_weight=0: UDA only) on digits")
    assert captured.out.startswith("done: 1 steps, mpl without feedback (mpl.mpl_weight=0: UDA "
                                   "only)  top-1 student")
    # and without UDA either, the student learns from the teacher's pseudo labels alone
    assert cli.main([*args, "--steps", "1", "--overwrite", "--set", "mpl.mpl_weight=0",
                     "--set", "mpl.uda_weight=0"]) == 0
    assert capsys.readouterr().err.splitlines()[0].startswith(
        "mpl without feedback or UDA (mpl.mpl_weight=0, mpl.uda_weight=0: pseudo labels) on digits")
    # the teacher's weak view as the step runs it ('auto', the default, keeps a BN teacher's
    # joint forward: no mention above), and not at all where nothing reads it
    weak_apart = ["--set", "mpl.teacher_weak_no_grad=true"]
    for extra, says in (([], "apart, without autograd"),
                        (["--set", "mpl.uda_weight=0"], "unread: not computed"),
                        (["--set", "mpl.teacher_weak_no_grad=joint"],
                         "in the joint forward, without autograd")):
        assert cli.main([*args, "--steps", "1", "--overwrite", *weak_apart, *extra]) == 0
        assert (f"batch 8 + 2x unlabeled (weak view {says}), 1 steps"
                in capsys.readouterr().err.splitlines()[0])
    # before the first checkpoint there is nothing to continue from
    stop_at["step"] = 4
    capsys.readouterr()
    assert cli.main([*args[:2], str(tmp_path / "new"), *args[3:]]) == 130
    assert capsys.readouterr().err.splitlines()[-1] == "mpl-fast: interrupted"


def _printed(out):
    return {k: float(v) for k, v in (line.split() for line in out.splitlines()[1:])}


def test_a_full_disk_stops_the_run_in_one_line_and_keeps_the_last_checkpoint(tmp_path, capsys,
                                                                             monkeypatch):
    import errno

    real_save = torch.save
    saves = []

    def save_until_the_disk_fills(obj, f):
        saves.append(Path(f.name).name)
        if saves.count("last.pt.tmp") == 2:  # last.pt at step 10 written, at step 20 not
            f.write(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        real_save(obj, f)

    monkeypatch.setattr(checkpoint.torch, "save", save_until_the_disk_fills)
    args = ["train", "--out", str(tmp_path), "--steps", "20",
            *sum((["--set", s] for s in TINY), [])]
    capsys.readouterr()
    assert cli.main(args) == 2
    err = capsys.readouterr().err.splitlines()[-1]
    assert err == (f"mpl-fast: error: cannot write checkpoint {tmp_path / 'last.pt'} (No space "
                   f"left on device); the previous one, if any, is unchanged")
    assert not (tmp_path / "last.pt.tmp").exists()  # its space given back
    assert checkpoint.load(tmp_path / "last.pt")["step"] == 10


def test_cuda_rng_states_of_more_gpus_than_this_machine_has_are_restored_where_they_fit(
        monkeypatch):
    from mpl_fast.train import loop

    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s, i: calls.append((s, i)))
    state = {"torch": torch.get_rng_state(), "python": loop.random.getstate(),
             "numpy": loop.np.random.get_state(), "cuda": ["gpu0", "gpu1", "gpu2", "gpu3"]}
    loop._set_rng_state(state)  # saved on 4 GPUs, restored on 2
    assert calls == [("gpu0", 0), ("gpu1", 1)]


def test_a_long_evaluation_inside_a_run_shows_progress_and_a_quick_one_does_not(
        tmp_path, capsys, monkeypatch):
    """A periodic, final or finetuned evaluation of ImageNet's 50000 test images takes a while:
    lines every few seconds (here every batch, as if each took that long), none for one done in
    an instant (the digits run's output stays as it was)."""
    from mpl_fast import progress
    from mpl_fast.train import loop

    overrides = TINY + ["train.steps=10", "train.eval_every=5", "train.finetune_steps=2",
                        "train.eval_batch_size=200"]
    train(cfg.load("digits", overrides), tmp_path / "quick")
    assert "eval:" not in capsys.readouterr().err
    monkeypatch.setattr(loop, "ProgressLines", lambda what, unit, **kw: progress.ProgressLines(
        what, unit, every=0.0, silent_if_quick=kw.get("silent_if_quick", False)))
    train(cfg.load("digits", overrides), tmp_path / "slow")
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("eval:")]
    # steps 5 and 10, then the finetuned student: 539 test images in batches of 200
    assert [ln.split(" test images")[0] for ln in lines] == [
        f"eval: {n}/539" for n in (200, 400, 539)] * 3, lines


def test_eval_command(tmp_path, capsys):
    summary = train(cfg.load("digits", TINY + ["train.steps=10", "train.finetune_steps=3"]),
                    tmp_path)
    capsys.readouterr()
    assert cli.main(["eval", "--checkpoint", str(tmp_path / "last.pt")]) == 0
    out, err = capsys.readouterr()
    assert out.splitlines()[0] == f"{tmp_path / 'last.pt'}, step 10"
    test_images = json.loads((tmp_path / "split.json").read_text())["test"]
    assert err.splitlines()[-1].startswith(f"eval: {test_images}/{test_images} test images, ")
    got = _printed(out)
    assert got["ema_student_top1"] == pytest.approx(summary["ema_student_top1"], abs=1e-4)
    assert got["teacher_top1"] == pytest.approx(summary["teacher_top1"], abs=1e-4)
    # a run folder stands for its last.pt
    assert cli.main(["eval", "--checkpoint", str(tmp_path)]) == 0
    assert _printed(capsys.readouterr().out) == got
    # finetuned.pt holds the finetuned student alone: evaluated as such, as the run reported it
    assert cli.main(["eval", "--checkpoint", str(tmp_path / "finetuned.pt")]) == 0
    tuned = _printed(capsys.readouterr().out)
    assert set(tuned) == {"finetuned_student_top1", "finetuned_student_top5"}
    assert tuned["finetuned_student_top1"] == pytest.approx(summary["finetuned_student_top1"],
                                                            abs=1e-4)
    # a checkpoint of a run trained on a GPU with the graphed step evaluates on this machine
    state = checkpoint.load(tmp_path / "last.pt")
    state["config"]["train"].update(device="cuda", cuda_graph=True)
    checkpoint.save(state, tmp_path / "from_gpu.pt")
    assert cli.main(["eval", "--checkpoint", str(tmp_path / "from_gpu.pt")]) == 0
    assert _printed(capsys.readouterr().out) == got
    state = checkpoint.load(tmp_path / "finetuned.pt")
    state["student"] = {k: v for k, v in state["student"].items() if "weight" not in k}
    checkpoint.save(state, tmp_path / "cut.pt")
    assert cli.main(["eval", "--checkpoint", str(tmp_path / "cut.pt")]) == 2
    err = capsys.readouterr().err
    assert "does not fit this run" in err and err.count("\n") == 1
    assert cli.main(["eval", "--checkpoint", str(tmp_path / "nope.pt")]) == 2
    # a checkpoint written before a config key existed still evaluates (the key's default)
    state = checkpoint.load(tmp_path / "last.pt")
    del state["config"]["model"]["checkpoint"]
    checkpoint.save(state, tmp_path / "old.pt")
    capsys.readouterr()
    assert cli.main(["eval", "--checkpoint", str(tmp_path / "old.pt")]) == 0
    assert "teacher_top1" in capsys.readouterr().out


def test_train_cli_bad_input(tmp_path, capsys):
    for args in (["--set", "train.nosuch=1"], ["--config", "nope"], ["--steps", "0"],
                 ["--resume"]):
        assert cli.main(["train", "--out", str(tmp_path / "x"), *args]) == 2, args
        err = capsys.readouterr().err
        assert err.startswith("mpl-fast: error:") and err.count("\n") == 1, err


# no UDA threshold: a confidence mask can flip on a 1e-8 difference and amplify it
DDP = TINY + ["model.teacher=mlp", "model.student=mlp", "mpl.pseudo_labels=argmax",
             "mpl.uda_weight=0.0"]


def _launcher(nproc):
    """The command line that starts `mpl-fast` in nproc processes (torchrun for more than one)."""
    return ([sys.executable, "-m", "torch.distributed.run", "--standalone",
             f"--nproc_per_node={nproc}", "-m", "mpl_fast.cli"] if nproc > 1
            else [sys.executable, "-m", "mpl_fast.cli"])


def _ddp_cmd(out, steps, nproc, *extra):
    sets = sum((["--set", s] for s in DDP), [])
    return [*_launcher(nproc), "train", "--out", str(out), "--steps", str(steps), "--device", "cpu",
            *sets, *extra]


def _weights(path):
    state = checkpoint.load(path)
    return {f"{m}.{k}": v for m in ("student", "teacher", "ema") for k, v in state[m].items()}


@pytest.mark.slow
def test_ddp_two_gloo_processes_match_one_process_and_resume(tmp_path):
    env = _subprocess_env(OMP_NUM_THREADS="1")

    def run(cmd):
        return _run_ok(cmd, env)

    finetune = ("--set", "train.finetune_steps=6")
    run(_ddp_cmd(tmp_path / "one", 20, 1, *finetune))
    two_done = run(_ddp_cmd(tmp_path / "two", 20, 2, *finetune))
    one, two = _weights(tmp_path / "one" / "last.pt"), _weights(tmp_path / "two" / "last.pt")
    rows = _metrics(tmp_path / "one" / "metrics.jsonl")
    assert any(r.get("lr/student", 0) > 0 and r.get("h", 0) != 0 for r in rows)  # both learn
    for k in one:
        assert torch.allclose(one[k].float(), two[k].float(), atol=1e-5), k
    # the two replicas shared each evaluation (half the test batches each) and report the
    # whole test split's accuracies, as one process does (within an image: the weights agree
    # to 1e-5, so a near-tie may flip)
    evals = [[{k: v for k, v in r.items() if k.startswith("eval/")}
              for r in _metrics(tmp_path / run / "metrics.jsonl") if "eval/student_top1" in r]
             for run in ("one", "two")]
    assert len(evals[0]) == len(evals[1]) == 2
    for a, b in zip(*evals):
        assert a.keys() == b.keys() and len(a) == 6
        for k in a:
            assert b[k] == pytest.approx(a[k], abs=1.5 / 539), k
    # the finetuning is data-parallel too: both replicas take their slice of each labeled batch
    # (rank 0 alone used to finetune on its half batch while the other waited at a barrier), so
    # two processes reach one process's finetuned weights; rank 0 alone shows its progress
    tuned = [checkpoint.load(tmp_path / run / "finetuned.pt")["student"] for run in ("one", "two")]
    for k in tuned[0]:
        assert torch.allclose(tuned[0][k].float(), tuned[1][k].float(), atol=1e-5), k
    summaries = [json.loads((tmp_path / run / "summary.json").read_text())
                 for run in ("one", "two")]
    assert summaries[1]["finetuned_student_top1"] == pytest.approx(
        summaries[0]["finetuned_student_top1"], abs=1.5 / 539)
    assert two_done.stderr.count("finetune 6/6 steps") == 1
    # two processes, stopped at step 10 and resumed to 20
    run(_ddp_cmd(tmp_path / "resumed", 10, 2))
    run(_ddp_cmd(tmp_path / "resumed", 20, 2, "--resume"))
    resumed = _weights(tmp_path / "resumed" / "last.pt")
    for k in one:
        assert torch.allclose(two[k].float(), resumed[k].float(), atol=1e-6), k


@pytest.mark.slow
def test_ddp_evaluation_is_of_rank_0s_models_the_ones_its_checkpoint_holds(tmp_path):
    """Without SyncBatchNorm each replica's BN statistics follow its slice of the batch; the
    replicas share an evaluation with rank 0's statistics broadcast, so the run logs exactly what
    evaluating its last.pt in one process gives (convolutional networks with BatchNorm)."""
    from mpl_fast.train.loop import run_from_checkpoint

    env = _subprocess_env(OMP_NUM_THREADS="1")
    out = tmp_path / "bn"
    cmd = _ddp_cmd(out, 6, 2, "--set", "model.teacher=small_cnn", "--set",
                   "model.student=small_cnn", "--set", "train.eval_every=6")
    _run_ok(cmd, env)
    logged = [r for r in _metrics(out / "metrics.jsonl") if "eval/student_top1" in r][-1]
    run, _, _ = run_from_checkpoint(out / "last.pt", ["train.device=cpu"])
    alone = run.evaluate()
    assert {k: logged[k] for k in alone} == alone
    # `mpl-fast eval` under torchrun: the replicas share the evaluation and rank 0 alone reports
    # it (every rank printed its table, the lines interleaved), the same table as one process
    evals = [_run_ok([*_launcher(nproc), "eval", "--checkpoint", str(out), "--set",
                      "train.device=cpu"], env)
             for nproc in (1, 2)]
    assert evals[1].stdout == evals[0].stdout and evals[0].stdout.count("\n") == 7
    # its progress is the pass's, not rank 0's half of it
    assert evals[1].stderr.count("eval: 539/539 test images") == 1


@pytest.mark.slow
def test_ddp_replicas_each_write_their_profile(tmp_path):
    """Under torchrun each replica profiles the same steps into profile/rank<r>/ (a straggler or
    a wait in an all-reduce shows on its own rank); rank 0 says where they went."""
    env = _subprocess_env(OMP_NUM_THREADS="1")
    out = tmp_path / "prof"
    done = _run_ok(_ddp_cmd(out, 5, 2, "--profile", "2", "--set", "train.profile_from=2"), env)
    summaries = [json.loads((out / "profile" / f"rank{r}" / "summary.json").read_text())
                 for r in (0, 1)]
    assert [s["steps"] for s in summaries] == [[3, 4], [3, 4]]
    for rank, summary in enumerate(summaries):  # each replica's own phases and trace
        assert all(summary["ms_per_step"][p] > 0 for p in ("teacher_forward", "feedback"))
        assert (out / "profile" / f"rank{rank}" / "trace.json.gz").exists()
    assert not (out / "profile" / "summary.json").exists()
    assert done.stderr.count("profile: steps 3-4") == 1 and "rank*" in done.stderr


@pytest.mark.slow
@pytest.mark.parametrize("estimator", [
    ["mpl.estimator=dot", "mpl.baseline_decay=null"],
    ["mpl.estimator=second_order", "mpl.pseudo_labels=soft", "mpl.baseline_decay=null"]])
def test_ddp_with_the_gradient_estimators_matches_one_process(tmp_path, estimator):
    """dot and second_order take the gradient of CE_new with autograd.grad (no backward through
    DDP): it is averaged across replicas by hand, so two processes reach one process's weights."""
    env = _subprocess_env(OMP_NUM_THREADS="1")
    sets = sum((["--set", s] for s in estimator), [])
    for out, nproc in (("one", 1), ("two", 2)):
        _run_ok(_ddp_cmd(tmp_path / out, 12, nproc, *sets), env)
    one, two = _weights(tmp_path / "one" / "last.pt"), _weights(tmp_path / "two" / "last.pt")
    rows = _metrics(tmp_path / "one" / "metrics.jsonl")
    assert any(r.get("lr/student", 0) > 0 and r.get("h", 0) != 0 for r in rows)
    for k in one:
        assert torch.allclose(one[k].float(), two[k].float(), atol=1e-5), k


def test_bf16_autocast_and_channels_last_run(tmp_path):
    """The GPU defaults (bf16 autocast, channels_last), forced on the CPU."""
    config = cfg.load("digits", TINY + ["train.steps=12", "train.amp=bf16",
                                        "train.channels_last=true"])
    summary = train(config, tmp_path)
    rows = _metrics(tmp_path / "metrics.jsonl")
    assert all(torch.isfinite(torch.tensor(r["teacher/loss"])) for r in rows)
    assert 0.0 <= summary["ema_student_top1"] <= 1.0


def test_cudnn_benchmark_is_set_only_when_asked(tmp_path, monkeypatch):
    """train.cudnn_benchmark=true turns cuDNN's algorithm search on for the run; the default
    leaves torch's setting as the caller had it (a library user's own choice stays)."""
    base = TINY + ["train.device=cpu", "model.teacher=mlp", "model.student=mlp"]
    for before in (False, True):
        monkeypatch.setattr(torch.backends.cudnn, "benchmark", before)
        Run(cfg.load("digits", base), tmp_path / f"default{before}")
        assert torch.backends.cudnn.benchmark is before
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    Run(cfg.load("digits", base + ["train.cudnn_benchmark=true"]), tmp_path / "on")
    assert torch.backends.cudnn.benchmark is True
    with pytest.raises(cfg.ConfigError, match="train.cudnn_benchmark must be true or false"):
        cfg.load("digits", ["train.cudnn_benchmark=1"])


def test_models_by_name(monkeypatch):
    import types

    from mpl_fast.models.registry import build_model

    for name, size in (("mlp", 8), ("small_cnn", 8), ("wrn28_2", 32)):
        net = build_model(name, 7, 3, image_size=size)
        assert net(torch.randn(2, 3, size, size)).shape == (2, 7)
    wrn = build_model("wrn28_2", 10)
    assert 1.4e6 < sum(p.numel() for p in wrn.parameters()) < 1.6e6  # WRN-28-2: 1.5M
    calls = {}
    monkeypatch.setitem(sys.modules, "timm", None)  # timm not installed
    with pytest.raises(ValueError, match="unknown model 'resnet18'.*need mpl-fast.timm"):
        build_model("resnet18", 10)
    fake = types.SimpleNamespace(create_model=lambda name, **kw: calls.update(name=name, **kw)
                                 or nn.Linear(1, 1), is_model=lambda name: name == "resnet18")
    monkeypatch.setitem(sys.modules, "timm", fake)
    build_model("timm:vit_tiny_patch16_224", 10, 3)
    assert calls == {"name": "vit_tiny_patch16_224", "pretrained": False, "num_classes": 10,
                     "in_chans": 3}
    build_model("resnet18", 5, 1)  # a bare timm name
    assert calls == {"name": "resnet18", "pretrained": False, "num_classes": 5, "in_chans": 1}
    build_model("resnet50", 5)  # ours first, never timm's namesake
    assert calls["name"] == "resnet18"
    with pytest.raises(ValueError, match="unknown model 'nope'"):
        build_model("nope", 10)


@pytest.mark.slow
def test_compiled_networks_train_like_eager_ones(tmp_path, monkeypatch):
    """model.compile (torch.compile in place, inductor on the CPU here) gives the eager run's
    losses, and its checkpoints load into an eager run (same parameter names)."""
    monkeypatch.setenv("MPL_FAST_BACKEND", "torch")  # the interpreter would dominate the time
    from torch._dynamo.utils import counters

    runs, graphs = {}, {}
    for mode in ("none", "default"):
        config = cfg.load("digits", TINY + ["train.steps=4", "train.eval_every=4",
                                            f"model.compile={mode}"])
        counters.clear()
        train(config, tmp_path / mode)
        runs[mode] = _metrics(tmp_path / mode / "metrics.jsonl")
        graphs[mode] = counters["stats"]["unique_graphs"]
    assert graphs["none"] == 0 and graphs["default"] >= 2  # both networks went through dynamo
    assert len(runs["none"]) == len(runs["default"]) == 4
    for eager, compiled in zip(runs["none"], runs["default"]):
        for key in ("teacher/loss", "student/loss", "h", "eval/ema_student_top1"):
            if key in eager:
                assert compiled[key] == pytest.approx(eager[key], rel=1e-3, abs=1e-4), key
    eager_state = torch.load(tmp_path / "none" / "last.pt", weights_only=False)
    compiled_state = torch.load(tmp_path / "default" / "last.pt", weights_only=False)
    assert eager_state["student"].keys() == compiled_state["student"].keys()
    assert eager_state["teacher"].keys() == compiled_state["teacher"].keys()


@pytest.mark.slow
@pytest.mark.parametrize("weak", [True, "joint"], ids=["weak_apart", "weak_joint"])
def test_compiled_networks_in_the_graphed_step_path_give_the_eager_losses(monkeypatch, weak):
    """model.compile + train.cuda_graph (emulated here) + the gradient-free weak view (apart, or
    its rows constant in the joint forward: a torch-function mode dynamo traces), at the step
    level: dynamo compiles the frozen-BN and no-grad variants in the warm-up steps, and the
    static-buffer steps after them give the eager step's losses (the gpu test does the same with
    a real capture)."""
    monkeypatch.setenv("MPL_FAST_BACKEND", "torch")
    from torch._dynamo.utils import counters

    from mpl_fast.models.compiling import compile_net
    from mpl_fast.mpl import MPLBatch, MPLConfig, MPLStep
    from mpl_fast.train.graphed import GraphedStep

    def make():
        nets = []
        for seed in (0, 1):
            torch.manual_seed(seed)
            nets.append(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                      nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5)))
        opts = [torch.optim.SGD(n.parameters(), lr=0.05, momentum=0.9) for n in nets]
        config = MPLConfig(pseudo_labels="argmax", uda_weight=1.0, teacher_weak_no_grad=weak)
        return MPLStep(nets[0], nets[1], opts[0], opts[1], config)

    eager, inner = make(), make()
    torch._dynamo.reset()  # graphs compiled by an earlier test of the same code are not counted
    counters.clear()
    for net in (inner.teacher, inner.student):
        compile_net(net, "default")
    graphed = GraphedStep(inner, warmup_steps=3, emulate=True)
    g = torch.Generator().manual_seed(5)
    for i in range(6):
        b = MPLBatch(torch.randn(4, 3, 8, 8, generator=g), torch.randint(0, 5, (4,), generator=g),
                     torch.randn(8, 3, 8, 8, generator=g), torch.randn(8, 3, 8, 8, generator=g))
        got, want = graphed(b, i), eager(b, i)
        for key in ("teacher/loss", "student/loss", "student/ce_new", "h"):
            assert float(got[key]) == pytest.approx(float(want[key]), rel=1e-4, abs=1e-5), (i, key)
    assert counters["stats"]["unique_graphs"] >= 2


def _graph_runs(tmp_path, modes, device="cpu", extra=()):
    runs = {}
    for mode in modes:
        config = cfg.load("digits", TINY + ["train.steps=12", "train.eval_every=6",
                                            "mpl.uda_weight=1.0", "mpl.uda_ramp_steps=8",
                                            "optim.warmup_steps=4", f"train.device={device}",
                                            f"train.cuda_graph={mode}", *extra])
        summary = train(config, tmp_path / str(mode))
        runs[mode] = (_metrics(tmp_path / str(mode) / "metrics.jsonl"), summary)
    return runs


def _assert_same_run(a, b, rel, top1_abs=None):
    """Losses, h, schedules within rel; the logged top-1 within top1_abs (default rel)."""
    (rows_a, sum_a), (rows_b, sum_b) = a, b
    assert [r["step"] for r in rows_a] == [r["step"] for r in rows_b]
    for ra, rb in zip(rows_a, rows_b):
        for key in ("teacher/loss", "student/loss", "h", "uda/scale", "lr/student", "lr/teacher",
                    "eval/ema_student_top1"):
            if key in ra:
                tol = top1_abs if key.endswith("top1") and top1_abs is not None else rel
                assert rb[key] == pytest.approx(ra[key], rel=rel, abs=tol), (ra["step"], key)
    assert sum_b["ema_student_top1"] == pytest.approx(sum_a["ema_student_top1"], abs=0.02)


def test_graphed_step_path_trains_like_the_eager_step(tmp_path, monkeypatch):
    """train.cuda_graph=emulate: static batch buffers, device learning rates filled by the
    schedulers, the UDA ramp written before each replay, outputs overwritten in place: the losses,
    lrs and UDA scale of every logged step match the plain run (warm-up, ramp and schedule
    included), and a resumed emulated run matches too."""
    monkeypatch.setenv("MPL_FAST_BACKEND", "torch")
    runs = _graph_runs(tmp_path, (False, "emulate"))
    _assert_same_run(runs[False], runs["emulate"], rel=1e-5)
    scales = [r["uda/scale"] for r in runs["emulate"][0]]
    assert scales[0] < scales[-1] == 1.0  # the ramp moved: not a value baked in at capture
    lrs = [r["lr/student"] for r in runs["emulate"][0]]
    assert len(set(lrs)) > 3
    # the static batch takes each step's true labels too: the pseudo labels' accuracy follows
    accuracy = {mode: [r["pseudo/accuracy"] for r in rows] for mode, (rows, _) in runs.items()}
    assert accuracy["emulate"] == accuracy[False] and len(set(accuracy[False])) > 1


def test_checkpoints_move_between_graphed_and_plain_runs(tmp_path):
    """The optimizers' lr kind (device tensor for graphed runs, float otherwise) is this run's
    after loading a checkpoint of the other kind, with the same values."""
    base = TINY + ["train.device=cpu", "model.teacher=mlp", "model.student=mlp"]
    plain = Run(cfg.load("digits", base), tmp_path / "a")
    graphed = Run(cfg.load("digits", base + ["train.cuda_graph=emulate"]), tmp_path / "b")
    with warnings.catch_warnings():  # moved without an optimizer step, on purpose: torch warns
        warnings.simplefilter("ignore", UserWarning)
        for sched in (plain.student_sched, plain.teacher_sched):
            sched.step()
    graphed.load_state_dict(plain.state_dict(), "plain")
    back = Run(cfg.load("digits", base), tmp_path / "c")
    back.load_state_dict(graphed.state_dict(), "graphed")
    for run, kind in ((graphed, torch.Tensor), (back, float)):
        for opt, ref in ((run.student_opt, plain.student_opt),
                         (run.teacher_opt, plain.teacher_opt)):
            for group, ref_group in zip(opt.param_groups, ref.param_groups):
                assert isinstance(group["lr"], kind)
                assert float(group["lr"]) == pytest.approx(ref_group["lr"])


def test_graphed_run_skips_nonfinite_steps_and_needs_a_gpu(tmp_path, monkeypatch):
    monkeypatch.setenv("MPL_FAST_BACKEND", "torch")
    config = cfg.load("digits", TINY + ["train.steps=12", "train.cuda_graph=emulate",
                                        "train.device=cpu", "optim.student_lr=1.0e+30",
                                        "optim.teacher_lr=1.0e+30"])
    # a diverged graphed run skips its non-finite steps as a plain run does, then stops
    with pytest.raises(TrainError, match="10 consecutive steps with a non-finite loss"):
        train(config, tmp_path / "nan")
    if not torch.cuda.is_available():
        config = cfg.load("digits", TINY + ["train.cuda_graph=true", "train.device=cpu"])
        with pytest.raises(TrainError, match="needs a CUDA device"):
            train(config, tmp_path / "cpu")


@pytest.mark.gpu
def test_cuda_graph_run_matches_the_eager_run_on_a_gpu(tmp_path, monkeypatch):
    """In fp32 with TF32 off (cuDNN may pick other convolution algorithms inside the graph, and
    TF32's 1e-3 rounding then differs between the runs). Top-1 is allowed two of the 539 test
    images: a near-chance network after 12 steps has near-ties that a last-bit change flips (the
    second H200 sitting saw one image flip with TF32 on while every loss agreed to 1e-3)."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    runs = _graph_runs(tmp_path, (False, True), device="cuda", extra=("train.amp=off",))
    _assert_same_run(runs[False], runs[True], rel=1e-3, top1_abs=2.5 / 539)


def test_graphed_step_refuses_a_batch_of_another_shape():
    from mpl_fast.mpl import MPLBatch
    from mpl_fast.train.graphed import BatchShapeChanged, GraphedStep

    calls = []

    def step(batch, i):
        calls.append(batch)
        return {"loss": batch.x_l.sum()}

    graphed = GraphedStep(step, warmup_steps=1, emulate=True)

    def make(n):
        return MPLBatch(torch.randn(n, 2), torch.zeros(n, dtype=torch.long), torch.randn(3, 2),
                        torch.randn(3, 2))

    first, second = make(4), make(4)
    graphed(first, 0)
    out = graphed(second, 1)
    assert calls[0] is first and calls[1] is not second  # after warm-up: the static copy
    assert float(out["loss"]) == pytest.approx(float(second.x_l.sum()))
    with pytest.raises(BatchShapeChanged, match="x_l was \\[4, 2\\] at capture, now \\[5, 2\\]"):
        graphed(make(5), 2)


def test_an_emulated_replay_sees_the_captured_step_and_what_prepare_replay_wrote():
    """A real replay reruns the capture's work, host values of its step argument included; only
    what prepare_replay writes into device tensors moves on. The emulation must behave so, or it
    would pass a step whose host-side schedule a graph freezes."""
    from mpl_fast.mpl import MPLBatch
    from mpl_fast.train.graphed import GraphedStep

    class Step:
        def __init__(self):
            self.moved = torch.zeros(())

        def prepare_replay(self, i):
            self.moved.fill_(i)

        def __call__(self, batch, i):
            return {"host": torch.tensor(float(i)), "device": self.moved + 0}

    graphed = GraphedStep(Step(), warmup_steps=1, emulate=True)
    batch = MPLBatch(torch.randn(2, 2), torch.zeros(2, dtype=torch.long), torch.randn(3, 2),
                     torch.randn(3, 2))
    # warm-up at 0, "capture" at 1, replays; read at once: a replay overwrites the outputs
    seen = [{k: float(v) for k, v in graphed(batch, i).items()} for i in range(5)]
    assert [out["host"] for out in seen] == [0, 1, 1, 1, 1]
    assert [out["device"] for out in seen] == [0, 1, 2, 3, 4]


def test_a_network_that_cannot_take_the_images_stops_in_one_line(tmp_path, monkeypatch, capsys):
    """A network whose downsampling outruns the data's images (timm's ConvNeXt on the 8x8 digits)
    stops before the run writes anything, in one line naming it; a network that takes them is
    left as it was (training mode, buffers unchanged)."""
    from mpl_fast.train import loop

    real = loop.build_model

    def build(name, classes, channels, **kw):
        if name == "small_cnn":
            return real(name, classes, channels, **kw)
        return nn.Sequential(nn.Conv2d(channels, 4, 9), nn.Flatten(), nn.LazyLinear(classes))

    monkeypatch.setattr(loop, "build_model", build)
    out = tmp_path / "run"
    args = ["train", "--out", str(out), "--steps", "2", "--set", "model.student=too_small"]
    assert cli.main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(
        "mpl-fast: error: model: too_small cannot take the data's 1x8x8 images (")
    assert not out.exists()
    run = Run(cfg.load("digits", TINY), tmp_path / "fine")
    assert run.student.training and run.teacher.training
    fresh = real("small_cnn", 10, 1, image_size=8)
    for (n, a), b in zip(run.student.state_dict().items(), fresh.state_dict().values()):
        if "running" in n or "num_batches" in n:
            assert torch.equal(a, b), n


def test_checkpoint_blocks_limits_the_wrapped_blocks_and_is_validated(tmp_path):
    from mpl_fast.models.checkpointing import CheckpointedBlock

    def wrapped(net):
        return sum(isinstance(m, CheckpointedBlock) for m in net.modules())

    base = TINY + ["train.steps=2", "model.teacher=wrn28_2", "model.student=wrn28_2",
                   "model.checkpoint=teacher"]
    run = Run(cfg.load("digits", base + ["model.checkpoint_blocks=3"]), tmp_path / "a")
    assert wrapped(run.teacher) == 3 and wrapped(run.student) == 0
    run = Run(cfg.load("digits", base), tmp_path / "b")  # null: every block
    assert wrapped(run.teacher) == 12
    for bad in ("model.checkpoint_blocks=0", "model.checkpoint_blocks=true",
                "model.checkpoint_blocks=half"):
        with pytest.raises(cfg.ConfigError, match="model\\.checkpoint_blocks"):
            cfg.load("digits", base + [bad])
    with pytest.raises(cfg.ConfigError, match="needs model\\.checkpoint"):
        cfg.load("digits", TINY + ["model.checkpoint_blocks=3"])
    # a network without blocks (small_cnn, the default) would run without any checkpoint
    with pytest.raises(TrainError, match=r"^model.checkpoint=student: the student \(small_cnn\) "
                       "has no blocks to checkpoint \\(WRN or ResNet blocks, or a Sequential"):
        Run(cfg.load("digits", TINY + ["model.checkpoint=student"]), tmp_path / "c")


def test_accuracies_of_several_models_in_one_pass():
    from mpl_fast.train.evaluate import accuracies

    torch.manual_seed(0)
    x, y = torch.randn(50, 6), torch.randint(0, 7, (50,))
    good = nn.Linear(6, 7)
    bad = nn.Sequential(nn.Linear(6, 7), nn.BatchNorm1d(7)).eval()
    passes = []

    def batches():
        passes.append(1)
        for i in range(0, 50, 16):  # an odd last batch
            yield x[i:i + 16], y[i:i + 16]

    both = accuracies({"good": good, "bad": bad}, batches())
    assert len(passes) == 1  # the data is read once for all the models
    for name, model in (("good", good), ("bad", bad)):
        pred = model(x).topk(5, dim=1).indices
        assert both[name]["top1"] == pytest.approx((pred[:, 0] == y).float().mean().item())
        top5 = (pred == y[:, None]).any(1).float().mean().item()
        assert both[name]["top5"] == pytest.approx(top5)
        assert accuracies({name: model}, batches())[name] == both[name]  # alone, the same
    assert good.training and not bad.training  # each model's mode comes back
    assert accuracies({"good": good}, iter(())) == {"good": {"top1": 0.0, "top5": 0.0}}


class _ThreadAllReduce:
    """An all-reduce (sum) among threads standing in for data-parallel replicas."""

    def __init__(self, world):
        import threading

        self.barrier, self.parts = threading.Barrier(world), [None] * world

    def sum_for(self, rank):
        def sum_across(t):
            self.parts[rank] = t.clone()
            self.barrier.wait()
            total = torch.stack(self.parts).sum(0)
            self.barrier.wait()
            return total
        return sum_across


class _Counted(nn.Module):
    """A model that notes the size of each batch it runs on."""

    def __init__(self, model, seen):
        super().__init__()
        self.model, self.seen = model, seen

    def forward(self, x):
        self.seen.append(len(x))
        return self.model(x)


@pytest.mark.parametrize("world", [2, 3, 5])
def test_replicas_share_an_evaluation_and_each_gets_the_whole_sets_accuracy(world):
    """Under torchrun each replica evaluates its share of the test set (eval_share: the batches
    from its rank on, every world-th) and the counts are summed across replicas: every replica
    gets what one process gets alone, each batch run once, the same batches as one process runs
    (5 replicas over 4 batches: one replica evaluates nothing)."""
    import threading

    from mpl_fast.data.sources import eval_share
    from mpl_fast.train.evaluate import Shard, accuracies

    torch.manual_seed(1)
    x, y = torch.randn(58, 6), torch.randint(0, 7, (58,))
    nets = {"a": nn.Linear(6, 7), "b": nn.Linear(6, 7)}

    def batches(rows):
        return ((x[rows[i:i + 16]], y[rows[i:i + 16]]) for i in range(0, len(rows), 16))
    alone_seen = []
    alone = accuracies({name: _Counted(net, alone_seen) for name, net in nets.items()},
                       batches(list(range(58))))
    reduce, results, seen = _ThreadAllReduce(world), [None] * world, [[] for _ in range(world)]
    shares = [eval_share(58, 16, rank, world) for rank in range(world)]

    def replica(rank):
        models = {name: _Counted(net, seen[rank]) for name, net in nets.items()}
        shard = Shard(reduce.sum_for(rank), torch.device("cpu"))
        results[rank] = accuracies(models, batches(shares[rank]), shard=shard)
    threads = [threading.Thread(target=replica, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert all(r == alone for r in results), (results, alone)
    assert 0 < alone["a"]["top1"] < alone["a"]["top5"] < 1  # counts that a share would change
    assert sorted(sum(shares, [])) == list(range(58))  # every image once
    sizes = [16, 16, 16, 10]
    for rank in range(world):  # batch i of the set on replica i % world, whole
        mine = [size for i, size in enumerate(sizes) if i % world == rank]
        assert sorted(seen[rank]) == sorted(mine * 2), (rank, seen[rank])
        assert shares[rank] == [r for i in range(rank, 4, world)
                                for r in range(16 * i, min(16 * i + 16, 58))]
    assert sorted(sum(seen, [])) == sorted(alone_seen)


def test_digits_replicas_each_get_their_share_of_the_test_set():
    from mpl_fast.data.sources import build_data, eval_share

    d = cfg.load("digits")["data"]
    alone = build_data(d, 1, torch.device("cpu"))
    xs, ys = (torch.cat(parts) for parts in zip(*alone.eval_batches(100, "cpu")))
    assert torch.equal(ys, alone.labels("test")) and len(ys) == 539
    for rank, sizes in enumerate(([100, 100, 100], [100, 100, 39])):  # batches 0, 2, 4; 1, 3, 5
        data = build_data(d, 1, torch.device("cpu"), rank=rank, world=2)
        got = list(data.eval_batches(100, "cpu"))
        assert [len(y) for _, y in got] == sizes
        rows = eval_share(539, 100, rank, 2)
        assert torch.equal(torch.cat([x for x, _ in got]), xs[rows])
        assert torch.equal(torch.cat([y for _, y in got]), ys[rows])


def test_a_warning_of_every_step_is_shown_once(tmp_path, monkeypatch):
    """Python shows a warning once per place under its default filter; the loop must not reset
    that record every step (leaving warnings.catch_warnings does), or a warning raised in each
    step is repeated each step."""
    from mpl_fast.train.ema import ModelEMA

    monkeypatch.setenv("MPL_FAST_BACKEND", "torch")
    real_update = ModelEMA.update

    def warning_update(self, model, skip=None):
        warnings.warn("a warning of every step", UserWarning)
        return real_update(self, model, skip)
    monkeypatch.setattr(ModelEMA, "update", warning_update)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        train(cfg.load("digits", TINY + ["train.steps=4", "model.teacher=mlp",
                                         "model.student=mlp"]), tmp_path / "run")
    assert len([w for w in caught if "a warning of every step" in str(w.message)]) == 1
