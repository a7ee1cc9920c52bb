"""Memory of one MPL step: full MPL (large teacher + student) vs Reduced MPL (stored logits +
a small reduced teacher + student). Counts bytes of parameters, gradients, optimizer state and
the activations autograd saves (peak, via saved-tensor hooks), so it runs on a CPU too; on a
GPU it also reports torch.cuda.max_memory_allocated.

    python benchmarks/reduced_mpl_memory.py [--device cpu|cuda] [--out benchmarks/results]
"""
import argparse
import datetime
import platform
from pathlib import Path

import torch
from torch import nn

from mpl_fast.mpl import MPLBatch, MPLConfig, MPLStep
from mpl_fast.mpl.reduced import ReducedTeacher
from mpl_fast.train.run_log import append_jsonl, check_results_folder


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


def measure(reduced, device, batch=32, mu=7, size=32, teacher_width=128, student_width=32):
    torch.manual_seed(0)
    student = convnet(student_width).to(device)
    big = convnet(teacher_width).to(device)
    x_l = torch.randn(batch, 3, size, size, device=device)
    y_l = torch.randint(0, 10, (batch,), device=device)
    x_u = torch.randn(batch * mu, 3, size, size, device=device)
    kw = {}
    if reduced:
        with torch.no_grad():
            big.eval()
            kw = dict(teacher_l=big(x_l).half(), teacher_uw=big(x_u).half(),
                      teacher_us=big(x_u).half())
        del big
        teacher = ReducedTeacher(10).to(device)
    else:
        teacher = big
    t_opt = torch.optim.SGD(teacher.parameters(), lr=0.1, momentum=0.9)
    s_opt = torch.optim.SGD(student.parameters(), lr=0.1, momentum=0.9)
    step = MPLStep(teacher, student, t_opt, s_opt, MPLConfig(pseudo_labels="argmax"))
    tracker = SavedBytes()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    with torch.autograd.graph.saved_tensors_hooks(tracker.pack, tracker.unpack):
        step(MPLBatch(x_l, y_l, x_u, x_u, **kw))
    result = {"mode": "reduced" if reduced else "full",
              "state_bytes": state_bytes(teacher, student, t_opt, s_opt),
              "peak_saved_activation_bytes": tracker.peak}
    if device.type == "cuda":
        result["cuda_max_allocated_bytes"] = torch.cuda.max_memory_allocated()
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    check_results_folder(parser, "--out", args.out)
    device = torch.device(args.device)
    rows = [measure(False, device), measure(True, device)]
    full, red = rows
    total = lambda r: r["state_bytes"] + r["peak_saved_activation_bytes"]  # noqa: E731
    record = {
        "benchmark": "reduced_mpl_memory", "date": datetime.date.today().isoformat(),
        "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "setup": "teacher convnet width 128, student width 32, "
        "32x32, labeled batch 32, mu 7", "rows": rows,
        "saving": round(1 - total(red) / total(full), 4),
    }
    for r in rows:
        print(f"{r['mode']:8s} state {r['state_bytes'] / 2**20:8.2f} MiB   peak saved activations "
              f"{r['peak_saved_activation_bytes'] / 2**20:8.2f} MiB")
    print(f"Reduced MPL holds {100 * record['saving']:.1f}% less memory in this step")
    out = Path(args.out)
    append_jsonl(out / "reduced_mpl_memory.jsonl", [record])


if __name__ == "__main__":
    main()
