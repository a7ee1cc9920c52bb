"""The MPL step's speed against what a user writes by hand.

    mpl-fast bench step --model wrn28_2|resnet50|<timm name> [--batch-size B] [--mu M]
                        [--image-size S] [--estimator E] [--weak-no-grad [joint|shared]]
                        [--ce-old-forward separate|joint] [--no-graph]
                        [--compile MODE] [--checkpoint WHICH] [--checkpoint-blocks N]
                        [--max-batch] [--cudnn-benchmark] [--work-only] ...

Measures, in one run and on one card: ours (MPLStep with the fused ops, bf16 autocast,
channels_last, fused SGD, optionally the networks compiled, and the whole step captured in one CUDA
graph; the teacher's weak view as the trainer runs it by default, apart without autograd for a
teacher without BatchNorm only, or with --weak-no-grad for any teacher, or with --weak-no-grad
joint in the joint forward with its rows outside autograd, or with --weak-no-grad shared apart,
normalised with the labeled + strong forward's BN statistics); (a) a plain PyTorch MPL
step written here as a user would (autocast bf16, channels_last, torch SGD, kekmodel-style
losses), eager; (b) the same step with both networks under
torch.compile(mode="max-autotune-no-cudagraphs", or --reference-compile) and the whole step in one
CUDA graph; (c) a supervised step of the same shapes (the floor), captured in a CUDA graph when ours
is, so that the two compare like with like; and, when ours is graphed, (d) the plain step of (a)
graphed without compile, which shows what the graph alone gives. Median ms/step, teacher images/s,
peak memory, a per-phase breakdown of one eager step of ours (on a GPU the summed kernel time of
each phase, backward kernels included, from the profiler; see mpl_fast.train.profiling.phase_times),
each variant's summed kernel time (kernel_ms: its work without launch gaps), ratios; one JSON object
per configuration appended to benchmarks/results/step.jsonl. Each record also counts the work of
ours, the reference and the floor (conv and matmul GFLOPs of one eager step, the same on any card
and however compiled: what a step must compute, against which its time can be read); --work-only
counts that alone, without timing, on any device (step_work.jsonl).
Memory: --checkpoint teacher|student|both checkpoints our networks' blocks as model.checkpoint does
in the trainer (--checkpoint-blocks N: only the first N); the record's activation_mem_gib is the
step's peak above what stays allocated between steps (weights, optimizer state, the batch), so runs
with and without checkpointing compare activations. --max-batch also searches the largest labeled
batch (mu fixed) at which one eager, uncompiled step of ours fits on the card.
On a CPU it runs without graphs (and without compile unless --compile) as a smoke test; its times
mean nothing (its work counts are the same as on a GPU).
"""
import argparse
import datetime
import gc
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from mpl_fast.models.checkpointing import NO_BLOCKS, checkpoint_blocks
from mpl_fast.models.compiling import compile_net
from mpl_fast.models.registry import build_model
from mpl_fast.mpl import MPLBatch, MPLConfig, MPLStep
from mpl_fast.mpl.bn import uses_batch_statistics
from mpl_fast.mpl.step import PHASES
from mpl_fast.train.graphed import GraphedStep
from mpl_fast.train.optim import sgd
from mpl_fast.train.profiling import host_times, phase_times
from mpl_fast.train.run_log import append_jsonl, check_device, check_results_folder


def timed(fn, steps, warmup, device):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def graphed(step_fn, device, warmup=3):
    """Capture step_fn() (a closure over fixed inputs) in one CUDA graph; returns replay. For the
    compiled reference, written the way a user captures a step by hand."""
    if device.type != "cuda":
        return step_fn
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            step_fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step_fn()
    return graph.replay


def make_batch(args, device, gen):
    shape = (3, args.image_size, args.image_size)

    def images(n):
        x = torch.randn(n, *shape, generator=gen).to(device)
        return x.contiguous(memory_format=torch.channels_last)
    b, u = args.batch_size, args.batch_size * args.mu
    return MPLBatch(images(b), torch.randint(0, args.num_classes, (b,), generator=gen).to(device),
                    images(u), images(u))


