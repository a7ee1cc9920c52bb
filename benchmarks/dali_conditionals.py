"""What DALI's conditional routing costs a sample: a CPU pipeline of K `if coin: x else: x`
around an identity (each a split and a merge of the batch, as RandAugment routes every sample
to one of its operations), timed for several K and thread counts (a thread count's pipelines in
turn, the best of several such rounds). The per-sample cost of one if/else is
(1/rate(K) - 1/rate(0)) / K; if it does not shrink with more threads, it is paid in one thread
of the executor, and pipelines side by side (data.unlabeled_pipelines) are what
spread it over cores.

    python benchmarks/dali_conditionals.py [--ifs 0,1,4,16] [--threads 1,2,4] [--batch 448]
                                           [--runs 8] [--repeats 5] [--out benchmarks/results]

Appends one JSON object per (K, threads) to OUT/dali_conditionals.jsonl; the last line printed is
a summary.
"""
import argparse
import datetime
import os
import time
from pathlib import Path


def _int_list(text):
    try:
        values = [int(v) for v in text.split(",") if v]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}")
    if not values or min(values) < 0:
        raise argparse.ArgumentTypeError(f"expected integers >= 0, got {text!r}")
    return values


def routed_pipeline(ifs, threads, batch):
    """A built pipeline of `ifs` if/else around an identity (32x32x3 uint8 samples), warmed."""
    import numpy as np
    from nvidia.dali import fn, pipeline_def, types

    images = np.random.default_rng(0).integers(0, 256, (batch, 32, 32, 3), dtype=np.uint8)

    @pipeline_def(enable_conditionals=True)
    def routed():
        x = fn.external_source(source=lambda: images, batch=True, layout="HWC",
                               dtype=types.UINT8)
        for _ in range(ifs):
            if fn.random.coin_flip():
                x = x
            else:
                x = x
        return x

    pipe = routed(batch_size=batch, num_threads=threads, device_id=None, seed=1)
    pipe.build()
    for _ in range(2):
        pipe.run()
    return pipe


def rates(pipes, batch, runs, repeats):
    """Samples a second of each pipeline, the best of `repeats` rounds that time each in turn:
    a machine busy for a moment slows one round of all of them, not one pipeline's only
    measurement (a single pass on a loaded 2-core machine once timed 8 if/else faster than
    none)."""
    best = [0.0] * len(pipes)
    for _ in range(repeats):
        for i, pipe in enumerate(pipes):
            t0 = time.perf_counter()
            for _ in range(runs):
                pipe.run()
            best[i] = max(best[i], runs * batch / (time.perf_counter() - t0))
    return best


def main(argv=None):
    parser = argparse.ArgumentParser(prog="dali_conditionals.py",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--ifs", type=_int_list, default=[0, 1, 4, 16],
                        help="numbers of if/else to time (default: 0,1,4,16)")
    parser.add_argument("--threads", type=_int_list, default=[1, 2, 4],
                        help="DALI CPU threads (default: 1,2,4)")
    parser.add_argument("--batch", type=int, default=448, help="samples a run (default: 448)")
    parser.add_argument("--runs", type=int, default=8,
                        help="runs timed together (default: 8)")
    parser.add_argument("--repeats", type=int, default=5,
                        help="rounds, each timing every pipeline in turn; the best round's "
                        "rate counts (default: 5)")
    parser.add_argument("--out", default="benchmarks/results",
                        help="where dali_conditionals.jsonl is appended")
    args = parser.parse_args(argv)
    if args.batch < 1 or args.runs < 1 or args.repeats < 1 or 0 in args.threads:
        parser.error("--batch, --runs, --repeats and --threads must be >= 1")
    from mpl_fast.train.run_log import check_results_folder

    check_results_folder(parser, "--out", args.out)
    import nvidia.dali
    import torch

    from mpl_fast.train.run_log import append_jsonl

    ifs = sorted(set(args.ifs) | {0})
    records = []
    for threads in args.threads:
        pipes = [routed_pipeline(k, threads, args.batch) for k in ifs]
        measured = rates(pipes, args.batch, args.runs, args.repeats)
        del pipes
        base = measured[0]
        for k, r in zip(ifs, measured):
            us = (1 / r - 1 / base) / k * 1e6 if k else None
            records.append({"benchmark": "dali_conditionals",
                            "date": datetime.date.today().isoformat(), "device": "cpu",
                            "cpus": os.cpu_count(), "dali": nvidia.dali.__version__,
                            "torch": torch.__version__, "batch": args.batch, "runs": args.runs,
                            "repeats": args.repeats, "threads": threads,
                            "ifs": k, "samples_per_s": round(r, 1),
                            "us_per_sample_per_if": round(us, 2) if us is not None else None})
            print(f"{threads} thread(s), {k:3d} if/else: {r:10,.0f} samples/s"
                  + (f", {us:.2f} us a sample an if/else" if us is not None else ""), flush=True)
    append_jsonl(Path(args.out) / "dali_conditionals.jsonl", records)
    most = max(ifs)
    per_thread = {r["threads"]: r["us_per_sample_per_if"] for r in records if r["ifs"] == most}
    if most:
        print("summary: one if/else costs "
              + ", ".join(f"{us:.2f} us a sample with {t} thread(s)"
                          for t, us in per_thread.items()) + f" ({most} in a row)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
