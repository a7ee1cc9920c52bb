"""Input pipeline throughput: the MPL streams against bare decode + crop on the same files.

    mpl-fast bench data --root DIR [--device cpu|gpu] [--batch-size B] [--mu M] [--steps K]
    mpl-fast bench data --synthetic N --root DIR ...

The MPL streams are labeled B + unlabeled mu*B images a step, each unlabeled image in two views
(weak, strong); the comparison is a bare decode + crop pipeline over the same files. Images/s
counts decoded source images (B + mu*B per step). --synthetic N first writes N ImageNet-sized
(500x375) JPEGs in 10 class folders under DIR (DIR must not exist; a tree written by an earlier
--synthetic N is reused). --parts also times each pipeline of the stream alone (labeled;
unlabeled; unlabeled without RandAugment), in source images/s, to show which part holds the
stream back. --variant SPEC (repeatable) times the stream under other settings, SPEC being
comma-separated KEY=VALUE of decode (gpu|cpu: where JPEGs are decoded; once: small images all
of the output size decoded once before the timing into host memory, the time that takes recorded
apart as decode_once_s), augment (gpu|cpu: where
crops, flips, RandAugment and cutout run), steps_per_run (steps' batches a pipeline run makes),
pipelines (unlabeled pipelines side by side, each making its share of the unlabeled batch),
threads and hw_load (GPU decoding: the share of JPEGs sent to the hardware JPEG engine, 0-1),
e.g. `--variant decode=cpu --variant decode=cpu,augment=cpu,threads=16`; the default is one
variant, all on the device with --threads. The bare pipeline is timed (with --threads) for each
decode device the variants use (for `once`, the device's own: gpu on a GPU), and each variant is
compared with the fastest bare. For large
images bare decodes only the random crop's window (as the labeled stream does); it is also
timed decoding the whole image, then cropping (as the unlabeled stream must, its two views
cropping one decode), and each variant compared with that too. Appends a JSON record per
variant to benchmarks/results/data.jsonl; the last line printed is a summary of the fastest
variant.
"""
import argparse
import dataclasses
import datetime
import time
from pathlib import Path

import torch
from mpl_fast.data.placement import placement
from mpl_fast.train.run_log import append_jsonl, check_results_folder

VARIANT_KEYS = {"decode": str, "augment": str, "steps_per_run": int, "threads": int,
                "hw_load": float, "pipelines": int}


