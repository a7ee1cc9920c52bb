"""Fused loss ops, forward + backward, against torch eager and torch.compile.

For each op and N x C in {15360 x 10, 15360 x 1000, 4096 x 32000}, bf16 and fp32 logits, two
medians (GPU):
  ms        triton.testing.do_bench: the call as a Python program makes it, launch and autograd
            overhead included (on a GPU these small ops are often host-bound: the GPU waits for
            the launches);
  graph_ms  the same call captured in a CUDA graph and replayed, the L2 cache flushed before
            each replay: the GPU's own time, as a graphed training step pays it.
GB/s and the fraction of the card's measured copy bandwidth come from graph_ms (bytes the op
must move at least: read the logits of the rows its mask keeps, write the whole gradient; ours
skips the streamed rows a mask drops, and reads a one-tile row together with its mask rather
than wait for it, so this is a lower bound on its traffic). Appends one JSON object per row to
benchmarks/results/ops.jsonl with the card, versions and date.

Each case backpropagates the loss alone (grad_output 1), where our backward moves no memory:
the gradient written in the forward is used as is. A weighted loss (w * loss) adds one read
and one write of the gradient, in place.

--tiles sweeps the tile of our kernels (elements a program holds per step : widest row chunk :
most warps : elements a warp, `:lanes` for a streamed row's statistics kept per lane, `:sN`
for N of its chunks in flight, `:rN` for one-tile rows by persistent programs with N tiles in
flight, `:mN` for at most N registers a thread, see kernels/softmax_common.py; the default is
the shipped one), to choose it from measurements. Each row records the launch the tile made at
its C (rows a program, block, warps, stages, row stages, register cap).
--kernels adds where a call's time goes (torch.profiler over 10 calls: the costliest GPU
kernels a call, or CPU ops off CUDA) for ours, eager and compile, as `kernels` in the record,
and on a GPU our Triton kernel's own time and bandwidth (`own_kernel_us`,
`own_kernel_bandwidth_fraction`) apart from the small kernels around it (`other_kernels_us`:
autograd's grad_output fill, the mean, the backward's scale).
--profiler-range times nothing: it calls ours once per case inside a CUDA profiler range, for
Nsight Compute (`ncu --profile-from-start off ... mpl-fast bench ops --profiler-range`).

    python benchmarks/bench_ops.py [--shapes 15360x10,4096x32000]
                                   [--tiles 256:4096:8:512,256:4096:8:512:s3]
"""
import argparse
import datetime
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from mpl_fast import ops
from mpl_fast.train.run_log import append_jsonl, check_device, check_results_folder

SHAPES = [(15360, 10), (15360, 1000), (4096, 32000)]


def timer(fn, device, grad_to_none=()):
    """Median ms of fn; the tensors in grad_to_none get .grad = None before each call, so every
    backward writes a fresh gradient (as in training) instead of accumulating into the last."""
    if device.type == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, quantiles=[0.5], grad_to_none=list(grad_to_none))
    times = []
    for i in range(7):
        for t in grad_to_none:
            t.grad = None
        t0 = time.perf_counter()
        fn()
        if i >= 2:
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def graph_timer(fn, device, grad_to_none=(), replays=50):
    """Median ms of one replay of fn captured in a CUDA graph, the L2 cache flushed before each
    replay (the flush is outside the timed span); None off CUDA or where fn cannot be captured."""
    if device.type != "cuda":
        return None
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the capture: compilation, lazy state
        for _ in range(3):
            for t in grad_to_none:
                t.grad = None
            fn()
    torch.cuda.current_stream().wait_stream(side)
    for t in grad_to_none:
        t.grad = None  # the captured backward writes a fresh gradient, as in training
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            fn()
    except RuntimeError as err:
        print(f"  (not capturable: {str(err).splitlines()[0]})")
        return None
    flush = torch.empty(256 * 2**20, dtype=torch.uint8, device=device)
    start = [torch.cuda.Event(enable_timing=True) for _ in range(replays)]
    end = [torch.cuda.Event(enable_timing=True) for _ in range(replays)]
    for a, b in zip(start, end):
        flush.zero_()
        a.record()
        graph.replay()
        b.record()
    torch.cuda.synchronize()
    return statistics.median(a.elapsed_time(b) for a, b in zip(start, end))