def networks(args, device):
    torch.manual_seed(0)
    t, s = (build_model(args.model, args.num_classes, 3).to(device)
            .to(memory_format=torch.channels_last) for _ in range(2))
    return t, s


def plain_networks(args, device):
    """Fresh networks and torch's SGD for a step written in this file (reference or floor)."""
    teacher, student = networks(args, device)
    t_opt = torch.optim.SGD(teacher.parameters(), lr=0.05, momentum=0.9, nesterov=True)
    s_opt = torch.optim.SGD(student.parameters(), lr=0.05, momentum=0.9, nesterov=True)
    return teacher, student, t_opt, s_opt


def our_step(args, device, use_graph=False):
    """Our MPL step on fresh networks, configured by the command line (compile, checkpoint)."""
    teacher, student = networks(args, device)
    for role, net in (("teacher", teacher), ("student", student)):
        if args.checkpoint in (role, "both") and checkpoint_blocks(
                net, limit=args.checkpoint_blocks) == 0:
            raise ValueError(f"--checkpoint {args.checkpoint}: {args.model} has {NO_BLOCKS}")
        compile_net(net, args.compile)
    cfg = MPLConfig(pseudo_labels="argmax", estimator=args.estimator, uda_weight=8.0,
                    uda_temperature=0.7, uda_threshold=0.6, teacher_label_smoothing=0.15,
                    student_label_smoothing=0.15, teacher_weak_no_grad=args.weak_no_grad,
                    ce_old_forward=args.ce_old_forward)
    amp = device.type == "cuda"
    step = MPLStep(teacher, student, sgd(teacher, 0.05, 0.9, True, 5e-4, lr_on_device=use_graph),
                   sgd(student, 0.05, 0.9, True, 5e-4, lr_on_device=use_graph), cfg,
                   autocast_dtype=torch.bfloat16 if amp else None)
    step.skip_nonfinite = True  # as the trainer runs it: its few flag kernels are timed too
    return step