def parse_variant(spec):
    """'decode=cpu,threads=16' -> {'decode': 'cpu', 'threads': 16} (keys of VARIANT_KEYS)."""
    out = {}
    for item in filter(None, spec.split(",")):
        key, sep, value = item.partition("=")
        kind = VARIANT_KEYS.get(key)
        if not sep or kind is None:
            raise argparse.ArgumentTypeError(
                f"variant {spec!r}: expected KEY=VALUE items of {', '.join(VARIANT_KEYS)}")
        if kind is int:
            if not value.isdigit() or int(value) < 1:
                raise argparse.ArgumentTypeError(f"variant {spec!r}: {key} must be >= 1")
            out[key] = int(value)
        elif kind is float:
            try:
                out[key] = float(value)
            except ValueError:
                raise argparse.ArgumentTypeError(
                    f"variant {spec!r}: {key} must be a number in [0, 1]") from None
        else:
            out[key] = value  # a device: checked with the others below
    try:  # the placement's rules, as the trainer applies them
        placement(True, out.get("decode", "gpu"), out.get("augment", "gpu"), out.get("hw_load"))
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"variant {spec!r}: {err}") from None
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(prog="mpl-fast bench data",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--root", required=True, help="an image-folder tree (root/<class>/*.jpg)")
    parser.add_argument("--synthetic", type=int, default=None, metavar="N",
                        help="first write N synthetic 500x375 JPEGs under --root (a new folder)")
    parser.add_argument("--device", choices=["cpu", "gpu"],
                        default="gpu" if torch.cuda.is_available() else "cpu",
                        help="GPU ('mixed') or CPU pipelines (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=64,
                        help="labeled batch B (default: %(default)s)")
    parser.add_argument("--mu", type=int, default=7,
                        help="unlabeled batch = mu * B (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=50,
                        help="steps timed, after 3 untimed (default: %(default)s)")
    parser.add_argument("--image-size", type=int, default=None,
                        help="output size (default: 32 for small images, else 224)")
    parser.add_argument("--threads", type=int, default=8,
                        help="DALI CPU threads a pipeline (default: %(default)s)")
    parser.add_argument("--parts", action="store_true",
                        help="also time each pipeline alone (labeled, unlabeled, unlabeled "
                             "without RandAugment)")
    parser.add_argument("--variant", type=parse_variant, action="append", default=None,
                        metavar="SPEC", help="time the stream with these settings "
                        "(decode=gpu|cpu|once,augment=gpu|cpu,steps_per_run=K,threads=T,"
                        "hw_load=F,pipelines=P; "
                        "repeatable)")
    parser.add_argument("--out", default="benchmarks/results",
                        help="where data.jsonl is appended (default: %(default)s)")
    args = parser.parse_args(argv)
    if min(args.batch_size, args.mu, args.steps, args.threads) < 1:
        parser.error("--batch-size, --mu, --steps and --threads must be >= 1")
    if args.image_size is not None and args.image_size < 1:  # 0 read as "the default" before
        parser.error(f"--image-size must be >= 1, got {args.image_size}")
    if args.device == "gpu" and not torch.cuda.is_available():
        parser.error("--device gpu: this machine has no CUDA device (--device cpu runs every "
                     "stage on the CPU)")
    check_results_folder(parser, "--out", args.out)
    if args.synthetic is not None and args.synthetic < 10:
        parser.error("--synthetic: at least 10 images (one per class)")

    from mpl_fast.data import dali_pipelines as P
    from mpl_fast.data.dali_stream import DaliStream, StreamSpec
    from mpl_fast.data.decode_once import decode_index
    from mpl_fast.data.image_folder import (DataError, all_of_size, balanced_split,
                                            index_folder)

    root = Path(args.root)
    if args.synthetic is not None:
        from mpl_fast.data.synthetic import synthetic_tree

        synthetic_tree(root, args.synthetic)
    index = index_folder(root / "train" if (root / "train").is_dir() else root)
    from PIL import Image

    with Image.open(index.files[0]) as im:
        small = max(im.size) <= 64
    size = args.image_size if args.image_size is not None else (32 if small else 224)
    device = torch.device("cuda" if args.device == "gpu" else "cpu")
    per_class = max(1, min(len(index) // len(index.classes) // 10, 400))
    labeled = balanced_split(index, per_class=per_class)
    sized = small and all_of_size(index, size)  # CIFAR at 32: no resize
    per_step = args.batch_size * (1 + args.mu)
    variants = [{"decode": "gpu", "augment": "gpu", "steps_per_run": 1, "threads": args.threads,
                 "hw_load": None, "pipelines": 1, **v} for v in (args.variant or [{}])]
    for v in variants:
        if (args.batch_size * args.mu) % v["pipelines"]:
            parser.error(f"--variant pipelines={v['pipelines']} must divide the unlabeled batch "
                         f"{args.batch_size * args.mu}")
    if device.type == "cpu":  # every stage on the CPU, whatever a variant asks
        variants = [dict(v, decode="once" if v["decode"] == "once" else "cpu", augment="cpu")
                    for v in variants]
    # the hardware decoder's share means nothing to CPU decoding
    variants = [dict(v, hw_load=None) if v["decode"] != "gpu" else v for v in variants]
    if not sized and any(v["decode"] == "once" for v in variants):
        raise DataError(f"--variant decode=once needs small images all {size}x{size}")

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

    def bare_rate(decode, whole=False):
        """Images/s of decode + crop alone (whole: the whole image decoded, then cropped)."""
        gpu = device.type == "cuda"
        pipe = P.bare_pipeline(index.files, size, small, placement(gpu, decode, decode),
                               batch_size=per_step, num_threads=args.threads,
                               device_id=0 if gpu else None, seed=0, whole=whole)
        pipe.build()
        return args.steps * per_step / timed(pipe.run, args.steps)

    own = "gpu" if device.type == "cuda" else "cpu"  # what `once` is compared with
    bare = {decode: bare_rate(decode) for decode in dict.fromkeys(
        own if v["decode"] == "once" else v["decode"] for v in variants)}
    bare_ips = max(bare.values())
    # large images: also the whole image decoded, then cropped
    bare_whole = None if small else bare_rate(variants[0]["decode"], whole=True)  # not once
    card = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    records = []
    for v in variants:
        spec = StreamSpec(args.batch_size, args.mu, size, small, num_threads=v["threads"],
                          sized=sized, decode_device=v["decode"], augment_device=v["augment"],
                          steps_per_run=v["steps_per_run"], hw_decoder_load=v["hw_load"],
                          unlabeled_pipelines=v["pipelines"])
        source, decode_s = index, None
        if v["decode"] == "once":
            t0 = time.perf_counter()
            source = decode_index(index, size, v["threads"], quiet=True)
            decode_s = time.perf_counter() - t0
        stream = DaliStream(source, labeled, spec, device)
        steps = max(args.steps, 3 * v["steps_per_run"])  # whole pipeline runs at least
        mpl_ips = steps * per_step / timed(stream.next, steps)
        parts = {}
        if args.parts:  # each pipeline alone, its outputs left in DALI's memory
            k = v["steps_per_run"]
            b, ub = args.batch_size * k, args.batch_size * args.mu * k
            runs = max(1, args.steps // k)
            parts["labeled"] = runs * b / timed(stream.lab.run, runs)
            parts["unlabeled"] = runs * ub / timed(lambda: _run_all(stream.unl), runs)
            del stream
            plain = DaliStream(source, labeled, dataclasses.replace(spec, ra_n=0), device)
            parts["unlabeled_no_randaugment"] = runs * ub / timed(lambda: _run_all(plain.unl),
                                                                  runs)
            del plain
        else:
            del stream
        record = {"benchmark": "data", "date": datetime.date.today().isoformat(),
                  "device": card, "torch": torch.__version__, "root": str(root),
                  "files": len(index), "synthetic": args.synthetic is not None,
                  "image_size": size, "batch_size": args.batch_size, "mu": args.mu,
                  "decode_device": v["decode"], "augment_device": v["augment"],
                  "steps_per_run": v["steps_per_run"], "threads": v["threads"],
                  "hw_decoder_load": v["hw_load"], "unlabeled_pipelines": v["pipelines"],
                  "mpl_images_per_s": round(mpl_ips, 1), "bare_images_per_s": round(bare_ips, 1),
                  "bare_images_per_s_by_decode": {k: round(x, 1) for k, x in bare.items()},
                  "fraction_of_bare": round(mpl_ips / bare_ips, 3)}
        if decode_s is not None:
            record["decode_once_s"] = round(decode_s, 2)
        if bare_whole is not None:
            record["bare_whole_decode_images_per_s"] = round(bare_whole, 1)
            record["fraction_of_bare_whole_decode"] = round(mpl_ips / bare_whole, 3)
        if parts:
            record["parts_images_per_s"] = {k: round(x, 1) for k, x in parts.items()}
        records.append(record)
        print(f"MPL streams (labeled + weak/strong unlabeled), {_settings(record)}: "
              f"{mpl_ips:,.0f} img/s", flush=True)
        for name, ips in parts.items():
            print(f"  alone: {name:<38} {ips:,.0f} img/s", flush=True)
    for decode, ips in bare.items():
        print(f"bare decode ({decode}) + crop: {ips:,.0f} img/s")
    if bare_whole is not None:
        print(f"bare decode of the whole image ({variants[0]['decode']}) + crop: "
              f"{bare_whole:,.0f} img/s")
    append_jsonl(Path(args.out) / "data.jsonl", records)
    best = max(records, key=lambda r: r["mpl_images_per_s"])
    print(f"summary: {card} {size}px B={args.batch_size} mu={args.mu}: MPL streams "
          f"{best['mpl_images_per_s']:,.0f} img/s ({_settings(best)}) = "
          f"{100 * best['fraction_of_bare']:.0f}% of bare decode+crop ({bare_ips:,.0f} img/s)")
    return 0


def _run_all(pipes):
    for pipe in pipes:  # each ran ahead in its own executor: side by side
        pipe.run()


def _settings(record):
    hw = record["hw_decoder_load"]
    return (f"decode {record['decode_device']}"
            + (f" ({hw:g} to the hardware decoder)" if hw is not None else "")
            + f", augment {record['augment_device']}, {record['steps_per_run']} step(s) a run, "
            f"{record['threads']} threads"
            + (f", {record['unlabeled_pipelines']} unlabeled pipelines"
               if record.get("unlabeled_pipelines", 1) > 1 else ""))


if __name__ == "__main__":
    main()
