"""Profiling a run (`train.profile_steps`): the window of steps recorded, what DIR/profile/ holds,
how phases are counted, and runs whose window is cut short, never reached, or that fail."""
import gzip
import json
from types import SimpleNamespace as Ev

import pytest
import torch

from mpl_fast.mpl.step import PHASES
from mpl_fast.train import config as cfg
from mpl_fast.train.loop import Run, TrainError, train
from mpl_fast.train.profiling import LOOP_RANGES, host_times, phase_times

TINY = ["data.batch_size=8", "data.mu=2", "train.log_every=1", "train.eval_every=100",
        "train.checkpoint_every=100", "train.finetune_steps=0", "train.eval_batch_size=128",
        "model.teacher=mlp", "model.student=mlp"]
MPL_PHASES = [p.split("/", 1)[1] for p in PHASES]
CPU, CUDA = torch.autograd.DeviceType.CPU, torch.autograd.DeviceType.CUDA


def _ev(name, start, end, device_us=0.0, cpu_us=0.0, device=CPU):
    return Ev(name=name, device_type=device, time_range=Ev(start=start, end=end),
              self_device_time_total=device_us, self_cpu_time_total=cpu_us)


def test_phase_times_count_work_launched_from_other_threads():
    """A GPU backward's kernels are launched from autograd's device thread, outside the call tree
    of the range that called backward(): they count towards the phase whose span they start in,
    each op with its own time, and device-side copies of the ranges count for nothing."""
    events = [
        _ev("mpl/teacher_forward", 0, 100, cpu_us=5),
        _ev("aten::conv", 10, 20, device_us=3000, cpu_us=10),
        _ev("mpl/teacher_backward_step", 100, 300, cpu_us=7),
        # launched from autograd's thread
        _ev("autograd::engine::evaluate_function", 120, 250, device_us=6000, cpu_us=90),
        _ev("aten::_fused_sgd_", 260, 280, device_us=500, cpu_us=20),
        _ev("mpl/teacher_backward_step", 100, 140, device_us=800, device=CUDA),  # GPU span
        _ev("aten::copy_", 400, 410, device_us=100, cpu_us=4),
    ]
    assert phase_times(events, device_time=True) == {
        "teacher_forward": 3.0, "teacher_backward_step": 6.5, "other": 0.1}
    assert phase_times(events, device_time=False) == {
        "teacher_forward": 0.015, "teacher_backward_step": 0.117, "other": 0.004}


def test_phase_times_prefer_the_step_phases_to_the_loop_ranges_holding_them():
    """The loop's ranges hold the step's phases: an op in a phase counts there, an op in the
    step's range but in no phase (a graph replay, the supervised step) counts as "step", and the
    same ranges repeated over several steps add up."""
    events = []
    for k in range(2):  # two steps, 1000 us apart
        t = 1000 * k
        events += [
            _ev("train/data", t, t + 50, cpu_us=1),
            _ev("aten::copy_", t + 10, t + 20, device_us=30),
            _ev("train/step", t + 50, t + 900, cpu_us=2),
            _ev("aten::fill_", t + 60, t + 70, device_us=5),  # in the step, before any phase
            _ev("mpl/teacher_forward", t + 100, t + 400, cpu_us=3),
            _ev("aten::conv", t + 150, t + 160, device_us=200),
            _ev("mpl/feedback", t + 400, t + 500, cpu_us=3),
            _ev("aten::dot", t + 450, t + 460, device_us=7),
            _ev("train/schedules", t + 900, t + 950, cpu_us=1),
            _ev("aten::_foreach_lerp_", t + 910, t + 920, device_us=40),
        ]
    events.append(_ev("aten::item", 5000, 5001, device_us=1))
    assert phase_times(events, device_time=True, outer=LOOP_RANGES) == {
        "data": 0.06, "step": 0.01, "teacher_forward": 0.4, "feedback": 0.014,
        "schedules": 0.08, "other": 0.001}
    # without the loop's ranges, what is outside the phases is "other"
    assert phase_times(events, device_time=True)["other"] == 0.06 + 0.01 + 0.08 + 0.001


