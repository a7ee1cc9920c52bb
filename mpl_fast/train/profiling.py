"""Where a run's time goes: torch.profiler over a window of training steps (`train.profile_steps`
steps from this session's `train.profile_from`-th), written to DIR/profile/, and the per-phase
sums that this profile and `mpl-fast bench step` both report."""
import bisect
import inspect
import json
import os
import sys
import time
import warnings
from pathlib import Path

import torch

from mpl_fast.mpl.step import PHASES
from mpl_fast.train.run_log import where_it_ran

# The training loop's own ranges (mpl_fast.train.loop). A step's work outside the MPL phases
# counts as "step": all of it when the step is one CUDA graph replay (the phases are host ranges
# that a replay does not run), or a supervised step.
LOOP_RANGES = ("train/data", "train/step", "train/schedules", "train/eval", "train/log",
               "train/checkpoint")
TOP_OPS = 20
OUTPUTS = ("trace.json.gz", "summary.json", "ops.txt")  # in DIR/profile/


def clear_profile(out_dir):
    """Remove a former run's profile (a new run in its folder), its replicas' too."""
    base = Path(out_dir) / "profile"
    for folder in (base, *base.glob("rank*")):
        for name in OUTPUTS:
            (folder / name).unlink(missing_ok=True)


def _windows(events, names):
    """(starts, [(start, end, short name)]) of the ranges named, sorted by start."""
    cpu = torch.autograd.DeviceType.CPU
    found = sorted((e.time_range.start, e.time_range.end, e.name.split("/", 1)[1])
                   for e in events if e.name in names and e.device_type == cpu)
    return [start for start, _, _ in found], found


def _containing(starts, windows, t):
    i = bisect.bisect_right(starts, t) - 1
    return windows[i][2] if i >= 0 and t < windows[i][1] else None


def phase_times(events, device_time, outer=()):
    """ms per phase from profiler events. A phase is a range MPLStep records on the calling thread;
    every op that starts inside that range's span counts towards it, whichever thread ran it: a
    GPU backward's kernels are launched from autograd's own device thread, so the range's call
    tree (and its GPU span) holds only the optimizer step that follows. Each op adds its own
    (self) time, device or CPU, so nothing is counted twice. An op in no phase counts towards
    the `outer` range it starts in (the loop's, which hold the phases), else "other". Device work
    that no host op holds (a CUDA graph replay's kernels) counts where its launch started."""
    inner_starts, inner = _windows(events, PHASES)
    outer_starts, outer_windows = _windows(events, outer)
    out = {name: 0.0 for _, _, name in inner + outer_windows}
    out["other"] = 0.0

    def add(t, us):
        phase = (_containing(inner_starts, inner, t)
                 or _containing(outer_starts, outer_windows, t) or "other")
        out[phase] += us

    cpu = torch.autograd.DeviceType.CPU
    for e in events:
        if e.device_type != cpu:  # device work: its host op's self time below, or unheld
            continue
        us = e.self_device_time_total if device_time else e.self_cpu_time_total
        if us:
            add(e.time_range.start, us)
    if device_time:
        for launch, us in _unheld_device_work(events, PHASES + tuple(outer)):
            add(launch, us)
    return {k: round(v / 1e3, 3) for k, v in out.items()}


def _unheld_device_work(events, ranges):
    """(host time of the launch, device us) of each kernel or copy that no host op holds: torch
    gives an op the device time of the kernels linked to it, but a CUDA graph's kernels were
    captured under ops long gone and a replay runs them under none (seen on an H200: a graphed
    run's whole step went uncounted). Each is placed by the runtime call that launched it (the
    replay's cudaGraphLaunch, same correlation id), or at the end of time ("other") without one.
    The device-side copies of the ranges are spans, not work."""
    cpu = torch.autograd.DeviceType.CPU
    held, launches = set(), {}
    for e in events:
        if e.device_type != cpu:
            continue
        linked = getattr(e, "linked_correlation_id", 0)
        if linked == 0 and not getattr(e, "is_async", False):
            held.add(getattr(e, "id", 0))  # an op: the kernels linked to it are in its time
        elif linked > 0:
            launches[e.id] = e.time_range.start  # a runtime call (cudaLaunchKernel, ...)
    held.discard(0)
    for e in events:
        if (e.device_type == cpu or e.name in ranges or getattr(e, "is_user_annotation", False)
                # any range's GPU-side span (kineto's gpu_user_annotation: compiled graphs' too)
                or "annotation" in str(getattr(e, "activity_type", "") or "").lower()
                or getattr(e, "linked_correlation_id", 0) in held):
            continue
        yield launches.get(getattr(e, "id", 0), float("inf")), e.self_device_time_total


