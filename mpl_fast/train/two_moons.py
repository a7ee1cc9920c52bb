"""`mpl-fast two-moons`: Supervised vs Pseudo Labels vs MPL on the paper's TwoMoons toy."""
import json
import os
import time
from pathlib import Path

import torch
from torch import nn

from mpl_fast.data.two_moons import two_moons
from mpl_fast.mpl import MPLBatch, MPLConfig, MPLStep, preset
from mpl_fast.train.run_log import save_figure


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


def _student_on_labels(data, labels, steps, lr, batch, gen):
    """A student trained on fixed labels for every point (Pseudo Labels; the objective check)."""
    student = mlp()
    opt = torch.optim.SGD(student.parameters(), lr=lr)
    for _ in range(steps):
        idx = torch.randint(0, len(data.x), (batch,), generator=gen)
        opt.zero_grad()
        nn.functional.cross_entropy(student(data.x[idx]), labels[idx]).backward()
        opt.step()
    return student


def labeled_ce(model, data):
    """What MPL's feedback minimises: the student's cross-entropy on the labeled points."""
    with torch.no_grad():
        return float(nn.functional.cross_entropy(model(data.x[data.labeled]),
                                                 data.y[data.labeled]))


def _mpl(data, config, steps, lr, batch, gen, uda_noise=0.0):
    """MPL on the unlabeled points. With uda_noise > 0 the strong view is the point plus Gaussian
    noise of that standard deviation (what the teacher's UDA term is made consistent under)."""
    teacher, student = mlp(), mlp()
    step = MPLStep(teacher, student, torch.optim.SGD(teacher.parameters(), lr=lr),
                   torch.optim.SGD(student.parameters(), lr=lr), config, generator=gen)
    x_l, y_l = data.x[data.labeled], data.y[data.labeled]
    for i in range(steps):
        x_weak = data.x[torch.randint(0, len(data.x), (batch,), generator=gen)]
        x_strong = x_weak
        if uda_noise:
            x_strong = x_weak + uda_noise * torch.randn(x_weak.shape, generator=gen)
        step(MPLBatch(x_l, y_l, x_weak, x_strong), i)
    return teacher, student


def run(seed: int, steps: int = 3000, lr: float = 0.1, batch: int = 64,
        config: MPLConfig = None, uda_noise: float = 0.0, progress=print):
    """Train the methods on one seed; returns (metrics dict, data, {title: model} for plotting).

    Besides the accuracies, metrics["objective_check"] holds the quantity MPL's feedback
    minimises (the student's CE on the labeled points) for a student trained on the true labels
    and for one trained on the supervised teacher's labels: MPL can only move towards the moons
    if the first is lower. With uda_noise > 0 the teacher also gets UDA consistency on noisy
    copies of the points (uda_weight 1 unless the config sets one), and a UDA-only teacher (the
    same without the MPL term) is trained to isolate what the feedback adds.
    """
    config = config or preset("paper")
    if uda_noise and not config.uda_weight:
        config = config.replace(uda_weight=1.0)
    data = two_moons(seed)

    def seeded():
        # Every method starts from the same initial weights and batch order, so the UDA-only and
        # MPL + UDA teachers differ only by the MPL term.
        torch.manual_seed(seed)
        return torch.Generator().manual_seed(seed)

    t0 = time.time()
    progress(f"seed {seed}: supervised ({steps} steps)")
    seeded()
    supervised = _supervised(data, steps, lr)
    with torch.no_grad():
        supervised_labels = supervised(data.x).argmax(1)
    progress(f"seed {seed}: pseudo labels")
    pseudo = _student_on_labels(data, supervised_labels, steps, lr, batch, seeded())
    progress(f"seed {seed}: objective check (a student on the true labels)")
    on_truth = _student_on_labels(data, data.y, steps, lr, batch, seeded())
    models = {"Supervised": supervised, "Pseudo Labels": pseudo}
    metrics = {
        "seed": seed, "steps": steps, "lr": lr, "unlabeled_batch": batch,
        "estimator": config.estimator, "pseudo_labels": config.pseudo_labels,
        "mpl_weight": config.mpl_weight, "uda_noise": uda_noise, "uda_weight": config.uda_weight,
        "supervised_acc": accuracy(supervised, data.x, data.y),
        "pseudo_label_acc": accuracy(pseudo, data.x, data.y),
    }
    if uda_noise:
        progress(f"seed {seed}: UDA teacher (noise {uda_noise}, no MPL term)")
        uda_teacher, _ = _mpl(data, config.replace(mpl_weight=0.0), steps, lr, batch,
                              seeded(), uda_noise)
        metrics["uda_teacher_acc"] = accuracy(uda_teacher, data.x, data.y)
        models["UDA teacher"] = uda_teacher
    progress(f"seed {seed}: MPL ({config.estimator}, {config.pseudo_labels} labels)")
    _, mpl_student = _mpl(data, config, steps, lr, batch, seeded(), uda_noise)
    metrics["mpl_acc"] = accuracy(mpl_student, data.x, data.y)
    models["MPL + UDA" if uda_noise else "MPL"] = mpl_student
    metrics["objective_check"] = {
        "labeled_ce_student_on_true_labels": labeled_ce(on_truth, data),
        "labeled_ce_student_on_supervised_labels": labeled_ce(pseudo, data),
        "labeled_ce_mpl_student": labeled_ce(mpl_student, data),
        "acc_student_on_true_labels": accuracy(on_truth, data.x, data.y),
    }
    metrics["seconds"] = round(time.time() - t0, 2)
    return metrics, data, models


