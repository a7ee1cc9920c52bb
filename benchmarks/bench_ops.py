"""Fused loss ops, forward + backward, against torch eager and torch.compile.

For each op and N x C in {15360 x 10, 15360 x 1000, 4096 x 32000}, bf16 and fp32 logits: the
median ms (triton.testing.do_bench on a GPU), achieved GB/s (bytes the op must move: read the
logits, write the gradient) and the fraction of the card's measured copy bandwidth. Appends one
JSON object per row to benchmarks/results/ops.jsonl with the card, versions and date.

Each case backpropagates the loss alone (grad_output 1), where our backward moves no memory:
the gradient written in the forward is used as is. A weighted loss (w * loss) adds one read
and one write of the gradient, in place.

    python benchmarks/bench_ops.py [--shapes 15360x10,4096x32000] [--out benchmarks/results]
"""
import argparse
import datetime
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from mpl_fast import ops
from mpl_fast.train.run_log import append_jsonl

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
    w = (torch.randn(n, c, device=device, generator=g) * 3).to(dtype)
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

    # bytes the op must move at least: logits in, gradient out (+ weak logits / probs); the
    # gradient-producing cases reset x.grad between calls (the last item)
    return {
        "soft_cross_entropy": (ours_ce, eager_ce, 2 * n * c * elem, [x]),
        "uda_loss": (ours_uda, eager_uda, 3 * n * c * elem, [x]),
        "pseudo_labels": (ours_pl, eager_pl, n * c * (elem + 4), []),
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description="benchmark the fused loss ops")
    parser.add_argument("--shapes", default=",".join(f"{n}x{c}" for n, c in SHAPES))
    parser.add_argument("--dtypes", default="bfloat16,float32")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile row")
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    bandwidth = copy_bandwidth(device)
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    import triton

    meta = {"gpu": card, "torch": torch.__version__, "triton": triton.__version__,
            "date": datetime.date.today().isoformat(), "copy_GBps": round(bandwidth / 1e9, 1)}
    print(f"{card}: measured copy bandwidth {bandwidth / 1e9:.0f} GB/s")
    print(f"{'op':20s} {'N x C':>12s} {'dtype':>8s} {'ours ms':>9s} {'eager ms':>9s} "
          f"{'compile ms':>10s} {'x eager':>8s} {'GB/s':>7s} {'% bw':>5s}")
    out = Path(args.out)
    rows = []
    for n, c in shapes:
        for dtype in [getattr(torch, d) for d in args.dtypes.split(",")]:
            for name, (ours, eager, nbytes, leaves) in cases(n, c, dtype, device).items():
                t_ours, t_eager = timer(ours, device, leaves), timer(eager, device, leaves)
                t_comp = None
                if not args.no_compile:
                    t_comp = timer(torch.compile(eager), device, leaves)
                gbps = nbytes / (t_ours * 1e-3) / 1e9
                row = dict(meta, op=name, n=n, c=c, dtype=str(dtype).split(".")[1],
                           ms=round(t_ours, 4), eager_ms=round(t_eager, 4),
                           compile_ms=round(t_comp, 4) if t_comp else None,
                           speedup_vs_eager=round(t_eager / t_ours, 2),
                           GBps=round(gbps, 1), bandwidth_fraction=round(gbps * 1e9 / bandwidth, 3))
                rows.append(row)
                append_jsonl(out / "ops.jsonl", [row])  # as it goes: a cut-off run keeps its rows
                comp = f"{t_comp:10.3f}" if t_comp else f"{'-':>10s}"
                print(f"{name:20s} {f'{n}x{c}':>12s} {row['dtype']:>8s} {t_ours:9.3f} "
                      f"{t_eager:9.3f} {comp} {t_eager / t_ours:8.2f} {gbps:7.0f} "
                      f"{100 * row['bandwidth_fraction']:5.0f}")
    worst = min(r["speedup_vs_eager"] for r in rows)
    print(f"summary: {len(rows)} rows on {card}; slowest speedup vs eager {worst:.2f}x; "
          f"appended to {out / 'ops.jsonl'}")
    return 0


if __name__ == "__main__":
    main()