def host_times(events, names=PHASES + LOOP_RANGES):
    """ms the calling thread spent inside each range named (its span on the host, waits
    included), summed over its occurrences; the loop's `step` holds the step's phases. Set beside
    phase_times' device time, it says whether a part is bound by the host (launches, Python,
    waiting for data) or by the GPU's work."""
    cpu = torch.autograd.DeviceType.CPU
    out = {}
    for e in events:
        if e.name in names and e.device_type == cpu:
            short = e.name.split("/", 1)[1]
            out[short] = out.get(short, 0.0) + (e.time_range.end - e.time_range.start)
    return {k: round(v / 1e3, 3) for k, v in out.items()}


def _write_atomically(path: Path, text: str):
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class RunProfiler:
    """Records the loop iterations [first, first + count) of this session (0-based; the profiler
    warms up during the one before) and writes DIR/profile/ (DIR/profile/rank<r>/ for each of
    several replicas): trace.json.gz (the whole trace, for
    Perfetto or chrome://tracing), summary.json (per-step time of each phase and of the costliest
    ops, the host's time in each range, wall time a step, images/s, the window's peak GPU memory)
    and ops.txt (torch's table of the ops). Call step() after every iteration and close() when the
    loop ends; a window the run's end cuts short is written with the steps it holds, one of a
    failed run is not written.
    A profiler that does not start, or a profile that cannot be written (a full disk), is said in
    one line and the run goes on."""

    def __init__(self, out_dir, count: int, first: int, device: torch.device, start_step: int,
                 images_per_step: int, graphed: bool = False, rank: int = 0, world: int = 1):
        # under torchrun every replica records its own (stragglers, waits in the all-reduces)
        self.dir = Path(out_dir) / "profile" / (f"rank{rank}" if world > 1 else "")
        self.main = rank == 0  # says where the profile went; any replica says what failed
        self.who = f"rank {rank}: " if world > 1 else ""
        self.count, self.first, self.start_step, self.graphed = count, first, start_step, graphed
        self.images_per_step = images_per_step
        self.device = device
        self.gpu = device.type == "cuda"
        self.device_name = where_it_ran(device)["device"]
        self.seen = self.recorded = 0
        self.summary = None
        self._began = self._ended = None
        self._write_it = True
        self.prof = None
        if count <= 0:
            return
        from torch.profiler import ProfilerActivity, profile, schedule

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.gpu else [])
        # one cycle (repeat=1): keeping events across cycles changes nothing, and says so to
        # torch, which otherwise warns that it clears them at each cycle's end (seen on the H200)
        once = ({"acc_events": True} if "acc_events" in inspect.signature(profile).parameters
                else {})
        with warnings.catch_warnings():  # from step 0 there is no step to warm up in: known
            warnings.filterwarnings("ignore", message=".*won't be using warmup")
            self.prof = profile(activities=activities,
                                schedule=schedule(wait=max(first - 1, 0), warmup=min(first, 1),
                                                  active=count, repeat=1),
                                on_trace_ready=self._write, **once)
        try:
            self.prof.start()
        except RuntimeError as err:  # e.g. no CUPTI: the run matters more than its profile
            self.prof = None
            print(f"profile: {self.who}off, torch.profiler did not start "
                  f"({str(err).splitlines()[0]})",
                  file=sys.stderr, flush=True)
            return
        if first == 0:
            self._began = self._begin()

    def _now(self):
        if self.gpu:
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def _begin(self):
        """The window starts: its clock, and its own peak of GPU memory."""
        if self.gpu:
            torch.cuda.reset_peak_memory_stats(self.device)
        return self._now()

    def step(self):
        """After each iteration of the training loop."""
        if self.prof is None:
            return
        self.seen += 1
        if self.first < self.seen <= self.first + self.count:  # the iteration just run was recorded
            self.recorded += 1
            if self.seen == self.first + self.count:
                self._ended = self._now()  # before the profiler's own work at the window's end
        self.prof.step()  # writes the profile after the window's last step
        if self.seen == self.first:
            self._began = self._begin()

    def close(self, completed: bool = True):
        """The loop ended (completed) or failed; idempotent."""
        if self.prof is None:
            return
        prof, self.prof = self.prof, None
        self._write_it = completed
        if self.recorded and self._ended is None:
            self._ended = self._now()
        prof.stop()  # writes a window cut short by the run's end
        if completed and not self.recorded and self.main:
            print(f"profile: nothing recorded: this session ran {self.seen} steps, the window "
                  f"starts after {self.first} (train.profile_from)", file=sys.stderr, flush=True)

    def _write(self, prof):
        if not self._write_it or not self.recorded:
            return
        try:
            self._write_files(prof)
        except Exception as err:  # a full disk, or anything else: the run matters more
            for name in OUTPUTS:
                for leftover in self.dir.glob(name + ".tmp*"):
                    leftover.unlink(missing_ok=True)
            why = (err.strerror or str(err)) if isinstance(err, OSError) else \
                f"{type(err).__name__}: {err}"
            print(f"profile: {self.who}not written ({why}): {self.dir}", file=sys.stderr,
                  flush=True)

    def _write_files(self, prof):
        n = self.recorded
        events = prof.events()
        times = phase_times(events, self.gpu, LOOP_RANGES)
        host = host_times(events)
        key = "self_device_time_total" if self.gpu else "self_cpu_time_total"
        averages = prof.key_averages()
        ranges = set(PHASES + LOOP_RANGES)  # spans holding ops, not ops
        ops = [a for a in averages if a.key not in ranges and not a.key.startswith("ProfilerStep")]
        top = sorted(ops, key=lambda a: getattr(a, key), reverse=True)[:TOP_OPS]
        first_step = self.start_step + self.first + 1  # steps as metrics.jsonl numbers them
        wall_ms = (self._ended - self._began) * 1e3 / n
        self.summary = {
            "steps": [first_step, first_step + n - 1], "profiled_steps": n,
            "device": self.device_name, "graphed": self.graphed,
            "time": "summed GPU kernel time" if self.gpu else "CPU time of the ops",
            "wall_ms_per_step": round(wall_ms, 3),
            "images_per_second": round(self.images_per_step * 1e3 / wall_ms, 1),
            "peak_mem_gib": (round(torch.cuda.max_memory_allocated(self.device) / 2**30, 3)
                             if self.gpu else None),
            "ms_per_step": {k: round(v / n, 3) for k, v in times.items()},
            "host_ms_per_step": {k: round(v / n, 3) for k, v in host.items()},
            "top_ops": [{"name": a.key, "ms_per_step": round(getattr(a, key) / 1e3 / n, 4),
                         "calls_per_step": round(a.count / n, 2)} for a in top],
            "trace": "trace.json.gz"}
        self.dir.mkdir(parents=True, exist_ok=True)
        partial = self.dir / "trace.json.gz.tmp.gz"  # torch compresses by the name's suffix
        prof.export_chrome_trace(str(partial))
        os.replace(partial, self.dir / "trace.json.gz")
        _write_atomically(self.dir / "ops.txt", averages.table(
            sort_by=key, row_limit=40) + "\n")
        _write_atomically(self.dir / "summary.json", json.dumps(self.summary, indent=2) + "\n")
        if not self.main:
            return
        shown = ", ".join(f"{k} {v:.2f}" for k, v in self.summary["ms_per_step"].items() if v)
        where = self.dir.parent / "rank*" if self.who else self.dir  # rank 0's figures shown
        print(f"profile: steps {first_step}-{first_step + n - 1}, "
              f"ms a step ({self.summary['time']}): "
              f"{shown}; wall {wall_ms:.1f} ({self.summary['images_per_second']:.0f} images/s)"
              f" -> {where} "
              "(trace.json.gz: Perfetto or chrome://tracing)", file=sys.stderr, flush=True)
