"""`mpl-fast two-moons`: Supervised vs Pseudo Labels vs MPL on the paper's TwoMoons toy."""
import json
import os
import time
from pathlib import Path

import torch
from torch import nn

from mpl_fast.data.two_moons import two_moons
from mpl_fast.mpl import MPLBatch, MPLConfig, MPLStep, preset


def mlp():
    """The paper's networks: 2 hidden layers of 8 sigmoid units."""
    return nn.Sequential(nn.Linear(2, 8), nn.Sigmoid(), nn.Linear(8, 8), nn.Sigmoid(),
                         nn.Linear(8, 2))


def accuracy(model, x, y):
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def _supervised(data, steps, lr):
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(data.x[data.labeled]), data.y[data.labeled]).backward()
        opt.step()
    return model


def _pseudo_label(data, teacher, steps, lr, batch, gen):
    student = mlp()
    opt = torch.optim.SGD(student.parameters(), lr=lr)
    for _ in range(steps):
        xu = data.x[torch.randint(0, len(data.x), (batch,), generator=gen)]
        with torch.no_grad():
            labels = teacher(xu).argmax(1)
        opt.zero_grad()
        nn.functional.cross_entropy(student(xu), labels).backward()
        opt.step()
    return student


def _mpl(data, config, steps, lr, batch, gen):
    teacher, student = mlp(), mlp()
    step = MPLStep(teacher, student, torch.optim.SGD(teacher.parameters(), lr=lr),
                   torch.optim.SGD(student.parameters(), lr=lr), config, generator=gen)
    x_l, y_l = data.x[data.labeled], data.y[data.labeled]
    for i in range(steps):
        xu = data.x[torch.randint(0, len(data.x), (batch,), generator=gen)]
        step(MPLBatch(x_l, y_l, xu, xu), i)
    return teacher, student


def run(seed: int, steps: int = 3000, lr: float = 0.1, batch: int = 64,
        config: MPLConfig = None, progress=print):
    """Train the three methods on one seed; returns (metrics dict, models for plotting)."""
    config = config or preset("paper")
    data = two_moons(seed)
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    t0 = time.time()
    progress(f"seed {seed}: supervised ({steps} steps)")
    supervised = _supervised(data, steps, lr)
    progress(f"seed {seed}: pseudo labels")
    pseudo = _pseudo_label(data, supervised, steps, lr, batch, gen)
    progress(f"seed {seed}: MPL ({config.estimator}, {config.pseudo_labels} labels)")
    _, mpl_student = _mpl(data, config, steps, lr, batch, gen)
    metrics = {
        "seed": seed, "steps": steps, "lr": lr, "unlabeled_batch": batch,
        "estimator": config.estimator, "pseudo_labels": config.pseudo_labels,
        "supervised_acc": accuracy(supervised, data.x, data.y),
        "pseudo_label_acc": accuracy(pseudo, data.x, data.y),
        "mpl_acc": accuracy(mpl_student, data.x, data.y),
        "seconds": round(time.time() - t0, 2),
    }
    return metrics, data, {"Supervised": supervised, "Pseudo Labels": pseudo, "MPL": mpl_student}


def plot(path: Path, data, models, metrics):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lo, hi = data.x.min(0).values - 0.5, data.x.max(0).values + 0.5
    gx, gy = torch.meshgrid(torch.linspace(lo[0], hi[0], 200), torch.linspace(lo[1], hi[1], 200),
                            indexing="xy")
    grid = torch.stack([gx.flatten(), gy.flatten()], 1)
    keys = {"Supervised": "supervised_acc", "Pseudo Labels": "pseudo_label_acc", "MPL": "mpl_acc"}
    fig, axes = plt.subplots(1, 3, figsize=(13, 4.2))
    for ax, (name, model) in zip(axes, models.items()):
        with torch.no_grad():
            z = torch.softmax(model(grid), 1)[:, 1].reshape(gx.shape)
        ax.contourf(gx, gy, z, levels=20, cmap="RdBu", alpha=0.6)
        ax.contour(gx, gy, z, levels=[0.5], colors="k")
        ax.scatter(data.x[:, 0], data.x[:, 1], c=data.y, s=3, cmap="coolwarm", alpha=0.5)
        lab = data.labeled
        ax.scatter(data.x[lab, 0], data.x[lab, 1], c=data.y[lab], s=120, marker="*",
                   cmap="coolwarm", edgecolors="k")
        ax.set_title(f"{name}: {100 * metrics[keys[name]]:.1f}%")
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=90)
    plt.close(fig)
    os.replace(tmp, path)


def write_json(path: Path, obj):
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)