def kernel_times(fn, device, grad_to_none=(), calls=10, top=8):
    """Where one call's time goes: [name, us a call] of its `top` most costly entries, from
    torch.profiler over `calls` calls. On a GPU the device kernels (their own time: what the
    graph replay's total is made of), else the ops' self CPU times."""
    from torch.profiler import ProfilerActivity, profile

    gpu = device.type == "cuda"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if gpu else [])
    for t in grad_to_none:
        t.grad = None
    fn()  # warm-up outside the profile (compilation, caches)
    with profile(activities=acts) as prof:
        for _ in range(calls):
            for t in grad_to_none:
                t.grad = None
            fn()
        if gpu:
            torch.cuda.synchronize()
    kernel = torch.autograd.DeviceType.CUDA
    totals = {}
    for e in prof.key_averages():
        if gpu and e.device_type != kernel:
            continue
        us = e.self_device_time_total if gpu else e.self_cpu_time_total
        if us > 0:
            totals[e.key] = totals.get(e.key, 0.0) + us / calls
    ranked = sorted(totals.items(), key=lambda item: -item[1])[:top]
    return [[name, round(us, 2)] for name, us in ranked]


def own_kernel_share(op, ours_kernels, nbytes, bandwidth):
    """From ours' profiled kernels (kernel_times on a GPU): the op's own Triton kernel's time and
    its bandwidth alone, and the time of the rest (autograd's fill of grad_output, the mean, the
    backward's scale: launches that the op's forward + backward also pays, whatever its kernel
    does). Nones where the profile has no such kernel (off CUDA: CPU ops)."""
    own = next((us for name, us in ours_kernels if f"_{op}_kernel" in name), None)
    if own is None:
        return {"own_kernel_us": None, "own_kernel_bandwidth_fraction": None,
                "other_kernels_us": None}
    return {"own_kernel_us": own,
            "own_kernel_bandwidth_fraction": round(nbytes / (own * 1e-6) / bandwidth, 3),
            "other_kernels_us": round(sum(us for _, us in ours_kernels) - own, 2)}


def parse_tile(spec):
    """A --tiles entry (softmax_common.TILE_SPEC) -> its settings (softmax_common.current_tile's
    order)."""
    from mpl_fast.kernels import softmax_common

    try:
        return softmax_common.parse_tile_spec(spec)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def parse_shape(spec):
    """'NxC' -> (N, C): N >= 1 rows (timing no rows measures nothing) and C >= 2 classes (the
    ops' contract)."""
    parts = spec.split("x")
    if len(parts) != 2 or not all(p.isdigit() for p in parts) or int(parts[0]) < 1 \
            or int(parts[1]) < 2:
        raise argparse.ArgumentTypeError(f"shape {spec!r}: expected NxC with N >= 1 and C >= 2")
    return int(parts[0]), int(parts[1])


def parse_dtype(name):
    """A logits dtype the ops take, by torch's name."""
    if name not in ("float32", "bfloat16", "float16"):
        raise argparse.ArgumentTypeError(
            f"dtype {name!r}: expected float32, bfloat16 or float16")
    return getattr(torch, name)


def copy_bandwidth(device):
    """Measured device-to-device copy bandwidth, bytes read + written per second."""
    x = torch.empty(256 * 2**20 if device.type == "cuda" else 16 * 2**20, dtype=torch.uint8,
                    device=device)
    y = torch.empty_like(x)
    ms = timer(lambda: y.copy_(x), device)
    return 2 * x.numel() / (ms * 1e-3)


