"""`mpl-fast train`: the training loop around mpl_fast.mpl.MPLStep (or a supervised step)."""
import json
import os
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.profiler import record_function

from mpl_fast.data.dali_stream import resume_seed
from mpl_fast.data.image_folder import DataError
from mpl_fast.data.sources import build_data, eval_share
from mpl_fast.models.checkpointing import NO_BLOCKS, checkpoint_blocks
from mpl_fast.models.compiling import compile_net
from mpl_fast.models.registry import build_model
from mpl_fast.mpl import MPLStep
from mpl_fast.mpl.config import WEAK_JOINT, WEAK_SHARED
from mpl_fast.ops import backend
from mpl_fast.progress import ProgressLines
from mpl_fast.train import checkpoint, config as cfg_mod, distributed, optim, schedules
from mpl_fast.train.data_wait import DataWait
from mpl_fast.train.ema import ModelEMA, StepWithEMA
from mpl_fast.train.evaluate import Shard, accuracies
from mpl_fast.train.run_log import RunLogger, plot_curves, where_it_ran
from mpl_fast.train.skipped_steps import SkippedSteps
from mpl_fast.train.stop_signal import StopSignal, Stopped
from mpl_fast.train.graphed import BatchShapeChanged, GraphedStep
from mpl_fast.train.profiling import RunProfiler, clear_profile
from mpl_fast.train.supervised import SupervisedStep

FORMAT = 1


class TrainError(RuntimeError):
    """A run that cannot go on: one-line message."""


def resolve_device(name):
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise TrainError("train.device=cuda but no CUDA device is available")
    return torch.device(name)


