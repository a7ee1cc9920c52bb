"""Input pipeline throughput: the MPL streams against bare decode + crop on the same files.

    mpl-fast bench data --root DIR [--device cpu|gpu] [--batch-size B] [--mu M] [--steps K]
    mpl-fast bench data --synthetic N --root DIR ...

The MPL streams are labeled B + unlabeled mu*B images a step, each unlabeled image in two views
(weak, strong); the comparison is a bare decode + crop pipeline over the same files. Images/s
counts decoded source images (B + mu*B per step). --synthetic N first writes N ImageNet-sized
(500x375) JPEGs in 10 class folders under DIR (DIR must not exist; a tree written by an earlier
--synthetic N is reused). --parts also times each pipeline of the stream alone (labeled;
unlabeled; unlabeled without RandAugment), in source images/s, to show which part holds the
stream back. Appends a JSON record to benchmarks/results/data.jsonl; the last line printed is a
summary.
"""
import argparse
import dataclasses
import datetime
import time
from pathlib import Path

import torch
from mpl_fast.train.run_log import append_jsonl


def main(argv=None):
    parser = argparse.ArgumentParser(prog="mpl-fast bench data", description=__doc__.splitlines()[0])
    parser.add_argument("--root", required=True, help="an image-folder tree (root/<class>/*.jpg)")
    parser.add_argument("--synthetic", type=int, default=None, metavar="N",
                        help="first write N synthetic 500x375 JPEGs under --root (a new folder)")
    parser.add_argument("--device", choices=["cpu", "gpu"],
                        default="gpu" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--mu", type=int, default=7)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--image-size", type=int, default=None,
                        help="output size (default: 32 for small images, else 224)")
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--parts", action="store_true",
                        help="also time each pipeline alone (labeled, unlabeled, unlabeled "
                             "without RandAugment)")
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args(argv)
    if args.batch_size < 1 or args.mu < 1 or args.steps < 1:
        parser.error("--batch-size, --mu and --steps must be >= 1")
    if args.synthetic is not None and args.synthetic < 10:
        parser.error("--synthetic: at least 10 images (one per class)")

    from mpl_fast.data import dali_pipelines as P
    from mpl_fast.data.dali_stream import DaliStream, StreamSpec
    from mpl_fast.data.image_folder import all_of_size, balanced_split, index_folder

    root = Path(args.root)
    if args.synthetic is not None:
        from mpl_fast.data.synthetic import synthetic_tree

        synthetic_tree(root, args.synthetic)
    index = index_folder(root / "train" if (root / "train").is_dir() else root)
    from PIL import Image

    with Image.open(index.files[0]) as im:
        small = max(im.size) <= 64
    size = args.image_size or (32 if small else 224)
    device = torch.device("cuda" if args.device == "gpu" else "cpu")
    per_class = max(1, min(len(index) // len(index.classes) // 10, 400))
    labeled = balanced_split(index, per_class=per_class)
    sized = small and all_of_size(index, size)  # CIFAR at 32: no resize
    spec = StreamSpec(args.batch_size, args.mu, size, small, num_threads=args.threads,
                      sized=sized)
    stream = DaliStream(index, labeled, spec, device)
    per_step = args.batch_size * (1 + args.mu)

    def timed(fn, steps):
        for _ in range(3):
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(steps):
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    mpl_s = timed(stream.next, args.steps)
    parts = {}
    if args.parts:  # each pipeline alone, its outputs left in DALI's memory
        b, ub = args.batch_size, args.batch_size * args.mu
        parts["labeled"] = args.steps * b / timed(stream.lab.run, args.steps)
        parts["unlabeled"] = args.steps * ub / timed(stream.unl.run, args.steps)
        del stream
        plain = DaliStream(index, labeled, dataclasses.replace(spec, ra_n=0), device)
        parts["unlabeled_no_randaugment"] = args.steps * ub / timed(plain.unl.run, args.steps)
        del plain
    bare = P.bare_pipeline(index.files, size, small, device.type == "cuda",
                           batch_size=per_step, num_threads=args.threads,
                           device_id=0 if device.type == "cuda" else None, seed=0)
    bare.build()
    bare_s = timed(bare.run, args.steps)
    mpl_ips, bare_ips = args.steps * per_step / mpl_s, args.steps * per_step / bare_s
    record = {"benchmark": "data", "date": datetime.date.today().isoformat(),
              "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "root": str(root), "files": len(index),
              "synthetic": args.synthetic is not None,
              "image_size": size, "batch_size": args.batch_size, "mu": args.mu,
              "mpl_images_per_s": round(mpl_ips, 1), "bare_images_per_s": round(bare_ips, 1),
              "fraction_of_bare": round(mpl_ips / bare_ips, 3)}
    if parts:
        record["parts_images_per_s"] = {k: round(v, 1) for k, v in parts.items()}
    out = Path(args.out)
    append_jsonl(out / "data.jsonl", [record])
    print(f"MPL streams (labeled + weak/strong unlabeled): {mpl_ips:,.0f} img/s")
    print(f"bare decode + crop:                           {bare_ips:,.0f} img/s")
    for name, ips in parts.items():
        print(f"  alone: {name:<38} {ips:,.0f} img/s")
    print(f"summary: {record['device']} {size}px B={args.batch_size} mu={args.mu}: MPL streams "
          f"{mpl_ips:,.0f} img/s = {100 * mpl_ips / bare_ips:.0f}% of bare decode+crop "
          f"({bare_ips:,.0f} img/s)")
    return 0


if __name__ == "__main__":
    main()