def largest_batch(fits, start, cap=1 << 16):
    """The largest b in [1, cap] with fits(b), for a monotone fits (True up to some b, then False),
    or 0 if fits(1) is False. Doubles from `start`, then bisects to within 1/32 of the answer
    (each probe is a whole step at that batch, so a few percent of precision saves probes)."""
    lo, hi = 0, None
    b = max(1, min(start, cap))
    while hi is None:
        if fits(b):
            lo = b
            if b == cap:
                return cap
            b = min(2 * b, cap)
        else:
            hi = b
    while hi - lo > max(1, lo // 32):
        mid = (lo + hi) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return lo


def fits_on_card(args, device):
    """fits(b): does one eager step of ours (after the one that allocates optimizer state) run at
    labeled batch b without running out of device memory? Uncompiled (--compile would compile
    again for every probe), with the run's checkpointing."""
    def fits(b):
        probe = argparse.Namespace(**{**vars(args), "batch_size": b, "compile": "none"})
        step = batch = None
        try:
            step = our_step(probe, device)
            batch = make_batch(probe, device, torch.Generator().manual_seed(0))
            for _ in range(2):
                step(batch, 0)
            torch.cuda.synchronize(device)
            ok = True
        except torch.cuda.OutOfMemoryError:
            ok = False
        except RuntimeError as err:  # cuDNN/cuBLAS report a failed allocation in their own words
            if not any(w in str(err) for w in ("out of memory", "ALLOC_FAILED", "WORKSPACE")):
                raise
            ok = False
        del step, batch
        gc.collect()
        torch.cuda.empty_cache()
        print(f"max batch: B={b} {'fits' if ok else 'out of memory'}", flush=True)
        return ok
    return fits


def reference_step(teacher, student, t_opt, s_opt, batch, amp, uda_weight=8.0):
    """A plain PyTorch MPL step, the way the popular port writes it (kekmodel-style losses)."""
    b, u = batch.x_l.shape[0], batch.x_us.shape[0]
    with torch.autocast(batch.x_l.device.type, dtype=torch.bfloat16, enabled=amp):
        t_logits = teacher(torch.cat([batch.x_l, batch.x_uw, batch.x_us]))
        t_l, t_uw, t_us = t_logits[:b], t_logits[b:b + u], t_logits[b + u:]
        t_loss_l = F.cross_entropy(t_l.float(), batch.y_l, label_smoothing=0.15)
        soft = torch.softmax(t_uw.detach().float() / 0.7, dim=-1)
        max_probs, hard = torch.max(soft, dim=-1)
        mask = max_probs.ge(0.6).float()
        t_loss_u = torch.mean(-(soft * torch.log_softmax(t_us.float(), dim=-1)).sum(-1) * mask)
        s_logits = student(torch.cat([batch.x_l, batch.x_us]))
        s_l, s_us = s_logits[:b], s_logits[b:]
        s_loss_l_old = F.cross_entropy(s_l.detach().float(), batch.y_l)
        s_loss = F.cross_entropy(s_us.float(), hard, label_smoothing=0.15)
    s_opt.zero_grad(set_to_none=True)
    s_loss.backward()
    s_opt.step()
    with torch.autocast(batch.x_l.device.type, dtype=torch.bfloat16, enabled=amp):
        with torch.no_grad():
            s_l_new = student(batch.x_l)
        s_loss_l_new = F.cross_entropy(s_l_new.float(), batch.y_l)
        dot = s_loss_l_new - s_loss_l_old
        _, hard_us = torch.max(t_us.detach(), dim=-1)
        t_loss_mpl = dot * F.cross_entropy(t_us.float(), hard_us)
        t_loss = t_loss_l + uda_weight * t_loss_u + t_loss_mpl
    t_opt.zero_grad(set_to_none=True)
    t_loss.backward()
    t_opt.step()


def supervised_floor(teacher, student, t_opt, s_opt, batch, amp):
    """The same networks and shapes, trained on labels only: forward + backward of the teacher on
    B + 2 mu B images and of the student on (mu + 1) B images, two optimizer steps."""
    xt = torch.cat([batch.x_l, batch.x_uw, batch.x_us])
    xs = torch.cat([batch.x_l, batch.x_us])
    for net, opt, x in ((teacher, t_opt, xt), (student, s_opt, xs)):
        repeats = (x.shape[0] + batch.y_l.shape[0] - 1) // batch.y_l.shape[0]
        y = batch.y_l.repeat(repeats)[:x.shape[0]]
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp):
            loss = F.cross_entropy(net(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


def phase_breakdown(step_fn, device, host=False):
    """ms per phase of one eager step of ours: on a GPU the summed time of the kernels each phase
    launches, on a CPU the time of the ops it runs (see phase_times); with host=True also the
    host's time in each phase (host_times: launches and Python, set beside the kernels')."""
    from torch.profiler import ProfilerActivity, profile

    gpu = device.type == "cuda"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if gpu else [])
    with profile(activities=acts) as prof:
        step_fn()
        if gpu:
            torch.cuda.synchronize()
    events = prof.events()
    phases = phase_times(events, device_time=gpu)
    return (phases, host_times(events, PHASES)) if host else phases


def gflops(fn):
    """Conv and matmul GFLOPs of one call of fn, its backwards included (torch's
    FlopCounterMode: 2 a multiply-add; elementwise and normalisation work is not counted)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return counter.get_total_flops() / 1e9


def step_work(args, device, batch, reference=True):
    """GFLOPs of one eager step of ours as configured (weak view, CE_old's forward, the forwards
    that checkpointing runs again), of the floor and of the reference, on fresh networks
    (uncompiled: compilation changes how, not what, a step computes)."""
    step = our_step(argparse.Namespace(**{**vars(args), "compile": "none"}), device)
    work = {"ours": gflops(lambda: step(batch, 0))}
    del step
    amp = device.type == "cuda"
    for name, fn in [("floor", supervised_floor)] + ([("reference", reference_step)]
                                                       if reference else []):
        nets_and_opts = plain_networks(args, device)
        work[name] = gflops(lambda: fn(*nets_and_opts, batch, amp))  # called at once
    return {k: round(v, 3) for k, v in work.items()}


def work_fields(work):
    """The record's work figures: GFLOPs by variant, the reference's work over ours (the speedup
    that doing less work alone allows, with kernels as fast as the reference's) and ours over
    the floor's."""
    if work is None:  # not counted
        return dict.fromkeys(("gflops_by_variant", "work_ratio_vs_reference", "work_vs_floor"))
    return {"gflops_by_variant": work,
            "work_ratio_vs_reference": (round(work["reference"] / work["ours"], 3)
                                        if "reference" in work else None),
            "work_vs_floor": round(work["ours"] / work["floor"], 3)}


def work_line(work):
    fields = work_fields(work)
    ratio = (f" (the reference does {fields['work_ratio_vs_reference']}x ours)"
             if "reference" in work else "")
    return ("work (conv and matmul GFLOPs of one eager step): "
            + ", ".join(f"{k} {v:.4g}" for k, v in work.items()) + ratio
            + f"; ours {fields['work_vs_floor']}x the floor's")


def main(argv=None):
    p = argparse.ArgumentParser(prog="mpl-fast bench step", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="wrn28_2",
                   help="small_cnn, wrn28_2, wrn28_8, resnet50, or a timm model name (needs timm) "
                   "(default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=64,
                   help="labeled batch B (default: %(default)s)")
    p.add_argument("--mu", type=int, default=7,
                   help="unlabeled batch = mu * B (default: %(default)s)")
    p.add_argument("--image-size", type=int, default=32, help="(default: %(default)s)")
    p.add_argument("--num-classes", type=int, default=10, help="(default: %(default)s)")
    p.add_argument("--estimator", default="loss_diff", choices=["loss_diff", "dot"],
                   help="our step's feedback estimator (default: %(default)s)")
    p.add_argument("--weak-no-grad", nargs="?", const=True, default=False,
                   choices=["joint", "shared"], metavar="joint|shared",
                   help="the teacher's weak view in a forward of its own without autograd, "
                   "whatever the teacher (default: only for one without BatchNorm, as the "
                   "trainer; with BatchNorm it changes training: docs/cifar10.md); "
                   "'--weak-no-grad joint': in the joint forward, its rows outside autograd "
                   "(mpl.teacher_weak_no_grad=joint); '--weak-no-grad shared': apart, "
                   "normalised with the labeled + strong forward's BN statistics "
                   "(mpl.teacher_weak_no_grad=shared)")
    p.add_argument("--ce-old-forward", default="separate", choices=["separate", "joint"],
                   help="our student's CE_old: from a labeled forward of its own without autograd "
                        "(the paper preset) or from its training forward on x_us + x_l, as the "
                        "reference does (default: %(default)s)")
    p.add_argument("--no-graph", action="store_true",
                   help="do not capture our step in a CUDA graph")
    p.add_argument("--compile", default="none",
                   choices=["none", "default", "max-autotune", "max-autotune-no-cudagraphs"],
                   help="torch.compile our networks' forward, as model.compile does in the trainer "
                   "(default: %(default)s)")
    p.add_argument("--checkpoint", default="none", choices=["none", "teacher", "student", "both"],
                   help="activation checkpointing of our networks' blocks, as model.checkpoint "
                   "does in the trainer (default: %(default)s)")
    p.add_argument("--checkpoint-blocks", type=int, default=None, metavar="N",
                   help="checkpoint only the first N blocks of each checkpointed network (the "
                   "early, high-resolution ones), as model.checkpoint_blocks does (default: all)")
    p.add_argument("--max-batch", action="store_true",
                   help="also search the largest labeled batch (mu fixed) at which our eager step "
                   "fits on the GPU")
    p.add_argument("--no-reference", action="store_true", help="skip the eager reference")
    p.add_argument("--no-compiled", action="store_true", help="skip the compiled reference")
    p.add_argument("--reference-compile", default="max-autotune-no-cudagraphs",
                   choices=["default", "max-autotune", "max-autotune-no-cudagraphs"],
                   help="torch.compile mode of the compiled reference (default: %(default)s, "
                   "the one to beat; 'default' compiles in a fraction of the time)")
    p.add_argument("--cudnn-benchmark", action="store_true",
                   help="torch.backends.cudnn.benchmark = True for every variant (cuDNN times its "
                   "convolution algorithms for these shapes once, then uses the fastest)")
    p.add_argument("--work-only", action="store_true",
                   help="count each variant's work (conv and matmul GFLOPs of one eager step) "
                   "without timing anything, on any device: appended to step_work.jsonl")
    p.add_argument("--steps", type=int, default=30,
                   help="steps timed per variant (median; default: %(default)s)")
    p.add_argument("--warmup", type=int, default=10,
                   help="untimed steps first (default: %(default)s)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="torch device (default: %(default)s)")
    p.add_argument("--out", default="benchmarks/results",
                   help="where step.jsonl (step_work.jsonl with --work-only) is appended "
                   "(default: %(default)s)")
    args = p.parse_args(argv)
    if min(args.batch_size, args.mu, args.image_size, args.steps) < 1:
        p.error("--batch-size, --mu, --image-size and --steps must be >= 1")
    if args.warmup < 0:
        p.error(f"--warmup must be >= 0, got {args.warmup}")
    if args.num_classes < 2:
        p.error(f"--num-classes must be >= 2, got {args.num_classes}")
    check_results_folder(p, "--out", args.out)
    if args.checkpoint_blocks is not None and (args.checkpoint_blocks < 1
                                               or args.checkpoint == "none"):
        p.error("--checkpoint-blocks needs N >= 1 and --checkpoint teacher|student|both")
    device = check_device(p, "--device", args.device)
    gpu = device.type == "cuda"
    if args.max_batch and not gpu:
        p.error("--max-batch needs a CUDA device (it probes for out-of-memory)")
    if args.work_only and args.max_batch:
        p.error("--work-only times nothing and probes nothing: leave out --max-batch")
    # ours as the trainer runs it (mpl.teacher_weak_no_grad: auto, joint or shared): apart
    # for a teacher without BatchNorm, where it computes the same, even without --weak-no-grad
    if not uses_batch_statistics(build_model(args.model, args.num_classes, 3)):
        args.weak_no_grad = True
    previous = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = args.cudnn_benchmark  # global: ours and every reference
    try:
        return (_count_work if args.work_only else _measure)(args, device, gpu)
    finally:
        torch.backends.cudnn.benchmark = previous


def _reset_peak(device):
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def _peak(fn, args, device, reset=True):
    """(median ms of fn, peak device memory in GiB or None off a GPU). The peak is counted from
    here (reset) or from the caller's reset: a graphed variant's counts its capture, whose
    buffers (the activations) stay with the graph and are not allocated again in replays."""
    if reset:
        _reset_peak(device)
    ms = timed(fn, args.steps, args.warmup, device)
    return ms, (torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None)


def _measure_ours(args, device, batch, use_graph):
    """(ms and peak memory, phases, the host's time in them, activation memory) of our step; its
    networks, optimizer state and graph are freed on return, before the next variant is built."""
    gpu = device.type == "cuda"
    step = our_step(args, device, use_graph)
    for _ in range(2):  # lazy state and, with --compile, compilation: not in the phases
        step(batch, 0)
    activation_mem = None
    if gpu:  # one eager step's peak above what stays allocated between steps
        torch.cuda.synchronize()
        between_steps = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step(batch, 0)
        torch.cuda.synchronize()
        activation_mem = (torch.cuda.max_memory_allocated() - between_steps) / 2**30
    phases, host_phases = phase_breakdown(lambda: step(batch, 0), device, host=True)
    # Graphed the way the trainer does it (train.cuda_graph): static buffers the batch is copied
    # into each step, device lrs, warm-up, capture at the first call after it.
    trainer_step = GraphedStep(step) if use_graph else step
    return (_peak(lambda: trainer_step(batch, 0), args, device), phases, host_phases,
            activation_mem)


def _measure_variant(fn, compiled, graph, args, device, batch):
    """(ms and peak memory, summed kernel ms) of a step written in this file on fresh networks:
    compiled with --reference-compile and/or captured in a CUDA graph."""
    teacher, student, t_opt, s_opt = plain_networks(args, device)
    if compiled:
        teacher = torch.compile(teacher, mode=args.reference_compile)
        student = torch.compile(student, mode=args.reference_compile)
    amp = device.type == "cuda"
    call = lambda: fn(teacher, student, t_opt, s_opt, batch, amp)  # noqa: E731
    _reset_peak(device)  # before the capture, as for ours (GraphedStep captures in _peak)
    row = _peak(graphed(call, device, warmup=5) if graph else call, args, device, reset=False)
    # one eager call (compiled, after warm-up) through the profiler: the step's work alone
    return row, round(sum(phase_breakdown(call, device).values()), 3)


def _progress(name, row):
    """One variant's time as soon as it is measured: a run cut off before its record is written
    (a compiled variant's minutes of compilation, a GPU sitting's time limit) still leaves what
    it measured in its log."""
    print(f"measured {name}: {row[0]:.2f} ms/step", flush=True)


def _compiling(name, mode):
    """Said before a compiled variant: its first steps compile (and may autotune) for minutes
    with nothing else to show."""
    print(f"compiling {name} (torch.compile mode {mode}; its first steps compile"
          f"{', autotuning for minutes' if 'autotune' in mode else ''})...", flush=True)


def _config_fields(args):
    return {"model": args.model, "batch_size": args.batch_size, "mu": args.mu,
            "image_size": args.image_size, "num_classes": args.num_classes,
            "estimator": args.estimator, "weak_no_grad": args.weak_no_grad,
            "ce_old_forward": args.ce_old_forward}


def _count_work(args, device, gpu):
    """--work-only: each variant's GFLOPs a step, nothing timed."""
    batch = make_batch(args, device, torch.Generator().manual_seed(0))
    work = step_work(args, device, batch, reference=not args.no_reference)
    record = {**_config_fields(args), "checkpoint": args.checkpoint,
              "checkpoint_blocks": args.checkpoint_blocks,
              "device": torch.cuda.get_device_name(device) if gpu else device.type,
              "torch": torch.__version__, "date": datetime.date.today().isoformat(),
              **work_fields(work)}
    append_jsonl(Path(args.out) / "step_work.jsonl", [record])
    print(f"{args.model} B={args.batch_size} mu={args.mu} size {args.image_size}: "
          + work_line(work))
    return 0


def _measure(args, device, gpu):
    batch = make_batch(args, device, torch.Generator().manual_seed(0))
    use_graph = gpu and not args.no_graph
    if args.compile != "none":
        _compiling("ours", args.compile)
    ours, phases, host_phases, activation_mem = _measure_ours(args, device, batch, use_graph)
    rows = {"ours": ours}
    kernel_ms = {"ours": round(sum(phases.values()), 3)}
    _progress("ours", ours)
    # (a) eager reference, (b) compiled + graphed reference, (c) supervised floor (graphed when
    # ours is), (d) the reference graphed without compile
    variants = [("floor", supervised_floor, False, use_graph)]
    if not args.no_reference:
        variants.append(("reference", reference_step, False, False))
        if use_graph:
            variants.append(("graphed_reference", reference_step, False, True))
    if not args.no_compiled and gpu:
        variants.append(("compiled_reference", reference_step, True, True))
    for name, fn, compiled, graph in variants:
        if compiled:
            _compiling(name, args.reference_compile)
        rows[name], kernel_ms[name] = _measure_variant(fn, compiled, graph, args, device, batch)
        _progress(name, rows[name])
    gc.collect()
    try:
        work = step_work(args, device, batch, reference="reference" in rows)
    except Exception as err:  # noqa: BLE001 - a count beside the timings must not cost them
        print(f"work not counted: {type(err).__name__}: {err}", flush=True)
        work = None
    max_batch = None
    if args.max_batch:
        gc.collect()
        torch.cuda.empty_cache()
        max_batch = largest_batch(fits_on_card(args, device), args.batch_size)
    ms = {k: v[0] for k, v in rows.items()}
    teacher_images = args.batch_size * (1 + 2 * args.mu)
    record = {
        **_config_fields(args),
        "graph": use_graph,
        "compile": args.compile, "checkpoint": args.checkpoint,
        "checkpoint_blocks": args.checkpoint_blocks, "cudnn_benchmark": args.cudnn_benchmark,
        "gpu": torch.cuda.get_device_name(device) if gpu else "cpu",
        "torch": torch.__version__, "date": datetime.date.today().isoformat(),
        "ms_per_step": round(ms["ours"], 3),
        "teacher_images_per_s": round(teacher_images / ms["ours"] * 1e3, 1),
        "reference_ms_per_step": round(ms["reference"], 3) if "reference" in ms else None,
        "compiled_reference_ms_per_step": (round(ms["compiled_reference"], 3)
                                           if "compiled_reference" in ms else None),
        "compiled_reference_mode": args.reference_compile if "compiled_reference" in ms else None,
        "floor_ms_per_step": round(ms["floor"], 3),
        "floor_graph": use_graph,
        "graphed_reference_ms_per_step": (round(ms["graphed_reference"], 3)
                                          if "graphed_reference" in ms else None),
        "speedup_vs_reference": (round(ms["reference"] / ms["ours"], 3)
                                 if "reference" in ms else None),
        "speedup_vs_compiled_reference": (round(ms["compiled_reference"] / ms["ours"], 3)
                                          if "compiled_reference" in ms else None),
        "overhead_vs_floor": round(ms["ours"] / ms["floor"], 3),
        "peak_mem_gib": round(rows["ours"][1], 3) if gpu else None,
        # every variant's peak, graphed ones counting their capture (since 2026-11-26)
        "peak_mem_gib_by_variant": ({k: round(v[1], 3) for k, v in rows.items()} if gpu
                                    else None),
        "activation_mem_gib": round(activation_mem, 3) if gpu else None,
        "max_batch_size": max_batch,
        "phases_ms": phases,
        # the host's time in each phase of that eager step: near the kernels' or above, the
        # un-graphed step is bound by its launches (since 2026-11-27)
        "host_phases_ms": host_phases,
        "kernel_ms": kernel_ms,
        **work_fields(work),  # since 2026-11-28
    }
    out = Path(args.out)
    append_jsonl(out / "step.jsonl", [record])
    for name, (t, mem) in rows.items():
        extra = f"  peak {mem:.2f} GiB" if mem is not None else ""
        print(f"{name:20s} {t:9.2f} ms/step  {teacher_images / t * 1e3:10.0f} teacher img/s  "
              f"{'kernels' if gpu else 'ops'} {kernel_ms[name]:8.2f} ms{extra}")
    print(f"phases (ours, eager; {'summed kernel time' if gpu else 'CPU time'}): "
          + ", ".join(f"{k} {v:.2f} ms" for k, v in phases.items()))
    print("host time in the phases (ours, eager): "
          + ", ".join(f"{k} {v:.2f} ms" for k, v in host_phases.items()))
    if work is not None:
        print(work_line(work))
    ratios = [f"{record['speedup_vs_reference']}x vs eager reference"] if "reference" in ms else []
    if "graphed_reference" in ms:
        ratios.append(f"{ms['graphed_reference'] / ms['ours']:.3f}x vs graphed reference")
    if "compiled_reference" in ms:
        ratios.append(f"{record['speedup_vs_compiled_reference']}x vs compiled reference "
                      f"({args.reference_compile})")
    ratios.append(f"{record['overhead_vs_floor']}x the supervised floor"
                  + (" (graphed)" if use_graph else ""))
    if activation_mem is not None:
        which = args.checkpoint + ("" if args.checkpoint_blocks is None
                                   else f", first {args.checkpoint_blocks} blocks")
        ratios.append(f"activations {activation_mem:.2f} GiB (checkpoint {which})")
    if max_batch is not None:
        ratios.append(f"largest batch that fits {max_batch}")
    print(f"summary: {args.model} B={args.batch_size} mu={args.mu} on {record['gpu']}: "
          f"{ms['ours']:.2f} ms/step; " + ", ".join(ratios))
    return 0


if __name__ == "__main__":
    main()