def test_phase_times_count_a_graph_replays_kernels_where_it_was_launched():
    """A CUDA graph replay's kernels are linked to no op of the window (they were captured under
    ops long gone): they count where the runtime call that launched them (same correlation id)
    started, kernels linked to an op of the window count once, through that op, and a kernel
    whose launch is unknown counts as "other" rather than nowhere (an H200 run's graphed step
    showed 0.006 ms of kernels a step before)."""
    def ev(name, start, end, id, linked, device_us=0.0, device=CPU, annotation=False):
        e = _ev(name, start, end, device_us=device_us, device=device)
        e.id, e.linked_correlation_id, e.is_async, e.is_user_annotation = (
            id, linked, False, annotation)
        e.activity_type = ("gpu_user_Annotation" if name.startswith("##") else
                           "kernel" if device == CUDA else "cpu_op")
        return e

    events = [
        ev("train/step", 50, 900, id=1, linked=0),
        ev("cudaGraphLaunch", 100, 120, id=501, linked=1),  # the replay's runtime call
        ev("void conv_kernel<...>", 2000, 6000, id=501, linked=977, device_us=4000, device=CUDA),
        ev("void bn_kernel<...>", 6000, 8000, id=501, linked=977, device_us=2000, device=CUDA),
        ev("aten::add_", 150, 160, id=2, linked=0, device_us=300),  # holds its kernel's time
        ev("cudaLaunchKernel", 152, 155, id=502, linked=2),
        ev("void add_kernel<...>", 8000, 8300, id=502, linked=2, device_us=300, device=CUDA),
        ev("train/step", 2000, 8300, id=1, linked=0, device_us=6300, device=CUDA,
           annotation=True),  # the range's span on the GPU
        ev("Memcpy DtoH", 9000, 9050, id=777, linked=0, device_us=50, device=CUDA),
        # a compiled graph's GPU-side span, not flagged as a user annotation: its activity says
        ev("## Call CompiledFxGraph ##", 2000, 6000, id=778, linked=0, device_us=4000,
           device=CUDA),
        ev("train/schedules", 900, 950, id=3, linked=0),
    ]
    assert phase_times(events, device_time=True, outer=LOOP_RANGES) == {
        "step": 6.3, "schedules": 0.0, "other": 0.05}
    # CPU time is the host ops' alone
    assert phase_times(events, device_time=False, outer=LOOP_RANGES)["step"] == 0.0


def test_host_times_are_the_ranges_spans_on_the_calling_thread():
    """The host's time in a range is its span (waits included), summed over its occurrences;
    ops and the GPU-side copies of ranges do not count."""
    events = [_ev("train/data", 0, 400, cpu_us=1), _ev("aten::copy_", 10, 20, cpu_us=10),
              _ev("train/step", 400, 1000), _ev("mpl/feedback", 500, 600),
              _ev("mpl/feedback", 500, 900, device=CUDA),
              _ev("train/data", 1000, 1100)]
    assert host_times(events) == {"data": 0.5, "step": 0.6, "feedback": 0.1}


def _trace_names(path):
    with gzip.open(path, "rt") as f:
        trace = json.load(f)
    names = {}
    for e in trace["traceEvents"]:
        if e.get("ph") == "X":
            names[e["name"]] = names.get(e["name"], 0) + 1
    return names


def _profiled(tmp_path, steps, profile_steps, profile_from, extra=(), resume=False,
              out="run"):
    config = cfg.load("digits", TINY + [f"train.steps={steps}",
                                        f"train.profile_steps={profile_steps}",
                                        f"train.profile_from={profile_from}", *extra])
    train(config, tmp_path / out, resume=resume)
    return tmp_path / out / "profile"


