"""Memory of one MPL step: full MPL (large teacher + student) vs Reduced MPL (stored logits +
a small reduced teacher + student). Counts bytes of parameters, gradients, optimizer state and
the activations autograd saves (peak, via saved-tensor hooks), so it runs on a CPU too; on a
GPU it also reports torch.cuda.max_memory_allocated (the step in bf16 autocast, as the trainer
runs it there).

    python benchmarks/reduced_mpl_memory.py [--device cpu|cuda] [--out benchmarks/results]
        [--teacher NAME] [--student NAME] [--image-size S] [--batch-size B] [--mu M]
        [--classes C]

NAME: convnet-W (a small BatchNorm convnet of width W; the defaults, convnet-128 and
convnet-32) or a model of the registry (wrn28_2, resnet50, timm:<name>, ...).
"""
import argparse
import datetime
import platform
from pathlib import Path

import torch
from torch import nn

from mpl_fast.models.registry import build_model
from mpl_fast.mpl import MPLBatch, MPLConfig, MPLStep
from mpl_fast.mpl.reduced import ReducedTeacher
from mpl_fast.train.run_log import append_jsonl, check_device, check_results_folder


def convnet(width, classes=10):
    def block(cin, cout):
        return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]
    return nn.Sequential(*block(3, width), *block(width, width), nn.MaxPool2d(2),
                         *block(width, 2 * width), *block(2 * width, 2 * width), nn.MaxPool2d(2),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * width, classes))


class SavedBytes:
    """Tracks the bytes autograd holds for backward, and their peak."""

    def __init__(self):
        self.live = self.peak = 0

    def pack(self, t):
        n = t.numel() * t.element_size()
        self.live += n
        self.peak = max(self.peak, self.live)
        return (t, n)

    def unpack(self, packed):
        t, n = packed
        return t


def state_bytes(*modules_and_opts):
    total = 0
    for m in modules_and_opts:
        if isinstance(m, nn.Module):
            total += sum(p.numel() * p.element_size() * 2 for p in m.parameters())  # + grads
        else:
            total += sum(v.numel() * v.element_size() for s in m.state.values()
                         for v in s.values() if isinstance(v, torch.Tensor))
    return total


def network(name, classes):
    if name.startswith("convnet-"):
        return convnet(int(name[len("convnet-"):]), classes)
    return build_model(name, classes, 3)


def measure(reduced, device, args):
    torch.manual_seed(0)
    cuda = device.type == "cuda"
    student = network(args.student, args.classes).to(device)
    big = network(args.teacher, args.classes).to(device)
    if cuda:
        student, big = (m.to(memory_format=torch.channels_last) for m in (student, big))
    size = args.image_size

    def images(n):
        x = torch.randn(n, 3, size, size, device=device)
        return x.contiguous(memory_format=torch.channels_last) if cuda else x
    x_l, x_u = images(args.batch_size), images(args.batch_size * args.mu)
    y_l = torch.randint(0, args.classes, (args.batch_size,), device=device)
    kw = {}
    if reduced:
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            big.eval()
            stored = torch.cat([big(x_u[i:i + 256]) for i in range(0, len(x_u), 256)]).half()
            kw = dict(teacher_l=big(x_l).half(), teacher_uw=stored, teacher_us=stored)
        del big
        teacher = ReducedTeacher(args.classes).to(device)
    else:
        teacher = big
    t_opt = torch.optim.SGD(teacher.parameters(), lr=0.1, momentum=0.9)
    s_opt = torch.optim.SGD(student.parameters(), lr=0.1, momentum=0.9)
    step = MPLStep(teacher, student, t_opt, s_opt, MPLConfig(pseudo_labels="argmax"),
                   autocast_dtype=torch.bfloat16 if cuda else None)
    tracker = SavedBytes()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    with torch.autograd.graph.saved_tensors_hooks(tracker.pack, tracker.unpack):
        step(MPLBatch(x_l, y_l, x_u, x_u, **kw))
    result = {"mode": "reduced" if reduced else "full",
              "state_bytes": state_bytes(teacher, student, t_opt, s_opt),
              "peak_saved_activation_bytes": tracker.peak}
    if cuda:
        result["cuda_max_allocated_bytes"] = torch.cuda.max_memory_allocated()
    del step, teacher, student, t_opt, s_opt, kw, x_l, x_u
    if cuda:
        torch.cuda.empty_cache()
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu",
                        help="cpu, cuda or cuda:N (default: %(default)s)")
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--teacher", default="convnet-128", help="the large teacher")
    parser.add_argument("--student", default="convnet-32")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=32, help="labeled batch")
    parser.add_argument("--mu", type=int, default=7)
    parser.add_argument("--classes", type=int, default=10)
    args = parser.parse_args(argv)
    for flag in ("image_size", "batch_size", "mu"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be >= 1")
    if args.classes < 2:
        parser.error("--classes must be >= 2")
    for flag in ("teacher", "student"):
        name = getattr(args, flag)
        try:
            network(name, args.classes)
        except ValueError as err:
            parser.error(f"--{flag}: {err}")
    check_results_folder(parser, "--out", args.out)
    device = check_device(parser, "--device", args.device)
    rows = [measure(False, device, args), measure(True, device, args)]
    full, red = rows
    total = lambda r: r["state_bytes"] + r["peak_saved_activation_bytes"]  # noqa: E731
    record = {
        "benchmark": "reduced_mpl_memory", "date": datetime.date.today().isoformat(),
        "device": (torch.cuda.get_device_name() if device.type == "cuda"
                   else platform.processor() or "cpu"),
        "torch": torch.__version__, "teacher": args.teacher, "student": args.student,
        "image_size": args.image_size, "batch_size": args.batch_size, "mu": args.mu,
        "classes": args.classes, "rows": rows,
        "saving": round(1 - total(red) / total(full), 4),
    }
    for r in rows:
        print(f"{r['mode']:8s} state {r['state_bytes'] / 2**20:8.2f} MiB   peak saved activations "
              f"{r['peak_saved_activation_bytes'] / 2**20:8.2f} MiB"
              + (f"   CUDA peak {r['cuda_max_allocated_bytes'] / 2**30:6.2f} GiB"
                 if "cuda_max_allocated_bytes" in r else ""))
    if device.type == "cuda":
        record["cuda_saving"] = round(1 - rows[1]["cuda_max_allocated_bytes"]
                                      / rows[0]["cuda_max_allocated_bytes"], 4)
    print(f"Reduced MPL holds {100 * record['saving']:.1f}% less memory in this step")
    out = Path(args.out)
    append_jsonl(out / "reduced_mpl_memory.jsonl", [record])


if __name__ == "__main__":
    main()