_ACC_KEYS = {"Supervised": "supervised_acc", "Pseudo Labels": "pseudo_label_acc",
             "UDA teacher": "uda_teacher_acc", "MPL": "mpl_acc", "MPL + UDA": "mpl_acc"}


def method_keys(models):
    """(title, metrics key) of each trained method, in plotting order."""
    return [(name, _ACC_KEYS[name]) for name in models]


def summarize(runs):
    """Mean and min of each accuracy (and the objective check) over several seeds' metrics."""
    def stats(values):
        return {"mean": sum(values) / len(values), "min": min(values), "per_seed": values}

    acc_keys = [k for k in runs[0] if k.endswith("_acc")]
    return {
        "seeds": [r["seed"] for r in runs],
        "settings": {k: runs[0][k] for k in ("steps", "lr", "unlabeled_batch", "estimator",
                                              "pseudo_labels", "mpl_weight", "uda_noise",
                                              "uda_weight")},
        "accuracy": {k: stats([r[k] for r in runs]) for k in acc_keys},
        "objective_check": {k: stats([r["objective_check"][k] for r in runs])
                            for k in runs[0]["objective_check"]},
    }


def plot(path: Path, data, models, metrics):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lo, hi = data.x.min(0).values - 0.5, data.x.max(0).values + 0.5
    gx, gy = torch.meshgrid(torch.linspace(lo[0], hi[0], 200), torch.linspace(lo[1], hi[1], 200),
                            indexing="xy")
    grid = torch.stack([gx.flatten(), gy.flatten()], 1)
    fig, axes = plt.subplots(1, len(models), figsize=(4.3 * len(models), 4.2))
    for ax, (name, model) in zip(axes, models.items()):
        with torch.no_grad():
            z = torch.softmax(model(grid), 1)[:, 1].reshape(gx.shape)
        ax.contourf(gx, gy, z, levels=20, cmap="RdBu_r", alpha=0.6)  # red = class 1, as the points
        ax.contour(gx, gy, z, levels=[0.5], colors="k")
        ax.scatter(data.x[:, 0], data.x[:, 1], c=data.y, s=3, cmap="coolwarm", alpha=0.5)
        lab = data.labeled
        ax.scatter(data.x[lab, 0], data.x[lab, 1], c=data.y[lab], s=120, marker="*",
                   cmap="coolwarm", edgecolors="k")
        ax.set_title(f"{name}: {100 * metrics[_ACC_KEYS[name]]:.1f}%")
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    save_figure(fig, path)


def write_json(path: Path, obj):
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)