def test_a_run_profiles_the_steps_of_its_window(tmp_path, monkeypatch, capsys):
    """Steps 4-6 of 9 (profile_from 3, profile_steps 3): the trace holds those three steps' ranges
    and no others, summary.json numbers them as metrics.jsonl does and gives each phase and the
    loop's parts in ms a step, ops.txt is torch's table; a line on stderr says where it went."""
    monkeypatch.setenv("MPL_FAST_BACKEND", "torch")
    prof = _profiled(tmp_path, steps=9, profile_steps=3, profile_from=3,
                     extra=["train.eval_every=5", "train.checkpoint_every=5"])
    summary = json.loads((prof / "summary.json").read_text())
    assert summary["steps"] == [4, 6] and summary["profiled_steps"] == 3
    assert summary["device"] == "cpu" and summary["graphed"] is False
    assert summary["peak_mem_gib"] is None  # a GPU's only
    images = 8 * (1 + 2 * 2)  # labeled batch and both unlabeled views
    assert summary["images_per_second"] == pytest.approx(
        images * 1e3 / summary["wall_ms_per_step"], rel=1e-3)
    ms = summary["ms_per_step"]
    assert set(MPL_PHASES) <= set(ms) and all(ms[p] > 0 for p in MPL_PHASES), ms
    assert ms["data"] > 0 and ms["eval"] > 0 and ms["checkpoint"] > 0  # step 5 evaluates, saves
    assert ms["log"] > 0  # every step logs here
    # the loop's ranges hold nearly all of it (op times on a shared machine: a loose bound)
    assert ms["other"] < 0.25 * sum(ms.values()), ms
    host = summary["host_ms_per_step"]
    loop_parts = ("data", "step", "schedules", "log", "eval", "checkpoint")
    assert set(MPL_PHASES + list(loop_parts)) <= set(host), host
    assert host["step"] >= sum(host[p] for p in MPL_PHASES)  # the step's range holds its phases
    assert sum(host[p] for p in loop_parts) <= summary["wall_ms_per_step"] * 1.02
    for p in MPL_PHASES:  # on a CPU a phase's ops run inside its span
        assert host[p] >= 0.9 * ms[p], (p, host[p], ms[p])
    assert 0 < sum(ms.values()) <= 1.2 * summary["wall_ms_per_step"]  # op time within the wall's
    names = _trace_names(prof / "trace.json.gz")
    for rng in PHASES + ("train/data", "train/step", "train/schedules", "train/log"):
        assert names.get(rng) == 3, (rng, names.get(rng))
    assert names.get("train/eval") == 1 and names.get("train/checkpoint") in (1, 2)  # best.pt
    top = summary["top_ops"]
    assert any(o["name"] == "aten::addmm" for o in top)  # the MLPs' work
    assert not [o for o in top if o["name"] in PHASES + LOOP_RANGES
                or o["name"].startswith("ProfilerStep")]  # ops, not the ranges holding them
    assert [o["ms_per_step"] for o in top] == sorted((o["ms_per_step"] for o in top), reverse=True)
    assert "Self CPU" in (prof / "ops.txt").read_text()
    err = capsys.readouterr().err
    assert "profile: steps 4-6" in err and str(prof) in err
    logged = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in logged]
    assert [r["step"] for r in rows] == list(range(1, 10))  # the run itself is unchanged


def test_a_supervised_run_counts_its_step_whole(tmp_path, monkeypatch):
    monkeypatch.setenv("MPL_FAST_BACKEND", "torch")
    prof = _profiled(tmp_path, steps=4, profile_steps=2, profile_from=1,
                     extra=["method=supervised"])
    ms = json.loads((prof / "summary.json").read_text())["ms_per_step"]
    assert not set(MPL_PHASES) & set(ms) and ms["step"] > 0