def cases(n, c, dtype, device):
    g = torch.Generator(device=device).manual_seed(0)
    x = (torch.randn(n, c, device=device, generator=g) * 3).to(dtype).requires_grad_()
    w = torch.randn(n, c, device=device, generator=g) * 3
    # the weak view: about half the rows made confident (max prob ~1 at T = 0.7, over UDA's
    # 0.6 threshold), so UDA's mask keeps a realistic share of rows (57% at 32000 classes, 87%
    # at 10, where random rows pass too); random logits alone are masked in every row at 32000
    # classes, and a masked row's gradient costs no read
    confident = torch.rand(n, device=device, generator=g) < 0.5
    w[confident, torch.randint(0, c, (n,), device=device, generator=g)[confident]] += 40.0
    w = w.to(dtype)
    y = torch.randint(0, c, (n,), device=device, generator=g)
    mask = (torch.rand(n, device=device, generator=g) > 0.3).float()
    elem = x.element_size()

    def ours_ce():
        ops.soft_cross_entropy(x, y, label_smoothing=0.1, mask=mask).backward()

    def eager_ce():
        ((F.cross_entropy(x, y, label_smoothing=0.1, reduction="none") * mask).mean()).backward()

    def ours_uda():
        ops.uda_loss(w, x, temperature=0.7, threshold=0.6)[0].backward()

    def eager_uda():
        q = torch.softmax(w.float() / 0.7, 1)
        m = (q.max(1).values >= 0.6).float()
        ((F.cross_entropy(x, q.to(x.dtype), reduction="none") * m).mean()).backward()

    def ours_pl():
        ops.pseudo_labels(w, temperature=0.7, threshold=0.6)

    def eager_pl():
        p = torch.softmax(w.float() / 0.7, 1)
        mp, lab = p.max(1)
        return p, mp, (mp >= 0.6).float(), lab

    # bytes the op must move at least: the logits of the rows the mask keeps in (a dropped
    # row's loss and gradient are 0 whatever it holds; UDA must read every weak row to decide),
    # the whole gradient out, probs out; the gradient-producing cases reset x.grad between calls
    # (the last item)
    ce_kept = float(mask.mean())
    uda_kept = float((torch.softmax(w.float() / 0.7, 1).max(1).values >= 0.6).float().mean())
    return {
        "soft_cross_entropy": (ours_ce, eager_ce, (ce_kept + 1) * n * c * elem, [x]),
        "uda_loss": (ours_uda, eager_uda, (2 + uda_kept) * n * c * elem, [x]),
        "pseudo_labels": (ours_pl, eager_pl, n * c * (elem + 4), []),
    }


def record(meta, name, n, c, dtype, tile, mine, base, nbytes, bandwidth):
    """One result row. The ratios and the bandwidth use the graph replay times where ours and
    eager both have one (a GPU), else the host-side times: never one of each."""
    which = 1 if mine[1] is not None and base["eager"][1] is not None else 0

    def pick(pair):
        return pair[which]

    def r4(v):
        return round(v, 4) if v is not None else None

    from mpl_fast.kernels import softmax_common

    t_ours = pick(mine)
    gbps = nbytes / (t_ours * 1e-3) / 1e9
    comp = base.get("compile", (None, None))
    with softmax_common.tile_settings(*tile):
        launch = softmax_common.tile_for(c)
    return dict(meta, op=name, n=n, c=c, dtype=str(dtype).split(".")[1],
                tile=softmax_common.tile_spec(tile), rows_per_program=launch.rows,
                block=launch.block, num_warps=launch.num_warps, stages=launch.stages,
                row_stages=launch.row_stages, max_registers=launch.max_registers,
                evict=launch.evict, ms=r4(mine[0]), eager_ms=r4(base["eager"][0]),
                compile_ms=r4(comp[0]),
                graph_ms=r4(mine[1]), eager_graph_ms=r4(base["eager"][1]),
                compile_graph_ms=r4(comp[1]),
                speedup_vs_eager=round(pick(base["eager"]) / t_ours, 2),
                speedup_vs_compile=round(pick(comp) / t_ours, 2) if pick(comp) else None,
                graph_timed=bool(which),
                speedup_vs_eager_host=round(base["eager"][0] / mine[0], 2),
                min_bytes=int(nbytes), GBps=round(gbps, 1),
                bandwidth_fraction=round(gbps * 1e9 / bandwidth, 3))