def _rng_state():
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state):
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        # a machine with fewer GPUs than the one that saved: the devices it has (set_rng_state_all
        # would ask for the missing ones by index and fail)
        for index, device_state in enumerate(state["cuda"][:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(device_state, index)


class Run:
    """Everything a run holds; built from a resolved config."""

    def __init__(self, config, out_dir: Path):
        self.config, self.out = config, Path(out_dir)
        d, m, o, t = config["data"], config["model"], config["optim"], config["train"]
        self.device = resolve_device(t["device"])
        try:  # an unknown MPL_FAST_BACKEND, or Triton's on the CPU: at the first loss otherwise
            backend.check(self.device)
        except ValueError as err:
            raise TrainError(str(err)) from err
        try:
            self.dist = distributed.init(self.device.type)
        except ValueError as err:
            raise TrainError(str(err)) from err
        if self.dist.enabled and self.device.type == "cuda":
            self.device = torch.device("cuda", self.dist.local_rank)
            torch.cuda.set_device(self.device)
        mpl_config = cfg_mod.mpl_config(config)
        gpu = self.device.type == "cuda"
        self.amp = torch.bfloat16 if (t["amp"] == "bf16" or (t["amp"] == "auto" and gpu)) else None
        self.channels_last = t["channels_last"] is True or (t["channels_last"] == "auto" and gpu)
        if t["cudnn_benchmark"]:
            torch.backends.cudnn.benchmark = True
        torch.manual_seed(t["seed"])
        random.seed(t["seed"])
        np.random.seed(t["seed"])
        try:
            self.data = build_data(d, t["seed"] + 1, self.device, self.dist.rank, self.dist.world)
        except DataError as err:
            raise TrainError(str(err)) from err
        in_ch = self.data.in_channels
        self.images_per_step = d["batch_size"] * (1 + 2 * d["mu"]) if config["method"] == "mpl" \
            else d["batch_size"]
        model_kw = {"bn_momentum": m["bn_momentum"]} if m["bn_momentum"] is not None else {}

        def make(name, role):
            try:
                net = build_model(name, self.data.num_classes, in_ch,
                                  image_size=self.data.image_size, **model_kw).to(self.device)
            except (ValueError, TypeError) as err:
                raise TrainError(f"model: {err}") from err
            _check_takes_images(net, name, in_ch, self.data.image_size, self.device)
            if m["checkpoint"] in (role, "both") and not checkpoint_blocks(
                    net, limit=m["checkpoint_blocks"]):  # silently nothing would be checkpointed
                raise TrainError(f"model.checkpoint={m['checkpoint']}: the {role} ({name}) has "
                                 f"{NO_BLOCKS}")
            net = net.to(memory_format=torch.channels_last) if self.channels_last else net
            if self.dist.enabled and t["sync_bn"]:
                net = nn.SyncBatchNorm.convert_sync_batchnorm(net)
            return net

        self.graph_mode = t["cuda_graph"]
        if self.graph_mode is True and not gpu:
            raise TrainError("train.cuda_graph needs a CUDA device (train.cuda_graph=emulate runs "
                             "its static-buffer path without a graph, on any device)")
        if self.graph_mode and self.dist.enabled:
            raise TrainError("train.cuda_graph is not supported under torchrun yet")
        if t["sync_bn"] and self.dist.enabled and not gpu:  # DDP's ValueError otherwise
            raise TrainError("train.sync_bn needs CUDA devices (torch's SyncBatchNorm runs on GPU "
                             "modules only)")
        scale = d["batch_size"] / 256 if o["scale_lr_by_batch"] else 1.0
        steps = t["steps"]
        self.student = make(m["student"], "student")
        self.student_opt = optim.sgd(self.student, o["student_lr"] * scale, o["momentum"],
                                     o["nesterov"], o["weight_decay"],
                                     lr_on_device=bool(self.graph_mode))
        self.student_sched = torch.optim.lr_scheduler.LambdaLR(
            self.student_opt, schedules.wait_warmup_cosine(
                o["student_wait_steps"] if config["method"] == "mpl" else 0,
                o["warmup_steps"], steps))
        self.ema = ModelEMA(self.student, t["ema_decay"])
        compile_net(self.student, m["compile"])  # after the EMA's copy, which stays eager
        self.teacher = self.teacher_opt = self.teacher_sched = self.teacher_test_logits = None
        if config["method"] == "mpl":
            if m["teacher"] == cfg_mod.REDUCED:
                self.teacher = self._reduced_teacher(m)
            else:
                self.teacher = make(m["teacher"], "teacher")
                compile_net(self.teacher, m["compile"])
            self.teacher_opt = optim.sgd(self.teacher, o["teacher_lr"] * scale, o["momentum"],
                                         o["nesterov"], o["weight_decay"],
                                         lr_on_device=bool(self.graph_mode))
            self.teacher_sched = torch.optim.lr_scheduler.LambdaLR(
                self.teacher_opt, schedules.warmup_cosine(o["warmup_steps"], steps))
            self.mpl_gen = torch.Generator(device=self.device).manual_seed(t["seed"] + 2)
            self.step_fn = MPLStep(self.parallel(self.teacher), self.parallel(self.student),
                                   self.teacher_opt, self.student_opt, mpl_config,
                                   autocast_dtype=self.amp, generator=self.mpl_gen)
            self.step_fn.cross_replica_mean = self.dist.mean if self.dist.enabled else None
        else:
            self.mpl_gen = None
            ls = config["mpl"]["student_label_smoothing"] or 0.0
            self.step_fn = SupervisedStep(self.parallel(self.student), self.student_opt, ls,
                                          self.amp)
        # a step whose losses are not finite is skipped on the device, by every replica alike,
        # graphed or not; the loop counts the skips on the device too (SkippedSteps)
        self.step_fn.skip_nonfinite = True
        self.step_fn.cross_replica_any = self.dist.any if self.dist.enabled else None
        # train_step is what the loop calls: the step and the EMA update after it, or both
        # replayed as one CUDA graph
        with_ema = StepWithEMA(self.step_fn, self.ema, self.student)
        self.train_step = (GraphedStep(with_ema, emulate=self.graph_mode == "emulate")
                           if self.graph_mode else with_ema)
        self.step, self.best = 0, -1.0
        self.skips = SkippedSteps(self.device)

    def parallel(self, net):
        """net under DDP where the run has several processes (net itself otherwise)."""
        if not self.dist.enabled:
            return net
        return nn.parallel.DistributedDataParallel(
            net, device_ids=[self.device.index] if self.device.type == "cuda" else None)

    def _reduced_teacher(self, m):
        """Reduced MPL: an MLP over the stored logits of a large teacher, which the data source
        now hands out with each batch; the test split's stored logits evaluate it."""
        from mpl_fast.data.logit_store import LogitStore, WithStoredLogits, store_path
        from mpl_fast.mpl.reduced import ReducedTeacher

        stores = {}
        for split in ("train", "test"):
            path = store_path(m["teacher_logits"], split)
            try:
                stores[split] = LogitStore(path)
            except (OSError, ValueError, KeyError) as err:
                raise TrainError(f"model.teacher_logits: {err} (`mpl-fast logits` writes the "
                                 "folder; --set model.teacher_logits=DIR where it is)") from err
            rows = len(self.data.labels(split))
            if (stores[split].rows, stores[split].classes) != (rows, self.data.num_classes):
                raise TrainError(f"model.teacher_logits: {path} holds {stores[split].rows} x "
                                 f"{stores[split].classes} logits, this run's {split} split "
                                 f"{rows} images of {self.data.num_classes} classes: written for "
                                 "other data")
            if stores[split].meta.get("fingerprint") != self.data.fingerprint(split):
                raise TrainError(f"model.teacher_logits: {path} was written for other data: "
                                 f"the images of this run's {split} split or their order differ")
        self.data = WithStoredLogits(self.data, stores["train"])
        self.teacher_test_logits = stores["test"]
        return ReducedTeacher(self.data.num_classes, m["reduced_hidden"],
                              m["reduced_temperature"]).to(self.device)

    # -- checkpoint ------------------------------------------------------------------------
    def state_dict(self):
        state = {"format": FORMAT, "config": self.config, "step": self.step, "best": self.best,
                 **dict(zip(("skipped", "consecutive_skips"), self.skips.state())),
                 "student": self.student.state_dict(), "ema": self.ema.state_dict(),
                 "student_opt": self.student_opt.state_dict(),
                 "student_sched": self.student_sched.state_dict(),
                 "data": self.data.state_dict(), "rng": _rng_state()}
        if self.teacher is not None:
            state.update(teacher=self.teacher.state_dict(),
                         teacher_opt=self.teacher_opt.state_dict(),
                         teacher_sched=self.teacher_sched.state_dict(),
                         mpl=self._mpl_state(), mpl_gen=self.mpl_gen.get_state())
        return state

    def load_state_dict(self, state, path):
        checkpoint.check_compatible(state, self.config, path)
        try:
            self.student.load_state_dict(state["student"])
            self.ema.load_state_dict(state["ema"])
            self.student_opt.load_state_dict(state["student_opt"])
            self.student_sched.load_state_dict(state["student_sched"])
            if self.teacher is not None:
                self.teacher.load_state_dict(state["teacher"])
                self.teacher_opt.load_state_dict(state["teacher_opt"])
                self.teacher_sched.load_state_dict(state["teacher_sched"])
                if self.step_fn.baseline is not None:
                    self.step_fn.baseline.load_state_dict(state["mpl"]["baseline"])
                self._load_mpl_gen(state["mpl_gen"], state["step"])
            self.data.load_state_dict(state["data"])
            for opt in (self.student_opt, self.teacher_opt):
                if opt is not None:  # the saved lr kind (float or tensor) may not be this run's
                    optim.set_lr_kind(opt, self.device if self.graph_mode else None)
        except (KeyError, RuntimeError) as err:
            raise checkpoint.does_not_fit(path, err) from err
        _set_rng_state(state["rng"])
        self.step, self.best = state["step"], state["best"]
        self.skips = SkippedSteps(self.device, state["skipped"], state["consecutive_skips"])

    def _load_mpl_gen(self, saved, step):
        """The pseudo-label sampler's state, where it was saved on the same kind of device (a
        CUDA generator's state does not fit a CPU one: a GPU run's checkpoint evaluated or
        continued on a CPU); elsewhere a seed derived from the step, as the data streams do."""
        if len(saved) == len(self.mpl_gen.get_state()):
            self.mpl_gen.set_state(saved)
        else:
            self.mpl_gen.manual_seed(resume_seed(self.config["train"]["seed"] + 2, step))

    def _mpl_state(self):
        b = self.step_fn.baseline
        return {"baseline": b.state_dict() if b is not None else None}

    def save(self, name, state=None):
        """DIR/name with the run's state (or `state`): rank 0 writes, the other replicas wait
        until the file is in place."""
        if self.dist.main:
            checkpoint.save(self.state_dict() if state is None else state, self.out / name)
        self.dist.barrier()

    # -- evaluation --------------------------------------------------------------------------
    def evaluate(self, models=None, progress=None):
        """{"eval/<name>_top1", "eval/<name>_top5"} on the test split; by default of the
        student, the EMA student and the teacher. progress(images done, images) after each
        batch of images."""
        out = {}
        batch_size = self.config["train"]["eval_batch_size"]
        reduced_teacher = models is None and self.teacher_test_logits is not None
        if models is None:
            models = {"student": self.student, "ema_student": self.ema.module}
            if self.teacher is not None and not reduced_teacher:
                models["teacher"] = self.teacher
        batches = self.data.eval_batches(batch_size, self.device)
        labels = self.data.labels("test")
        # under torchrun each replica decodes and runs the models on its share of the batches,
        # all of them rank 0's models (the ones its checkpoints hold): its BN statistics everywhere
        shard, rows = None, range(len(labels))
        if self.dist.enabled:
            shard = Shard(self.dist.sum, self.device)
            rows = eval_share(len(labels), batch_size, self.dist.rank, self.dist.world)
            for model in models.values():
                self.dist.broadcast_buffers(model)

        def report(n):  # this replica's share scaled to the set: the pass's progress
            progress(n * len(labels) // max(len(rows), 1), len(labels))
        accs = accuracies(models, batches, channels_last=self.channels_last,
                          autocast_dtype=self.amp, shard=shard,
                          progress=report if progress is not None else None)
        if reduced_teacher:  # its inputs: the large teacher's stored logits on the test split
            logits = self.teacher_test_logits  # read a batch at a time from the stored map
            stored = ((logits[batch].to(self.device), labels[batch].to(self.device))
                      for start in range(0, len(rows), batch_size)
                      for batch in [torch.as_tensor(rows[start:start + batch_size])])
            accs.update(accuracies({"teacher": self.teacher}, stored, autocast_dtype=self.amp,
                                   shard=shard))
        for name, acc in accs.items():
            out[f"eval/{name}_top1"], out[f"eval/{name}_top5"] = acc["top1"], acc["top5"]
        return out

    def to_device(self, batch):
        def mv(t):
            t = t.to(self.device, non_blocking=True)
            if self.channels_last and t.dim() == 4:
                t = t.contiguous(memory_format=torch.channels_last)
            return t
        moved = {}  # by identity: one tensor in two fields (Reduced MPL's views) moves once
        for field in ("x_l", "y_l", "x_uw", "x_us", "teacher_l", "teacher_uw", "teacher_us",
                      "y_u"):
            t = getattr(batch, field)
            if t is not None:
                if id(t) not in moved:
                    moved[id(t)] = mv(t)
                setattr(batch, field, moved[id(t)])
        return batch


def _check_takes_images(net, name, channels, size, device):
    """A network that cannot take the data's images (timm's ConvNeXt on the 8x8 digits: its
    downsampling outruns them) stops here in one line, not in a traceback at the first step. One
    image in evaluation mode: no buffer or random state changes."""
    was_training = net.training
    net.eval()
    try:
        with torch.no_grad():
            net(torch.zeros(1, channels, size, size, device=device))
    except RuntimeError as err:
        raise TrainError(f"model: {name} cannot take the data's {channels}x{size}x{size} images "
                         f"({str(err).splitlines()[0]})") from err
    finally:
        net.train(was_training)


def run_from_checkpoint(path, overrides=()):
    """(run, state, path) of a checkpoint train wrote, for evaluation: last.pt and best.pt load the
    whole run; finetuned.pt, the finetuned student alone (into run.student). `path` may be a run
    folder (its last.pt). Where and how the run trained is not how it is evaluated: a GPU run's
    checkpoint runs on whatever this machine has, without the training step's CUDA graph
    (`overrides`, KEY=VALUE items, apply after that)."""
    path = Path(path)
    if path.is_dir():
        path = path / "last.pt"
    state = checkpoint.load(path)
    config = cfg_mod.from_saved(state["config"])
    config["train"].update(device="auto", cuda_graph=False)
    cfg_mod.apply_overrides(config, overrides)
    d = config["data"]
    for key in ("root", "test_root"):  # a run's data moved since: say how to point at it
        if d["name"] != "digits" and d[key] is not None and not Path(d[key]).is_dir():
            raise TrainError(f"data.{key} {d[key]} does not exist here: --set data.{key}=DIR "
                             f"where the data of {path}'s run now lives")
    run = Run(config, path.parent)
    if "ema" in state:
        run.load_state_dict(state, path)
    else:
        try:
            run.student.load_state_dict(state["student"])
        except (KeyError, RuntimeError) as err:
            raise checkpoint.does_not_fit(path, err) from err
    return run, state, path


# What a run writes besides config.yaml, split.json and metrics.jsonl (rewritten or truncated at
# the start): a new run clears those an older run left, so that nothing of the two mixes.
RUN_OUTPUTS = ("last.pt", "best.pt", "finetuned.pt", "summary.json", "curves.png")


def check_out_dir(out: Path, resume: bool, overwrite: bool):
    """A new run never replaces a run's checkpoint unless told to: nothing is lost by mistake."""
    if not resume and not overwrite and (out / "last.pt").exists():
        raise TrainError(f"{out} already holds a run (last.pt): --resume continues it, "
                         f"--overwrite trains a new one in its place, or choose another --out")


def _clear_old_run(out: Path):
    for name in RUN_OUTPUTS:
        (out / name).unlink(missing_ok=True)
    for events in (out / "tensorboard").glob("events.out.tfevents.*"):
        events.unlink()
    clear_profile(out)


def method_label(config) -> str:
    """The method as a run's lines name it: UDA only is MPL without its feedback, and without
    UDA too the student learns from pseudo labels alone."""
    mpl = cfg_mod.mpl_config(config) if config["method"] == "mpl" else None
    if mpl is None or mpl.mpl_weight != 0:
        return config["method"]
    if mpl.uda_weight == 0:
        return "mpl without feedback or UDA (mpl.mpl_weight=0, mpl.uda_weight=0: pseudo labels)"
    return "mpl without feedback (mpl.mpl_weight=0: UDA only)"


def start_line(config, described, run, resume) -> str:
    """What the run is about to do, in one line (logs read later start with it)."""
    d, m, t = config["data"], config["model"], config["train"]
    teacher = (f"reduced teacher (MLP over {m['teacher_logits']})"
               if m["teacher"] == cfg_mod.REDUCED else f"teacher {m['teacher']}")
    nets = (f"student {m['student']}" if config["method"] == "supervised"
            else f"{teacher}, student {m['student']}")
    where = f"{run.device}" + (", bf16" if run.amp is not None else "") + \
        (f", {run.dist.world} processes" if run.dist.world > 1 else "")
    start = f"from step {run.step}" if resume else "from scratch"
    # mpl.teacher_weak_no_grad as resolved ('auto' depends on the teacher)
    resolved = getattr(run.step_fn, "weak_no_grad", False)
    weak = ("" if not resolved
            else " (weak view in the joint forward, without autograd)" if resolved == WEAK_JOINT
            else " (weak view unread: not computed)" if not run.step_fn.weak_view_read
            else " (weak view apart, without autograd, with the other views' BN statistics)"
            if resolved == WEAK_SHARED
            else " (weak view apart, without autograd)")
    return (f"{method_label(config)} on {d['name']} ({described['labeled']} labeled of "
            f"{described['train']}, {described['test']} test), {nets}, batch {d['batch_size']}"
            + (f" + {d['mu']}x unlabeled{weak}" if config["method"] == "mpl" else "")
            + f", {t['steps']} steps {start} on {where} -> {run.out}")


def train(config, out_dir, resume=False, overwrite=False):
    """Run (or continue) training; returns the summary dict also written to summary.json.
    A new run into a folder holding a run's last.pt needs overwrite=True (resume continues it)."""
    out = Path(out_dir)
    check_out_dir(out, resume, overwrite)
    run = Run(config, out)  # first: a run that cannot start (data, model) leaves no folder behind
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise TrainError(f"cannot create output folder {out}: {err.strerror}") from err
    t = config["train"]
    if resume:
        last = out / "last.pt"
        if not last.exists():
            shared = (" (under torchrun every node reads it there: put the run folder on a "
                      "filesystem all nodes share)" if run.dist.world > 1 else "")
            raise TrainError(f"--resume: no checkpoint at {last}{shared}")
        run.load_state_dict(checkpoint.load(last), last)
        if run.step > t["steps"]:  # nothing to train, and config.yaml would say fewer steps
            raise TrainError(f"--resume: {out} is at step {run.step}, past train.steps="
                             f"{t['steps']} (--steps {run.step} or more continues it)")
    main = run.dist.main
    if main:
        if not resume:
            _clear_old_run(out)
        (out / "config.yaml").write_text(cfg_mod.dump(config))
        described = run.data.describe()
        (out / "split.json").write_text(json.dumps(described) + "\n")
        print(start_line(config, described, run, resume), file=sys.stderr, flush=True)
    logger = RunLogger(out, t["steps"], run.step, run.images_per_step, enabled=main)
    started = time.time()
    last_eval = None
    # the supervised method draws labeled batches alone: no unlabeled views decoded for nothing
    fetch = run.data.next_labeled if config["method"] == "supervised" else run.data.next
    data_wait = DataWait()
    # the loop's ranges (train/...) name its parts in a profile (mpl_fast.train.profiling)
    profiler = RunProfiler(out, t["profile_steps"], t["profile_from"], run.device, run.step,
                           run.images_per_step, graphed=run.graph_mode is True,
                           rank=run.dist.rank, world=run.dist.world)
    stop = StopSignal()
    try:
        while run.step < t["steps"]:
            began = time.perf_counter()
            try:
                with record_function("train/data"):
                    batch = run.to_device(fetch())
            except DataError as err:
                raise TrainError(str(err)) from err
            fetched = time.perf_counter() - began
            aside = 0.0  # evaluation and checkpoint saves: not the loop's own work
            try:
                with record_function("train/step"):
                    metrics = run.train_step(batch, run.step)
            except BatchShapeChanged as err:
                raise TrainError(str(err)) from err
            with record_function("train/schedules"):
                # the schedules follow the step count, skipped steps included
                run.skips.add(metrics["nonfinite"])
                for sched in (run.student_sched, run.teacher_sched):
                    if sched is not None:
                        sched.step()
            run.step += 1
            if run.step % t["eval_every"] == 0 or run.step == t["steps"]:
                eval_began = time.perf_counter()
                with record_function("train/eval"):
                    last_eval = run.evaluate(progress=eval_lines(run))
                metrics = {**metrics, **last_eval}
                if metrics["eval/ema_student_top1"] > run.best:
                    run.best = metrics["eval/ema_student_top1"]
                    with record_function("train/checkpoint"):
                        run.save("best.pt")
                aside += time.perf_counter() - eval_began
            logging = run.step % t["log_every"] == 0 or "eval/student_top1" in metrics
            saving = run.step % t["checkpoint_every"] == 0 or run.step == t["steps"]
            with record_function("train/log"):  # on a GPU: where the host waits for the step
                if logging or saving:
                    skipped, streak, longest = run.skips.read()
                    # a skipped step's losses (NaN) are not logged: its evaluation, if any, is
                    metrics = {k: v for k, v in metrics.items()
                               if k != "nonfinite" and (not streak or k.startswith("eval/"))}
                    metrics["nonfinite_skipped"] = skipped
                    if longest >= t["max_nonfinite_skips"]:
                        logger.log(run.step, metrics)
                        raise TrainError(f"stopping: {longest} consecutive steps with a "
                                         f"non-finite loss (by step {run.step})")
                if logging:
                    share = data_wait.share()  # the iterations since the last log
                    if share is not None:  # a wall-clock share: differs from run to run
                        metrics["time/data_wait"] = share
                    logger.log(run.step, metrics)
            if saving:
                save_began = time.perf_counter()
                with record_function("train/checkpoint"):
                    run.save("last.pt")
                aside += time.perf_counter() - save_began
            if stop.agreed(run.dist, run.device, synced_step=logging or saving):
                if not saving:
                    run.save("last.pt")
                raise Stopped(run.step, out / "last.pt")
            data_wait.add(fetched, time.perf_counter() - began - aside)
            profiler.step()
        profiler.close()  # the final evaluation and finetuning are not the loop's steps
        stop.close()  # nothing left to save: SIGTERM ends the final evaluation and finetuning
        final = (last_eval if last_eval is not None  # the last step's
                 else run.evaluate(progress=eval_lines(run)))
        summary = {"steps": run.step, "method": config["method"],
                   "student_top1": final["eval/student_top1"],
                   "ema_student_top1": final["eval/ema_student_top1"],
                   "teacher_top1": final.get("eval/teacher_top1"),
                   "best_ema_student_top1": run.best, "nonfinite_skipped": run.skips.state()[0],
                   "seconds_this_session": round(time.time() - started, 1),
                   "images_per_second": round(logger.images_per_second(run.step), 1),
                   # where this session ran: a record made from the run folder elsewhere (bench
                   # methods --resume on a finished run) names this card, not its own machine's
                   **where_it_ran(run.device)}
        share = data_wait.session_share()
        if share is not None:
            summary["data_wait_share"] = round(share, 3)
        if t["finetune_steps"] > 0:  # every replica: it is data-parallel as training is
            summary["finetuned_student_top1"] = finetune(run, t["finetune_steps"], t["finetune_lr"],
                                                         logger)
    finally:
        stop.close()
        profiler.close(completed=False)  # a failed run's window is not written
        logger.close()
    run.dist.barrier()
    if not main:
        return summary
    tmp = out / "summary.json.tmp"
    tmp.write_text(json.dumps(summary, indent=2) + "\n")
    os.replace(tmp, out / "summary.json")
    plot_curves(out / "metrics.jsonl", out / "curves.png")
    return summary


def eval_lines(run):
    """Progress lines for an evaluation inside a run, from rank 0: none for a quick one, a line
    every few seconds for a long one (ImageNet's 50000 test images)."""
    return (ProgressLines("eval:", "test images", silent_if_quick=True) if run.dist.main
            else None)


def finetune(run, steps, lr, logger=None):
    """Finetune a copy of the EMA student on the labels alone; returns its top-1 (on every
    replica). Under torchrun it is data-parallel as training is: each replica takes its slice of
    the global labeled batch, starting from rank 0's copy (DDP broadcasts its weights and BN
    statistics), and rank 0 writes finetuned.pt. Every train.log_every steps its loss goes to the
    logger (TensorBoard's finetune/loss), and progress to stderr every 5 seconds."""
    import copy

    model = copy.deepcopy(run.ema.module).train()
    for p in model.parameters():
        p.requires_grad_(True)
    opt = optim.sgd(model, lr, run.config["optim"]["momentum"], run.config["optim"]["nesterov"],
                    run.config["optim"]["weight_decay"])
    step = SupervisedStep(run.parallel(model), opt, autocast_dtype=run.amp)
    progress = ProgressLines("finetune", unit="steps") if run.dist.main else None
    log_every, shown = run.config["train"]["log_every"], ""
    for done in range(1, steps + 1):
        metrics = step(run.to_device(run.data.next_labeled()))
        if logger is not None and (done % log_every == 0 or done == steps):
            loss = float(metrics["student/loss"])  # a host synchronisation, as a log step's
            logger.log_finetune(done, loss)
            shown = f"loss {loss:.3g}"
        if progress is not None:
            progress(done, steps, shown)
    top1 = run.evaluate({"finetuned": model}, progress=eval_lines(run))["eval/finetuned_top1"]
    run.save("finetuned.pt", {"format": FORMAT, "config": run.config,
                              "student": model.state_dict()})
    return top1