def test_a_window_cut_short_never_reached_or_of_a_failed_run(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MPL_FAST_BACKEND", "torch")
    # the run ends inside the window: the steps recorded are written
    prof = _profiled(tmp_path, steps=4, profile_steps=5, profile_from=2, out="short")
    summary = json.loads((prof / "summary.json").read_text())
    assert summary["steps"] == [3, 4] and summary["profiled_steps"] == 2
    assert _trace_names(prof / "trace.json.gz")["train/step"] == 2
    # the run ends before it: nothing written, and said
    capsys.readouterr()
    prof = _profiled(tmp_path, steps=3, profile_steps=2, profile_from=5, out="never")
    assert not prof.exists()
    assert "profile: nothing recorded" in capsys.readouterr().err
    # a run that fails inside its window writes no profile
    real = Run.evaluate

    def failing(self, *args, **kwargs):
        if self.step == 3:
            raise TrainError("disk gone")
        return real(self, *args, **kwargs)
    monkeypatch.setattr(Run, "evaluate", failing)
    with pytest.raises(TrainError, match="disk gone"):
        _profiled(tmp_path, steps=6, profile_steps=3, profile_from=1,
                  extra=["train.eval_every=3"], out="failed")
    assert not (tmp_path / "failed" / "profile").exists()


def test_a_profile_that_cannot_be_written_leaves_the_run_going(tmp_path, monkeypatch, capsys):
    """A full disk at the window's end: one line says the profile was not written, no partial file
    stays, and the run trains to its end."""
    from torch.profiler import profile

    monkeypatch.setenv("MPL_FAST_BACKEND", "torch")

    def full_disk(self, path):
        with open(path, "w") as f:
            f.write("{")  # a partial file, as a full disk leaves
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(profile, "export_chrome_trace", full_disk)
    prof = _profiled(tmp_path, steps=5, profile_steps=2, profile_from=1)
    assert "profile: not written (No space left on device)" in capsys.readouterr().err
    assert not list(prof.iterdir())
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == 5
    # a fault of its own summary (here a stand-in) is said the same way
    from mpl_fast.train import profiling

    def broken(*args, **kwargs):
        raise ValueError("an event without a range")
    monkeypatch.setattr(profiling, "phase_times", broken)
    prof = _profiled(tmp_path, steps=3, profile_steps=1, profile_from=1, out="broken")
    assert "profile: not written (ValueError: an event without a range)" in \
        capsys.readouterr().err
    assert not prof.exists()


def test_a_profiler_that_does_not_start_leaves_the_run_going(tmp_path, monkeypatch, capsys):
    from torch.profiler import profile

    monkeypatch.setenv("MPL_FAST_BACKEND", "torch")

    def no_cupti(self):
        raise RuntimeError("CUPTI_ERROR_NOT_INITIALIZED\nmore detail")
    monkeypatch.setattr(profile, "start", no_cupti)
    prof = _profiled(tmp_path, steps=4, profile_steps=2, profile_from=1)
    err = capsys.readouterr().err
    assert "profile: off, torch.profiler did not start (CUPTI_ERROR_NOT_INITIALIZED)" in err
    assert not prof.exists()
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["steps"] == 4


def test_a_resumed_run_profiles_from_its_sitting_and_overwrite_clears_a_profile(tmp_path,
                                                                               monkeypatch):
    monkeypatch.setenv("MPL_FAST_BACKEND", "torch")
    _profiled(tmp_path, steps=4, profile_steps=1, profile_from=0,
              extra=["train.checkpoint_every=4"])
    assert json.loads((tmp_path / "run/profile/summary.json").read_text())["steps"] == [1, 1]
    prof = _profiled(tmp_path, steps=8, profile_steps=2, profile_from=1, resume=True)
    assert json.loads((prof / "summary.json").read_text())["steps"] == [6, 7]
    config = cfg.load("digits", TINY + ["train.steps=2"])
    train(config, tmp_path / "run", overwrite=True)
    assert not any((tmp_path / "run" / "profile").iterdir())


def test_the_train_command_profiles_with_profile_n(tmp_path, monkeypatch, capsys):
    from mpl_fast import cli

    monkeypatch.setenv("MPL_FAST_BACKEND", "torch")
    sets = [a for kv in TINY + ["train.profile_from=1"] for a in ("--set", kv)]
    out = tmp_path / "cli"
    assert cli.main(["train", "--steps", "3", "--profile", "2", "--out", str(out), *sets]) == 0
    assert json.loads((out / "profile" / "summary.json").read_text())["steps"] == [2, 3]
    assert cli.main(["train", "--profile", "-1", "--out", str(tmp_path / "bad")]) == 2
    assert "train.profile_steps must be >= 0" in capsys.readouterr().err


def test_profile_settings_are_validated():
    for bad, key in ((["train.profile_steps=-1"], "train.profile_steps"),
                     (["train.profile_from=-2"], "train.profile_from"),
                     (["train.profile_steps=x"], "train.profile_steps"),
                     # the profiler may not even warm up while the step's graph is captured
                     (["train.cuda_graph=true", "train.profile_steps=2", "train.profile_from=4"],
                      "train.profile_from must be >= 5")):
        with pytest.raises(cfg.ConfigError, match=key.replace(".", "\\.")):
            cfg.load("digits", bad)
    cfg.load("digits", ["train.cuda_graph=true", "train.profile_steps=2", "train.profile_from=5"])
    cfg.load("digits", ["train.cuda_graph=emulate", "train.profile_steps=2",
                        "train.profile_from=0"])  # no capture


@pytest.mark.gpu
def test_a_graphed_run_on_a_gpu_profiles_its_replays(tmp_path, monkeypatch):
    """After the capture the step is one replay: the MPL phases are not recorded (host ranges a
    replay does not run) and the replay's kernels count towards "step"."""
    prof = _profiled(tmp_path, steps=9, profile_steps=3, profile_from=5,
                     extra=["train.device=cuda", "train.cuda_graph=true"])
    summary = json.loads((prof / "summary.json").read_text())
    assert summary["graphed"] is True and summary["time"] == "summed GPU kernel time"
    ms, host = summary["ms_per_step"], summary["host_ms_per_step"]
    assert not set(MPL_PHASES) & set(ms) and not set(MPL_PHASES) & set(host)
    assert ms["step"] > 0.5 * sum(ms.values()), ms
    assert host["step"] > 0


@pytest.mark.gpu
def test_an_eager_run_on_a_gpu_profiles_kernel_time_by_phase(tmp_path):
    prof = _profiled(tmp_path, steps=6, profile_steps=2, profile_from=2,
                     extra=["train.device=cuda"])
    summary = json.loads((prof / "summary.json").read_text())
    assert 0 < summary["peak_mem_gib"] < torch.cuda.get_device_properties(0).total_memory / 2**30
    ms = summary["ms_per_step"]
    assert all(ms[p] > 0 for p in MPL_PHASES), ms
    assert sum(ms[p] for p in MPL_PHASES) > 0.5 * sum(ms.values()), ms
    assert all(summary["host_ms_per_step"][p] > 0 for p in MPL_PHASES)
    assert any(o["ms_per_step"] > 0 for o in summary["top_ops"])


def test_the_profiler_keeps_its_one_cycle_without_torchs_warning(tmp_path):
    """One cycle (repeat=1): the profiler is told to keep its events, so torch does not warn at
    every run that it clears them at each cycle's end (printed in the H200 run's log)."""
    import inspect

    from torch.profiler import profile

    from mpl_fast.train.profiling import RunProfiler

    if "acc_events" not in inspect.signature(profile).parameters:
        pytest.skip("this torch's profiler has no acc_events")
    prof = RunProfiler(tmp_path, 2, 1, torch.device("cpu"), start_step=0, images_per_step=1)
    try:
        assert prof.prof.acc_events is True
    finally:
        prof.close(completed=False)
    assert not (tmp_path / "profile" / "summary.json").exists()


def test_a_placement_record_is_read_from_a_profiled_run(tmp_path, monkeypatch, capsys):
    """gpu_sitting.sh's placements stage appends one line a placement with
    benchmarks/placement_record.py: the profile's window figures and the session's data wait,
    where the run ran; a run without a profile is refused in one line, nothing appended."""
    import runpy
    from pathlib import Path

    monkeypatch.setenv("MPL_FAST_BACKEND", "torch")
    script = Path(__file__).parents[1] / "benchmarks" / "placement_record.py"
    main = runpy.run_path(str(script))["main"]
    prof = _profiled(tmp_path, steps=6, profile_steps=2, profile_from=3)
    run, out = prof.parent, tmp_path / "results" / "placements.jsonl"
    assert main(["pipelines-2", str(run), str(out), "data.unlabeled_pipelines=2"]) == 0
    assert main(["preset", str(run), str(out)]) == 0
    first, second = [json.loads(line) for line in out.read_text().splitlines()]
    window = json.loads((prof / "summary.json").read_text())
    summary = json.loads((run / "summary.json").read_text())
    assert first["placement"] == "pipelines-2" and first["sets"] == ["data.unlabeled_pipelines=2"]
    assert second["placement"] == "preset" and second["sets"] == []
    assert first["wall_ms_per_step"] == window["wall_ms_per_step"] > 0
    assert first["ms_per_step"] == window["ms_per_step"] and first["profiled_steps"] == [4, 5]
    assert first["data_wait_share"] == summary["data_wait_share"]
    assert (first["gpu"], first["torch"], first["date"]) == (
        "cpu", torch.__version__, summary["date"])
    assert "pipelines-2: " in capsys.readouterr().out

    bare = tmp_path / "bare"
    train(cfg.load("digits", TINY + ["train.steps=2"]), bare)
    capsys.readouterr()
    assert main(["bare", str(bare), str(out)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("placement_record: ") and "profile" in err and "\n" not in err
    assert len(out.read_text().splitlines()) == 2