def print_row(row):
    def f(v, width, digits=3):
        return f"{v:{width}.{digits}f}" if v is not None else f"{'-':>{width}s}"

    graphed = row["graph_timed"]
    key = "graph_ms" if graphed else "ms"
    ekey = "eager_graph_ms" if graphed else "eager_ms"
    ckey = "compile_graph_ms" if graphed else "compile_ms"
    print(f"{row['op']:20s} {str(row['n']) + 'x' + str(row['c']):>12s} {row['dtype']:>8s} "
          f"{row['tile']:>20s} {f(row[key], 7)} {f(row[ekey], 7)} {f(row[ckey], 7)} "
          f"{f(row['speedup_vs_eager'], 7, 2)} {f(row['speedup_vs_compile'], 6, 2)} "
          f"{row['GBps']:6.0f} {100 * row['bandwidth_fraction']:4.0f} {f(row['ms'], 6)} "
          f"{f(row['eager_ms'], 6)}")


def profile_ranges(shapes, dtypes, tiles, device):
    """Each case of ours called once between cudaProfilerStart and cudaProfilerStop, after two
    warm-up calls (compilation, first touch), timing nothing: the ranges `ncu --profile-from-start
    off` profiles (Nsight Compute: occupancy, stall reasons, memory throughput of our kernels
    and the small ones around them). Returns how many calls were profiled."""
    from mpl_fast.kernels import softmax_common

    cudart = torch.cuda.cudart()
    count = 0
    for n, c in shapes:
        for dtype in dtypes:
            for name, (ours, _, _, leaves) in cases(n, c, dtype, device).items():
                for tile in tiles:
                    with softmax_common.tile_settings(*tile):
                        for call in range(3):
                            for t in leaves:
                                t.grad = None
                            torch.cuda.synchronize(device)
                            if call == 2:
                                cudart.cudaProfilerStart()
                            ours()
                            torch.cuda.synchronize(device)
                        cudart.cudaProfilerStop()
                    count += 1
                    print(f"profiled {name} {n}x{c} {str(dtype).split('.')[1]} "
                          f"tile {softmax_common.tile_spec(tile)}", flush=True)
    return count


def main(argv=None):
    from mpl_fast.kernels import softmax_common

    shipped = softmax_common.tile_spec(softmax_common.current_tile())
    parser = argparse.ArgumentParser(prog="mpl-fast bench ops",
                                     description="benchmark the fused loss ops")
    parser.add_argument("--shapes", default=",".join(f"{n}x{c}" for n, c in SHAPES),
                        help="comma-separated NxC logits shapes, N >= 1, C >= 2 (default: "
                        "%(default)s)")
    parser.add_argument("--dtypes", default="bfloat16,float32",
                        help="comma-separated logits dtypes: float32, bfloat16, float16 "
                        "(default: %(default)s)")
    parser.add_argument("--tiles", default=shipped,
                        help="comma-separated " + softmax_common.TILE_SPEC + " tiles of our "
                        "kernels to time (a program holds ELEMENTS, at least a row, in chunks of "
                        "at most MAX_BLOCK columns, with a warp per PER_WARP elements up to "
                        "MAX_WARPS; :lanes: a streamed row's statistics per lane; :sSTAGES: a "
                        "streamed row's chunks in flight, 1 to 4; :rROW_STAGES: one-tile rows by "
                        "persistent programs with that many tiles in flight, 1 to 4; "
                        ":mREGISTERS: at most that many registers a thread, 16 to 255, 0 for no "
                        "cap; :e: L2 eviction hints on a streamed row's two passes; default: the "
                        "shipped one, %(default)s)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="torch device (default: %(default)s; off CUDA only host times)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile row")
    parser.add_argument("--kernels", action="store_true",
                        help="also profile where each call's time goes (torch.profiler: the "
                        "costliest GPU kernels, or CPU ops off CUDA, a call) for ours, eager and "
                        "compile; recorded as `kernels`, ours printed under its row")
    parser.add_argument("--profiler-range", action="store_true",
                        help="time nothing: call ours once per case between "
                        "cudaProfilerStart/Stop, for `ncu --profile-from-start off` (CUDA only)")
    parser.add_argument("--out", default="benchmarks/results",
                        help="where ops.jsonl is appended (default: %(default)s)")
    args = parser.parse_args(argv)
    check_results_folder(parser, "--out", args.out)
    parsed = {}
    for option, parse in (("tiles", parse_tile), ("shapes", parse_shape), ("dtypes", parse_dtype)):
        try:
            parsed[option] = [parse(v) for v in getattr(args, option).split(",")]
        except argparse.ArgumentTypeError as err:
            parser.error(f"--{option}: {err}")
    tiles, shapes, dtypes = parsed["tiles"], parsed["shapes"], parsed["dtypes"]
    device = check_device(parser, "--device", args.device)
    if args.profiler_range:
        if device.type != "cuda":
            parser.error(f"--profiler-range marks CUDA profiler ranges: --device {device} is "
                         "not a CUDA device")
        count = profile_ranges(shapes, dtypes, tiles, device)
        print(f"summary: {count} calls in profiler ranges on {torch.cuda.get_device_name(device)}")
        return 0
    bandwidth = copy_bandwidth(device)
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    import triton

    meta = {"gpu": card, "torch": torch.__version__, "triton": triton.__version__,
            "date": datetime.date.today().isoformat(), "copy_GBps": round(bandwidth / 1e9, 1)}
    timing = ("ms: graph replay (GPU time), host: called from Python" if device.type == "cuda"
              else "ms: called from Python (no GPU: no graph replay)")
    print(f"{card}: measured copy bandwidth {bandwidth / 1e9:.0f} GB/s; {timing}")
    print(f"{'op':20s} {'N x C':>12s} {'dtype':>8s} {'tile':>20s} {'ours':>7s} {'eager':>7s} "
          f"{'compile':>7s} {'x eager':>7s} {'x comp':>6s} {'GB/s':>6s} {'% bw':>4s} "
          f"{'host':>6s} {'eager':>6s}")
    out = Path(args.out)
    rows = []
    for n, c in shapes:
        for dtype in dtypes:
            for name, (ours, eager, nbytes, leaves) in cases(n, c, dtype, device).items():
                theirs = {"eager": eager}
                if not args.no_compile:
                    theirs["compile"] = torch.compile(eager)
                base = {k: (timer(f, device, leaves), graph_timer(f, device, leaves))
                        for k, f in theirs.items()}
                theirs_kernels = ({k: kernel_times(f, device, leaves) for k, f in theirs.items()}
                                  if args.kernels else {})
                for tile in tiles:
                    try:
                        with softmax_common.tile_settings(*tile):
                            mine = (timer(ours, device, leaves),
                                    graph_timer(ours, device, leaves))
                            mine_kernels = (kernel_times(ours, device, leaves)
                                            if args.kernels else None)
                    except Exception as err:  # a swept tile the compiler refuses: say, go on
                        if softmax_common.tile_spec(tile) == shipped:
                            raise
                        print(f"{name:20s} {n}x{c} {dtype}: tile "
                              f"{softmax_common.tile_spec(tile)} failed: "
                              f"{str(err).splitlines()[0] if str(err) else type(err).__name__}")
                        continue
                    row = record(meta, name, n, c, dtype, tile, mine, base, nbytes, bandwidth)
                    if args.kernels:
                        row["kernels"] = dict(ours=mine_kernels, **theirs_kernels)
                        row.update(own_kernel_share(name, mine_kernels, nbytes, bandwidth))
                    rows.append(row)
                    # as it goes: a cut-off run keeps its rows
                    append_jsonl(out / "ops.jsonl", [row])
                    print_row(row)
                    if args.kernels:
                        own = row["own_kernel_bandwidth_fraction"]
                        print("    ours: " + ", ".join(f"{k[:48]} {us:.1f} us"
                                                       for k, us in mine_kernels[:4])
                              + (f"; its kernel alone {own:.0%} of bandwidth"
                                 if own is not None else ""))
    if not rows:
        print("summary: no rows (every tile failed)")
        return 1
    worst = min(r["speedup_vs_eager"] for r in rows)
    print(f"summary: {len(rows)} rows on {card}; slowest speedup vs eager {worst:.2f}x "
          f"({'GPU time' if device.type == 'cuda' else 'host time'}); appended to "
          f"{out / 'ops.jsonl'}")
    return 0


if __name__ == "__main__":
    main()
