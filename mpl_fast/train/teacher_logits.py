"""`mpl-fast logits`: a trained network's logits over a data set's training and test splits,
stored once for Reduced MPL (model.teacher=reduced reads them; mpl_fast.data.logit_store).

The network comes from a checkpoint `mpl-fast train` wrote (its run's data), or is named with
its weights (a state-dict file, or timm's pretrained weights) and run over the data of a config.
Each image is seen as evaluation sees it (no augmentation), in the data's index order, so a
store's row i belongs to image i of the split: the rows the data sources name in each batch.
"""
from pathlib import Path

import torch

from mpl_fast.data.logit_store import SPLITS, store_path, write_folder
from mpl_fast.models.registry import NAMES
from mpl_fast.train import config as cfg_mod
from mpl_fast.train.loop import Run, TrainError, run_from_checkpoint
from mpl_fast.progress import ProgressLines

NETWORKS = ("ema_student", "student", "teacher")


def from_checkpoint(checkpoint, network=None, overrides=()):
    """(run, network name, module, meta) of a checkpoint: by default its EMA student, or the
    finetuned student of a finetuned.pt."""
    run, state, path = run_from_checkpoint(checkpoint, overrides)
    finetuned = "ema" not in state
    if network is None:
        network = "student" if finetuned else "ema_student"
    if finetuned and network != "student":
        raise TrainError(f"{path} holds a finetuned student alone: --network student")
    if network == "teacher" and (run.teacher is None or run.teacher_test_logits is not None):
        raise TrainError(f"{path} has no image teacher (method {run.config['method']}, teacher "
                         f"{run.config['model']['teacher']}): --network ema_student or student")
    module = {"ema_student": run.ema.module if not finetuned else None,
              "student": run.student, "teacher": run.teacher}[network]
    return run, network, module, {"checkpoint": str(path), "step": state.get("step"),
                                  "network": network}


def _state_dict(path):
    """A network's weights from a file torch.save wrote: a state dict, or one inside a training
    script's checkpoint ("state_dict", "model"), DDP's "module." prefixes removed."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as err:
        raise TrainError(f"--weights {path}: no such file") from err
    except Exception as err:  # torch raises many types for a file it cannot read
        raise TrainError(f"--weights {path}: not a state dict torch.load reads with "
                         f"weights_only ({type(err).__name__}; a checkpoint of mpl-fast "
                         "train: --checkpoint)") from err
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise TrainError(f"--weights {path}: not a state dict (names to tensors)")
    return {k[7:] if k.startswith("module.") else k: v for k, v in state.items()}


def _pretrained_state_dict(name, data):
    """timm's pretrained weights for `name`, refused where they do not fit the data: another
    number of classes, or inputs normalised otherwise than the data pipelines normalise."""
    from mpl_fast.data.dali_pipelines import MEAN, STD
    from mpl_fast.models.registry import _timm_or_none

    timm = _timm_or_none()
    if timm is None:
        raise TrainError("--pretrained needs timm: pip install 'mpl-fast[timm]'")
    base = name[5:] if name.startswith("timm:") else name
    if not timm.is_model(base):
        raise TrainError(f"--pretrained: {base!r} is not a timm model")
    try:
        net = timm.create_model(base, pretrained=True)
    except Exception as err:  # download, missing weights: timm raises several types
        raise TrainError(f"--pretrained {base}: {type(err).__name__}: "
                         f"{str(err).splitlines()[0] if str(err) else ''}") from err
    if net.num_classes != data.num_classes:
        raise TrainError(f"--pretrained {base} predicts {net.num_classes} classes, the data has "
                         f"{data.num_classes}")
    pcfg = getattr(net, "pretrained_cfg", None) or {}
    for key, ours in (("mean", MEAN), ("std", STD)):
        theirs = pcfg.get(key)
        if theirs is not None and any(abs(a * 255 - b) > 0.5 for a, b in zip(theirs, ours)):
            raise TrainError(f"--pretrained {base} expects inputs normalised with {key} "
                             f"{tuple(theirs)}; the data pipelines use ImageNet's")
    return net.state_dict()


def from_model(name, config="digits", overrides=(), weights=None, pretrained=False):
    """(run, network name, module, meta): the network `name` (a model name of the registry)
    with the weights of a state-dict file or timm's pretrained ones, over the data of a config
    (a preset or YAML file, and KEY=VALUE overrides)."""
    if (weights is None) == (not pretrained):
        raise TrainError("--model needs its weights: --weights FILE or --pretrained")
    bare = not name.startswith("timm:")
    if pretrained and bare and name in NAMES:
        raise TrainError(f"--pretrained takes timm models; {name} is mpl-fast's own network "
                         "(timm's, e.g.: timm:resnet50)")
    # the named network as a supervised run's student: the run's device, bf16 and channels_last
    # choices, with nothing built that the logits do not need
    model_name = f"timm:{name}" if pretrained and bare else name
    conf = cfg_mod.load(config, [*overrides, "method=supervised", f"model.student={model_name}",
                                 "model.checkpoint=none", "model.checkpoint_blocks=null",
                                 "model.compile=none", "model.teacher_logits=null",
                                 "train.cuda_graph=false"])
    if conf["data"]["name"] == "digits" and pretrained:
        raise TrainError("--pretrained: the embedded digits (8x8, one channel) fit no "
                         "pretrained network; give data.name and data.root")
    run = Run(conf, Path("."))
    state = _pretrained_state_dict(name, run.data) if pretrained else _state_dict(weights)
    try:
        run.student.load_state_dict(state)
    except RuntimeError as err:  # its first line names the module, the next what is wrong
        lines = [line.strip() for line in str(err).splitlines()]
        why = (lines[1] if len(lines) > 1 else lines[0])[:200]
        raise TrainError(f"the weights do not fit model {model_name} with "
                         f"{run.data.num_classes} classes: {why}") from err
    return run, model_name, run.student, {"model": model_name,
                                          "weights": "pretrained" if pretrained else str(weights)}


def write(out, source, batch_size=None, overwrite=False, progress=False):
    """Write OUT/train.logits and OUT/test.logits (each with its .json), both or neither, from
    `source()`, a call of from_checkpoint or from_model made once OUT is known to be free.
    Returns (network name, {split: {"rows", "top1"}}): the network's top-1 on each split,
    measured on the way. progress: lines on stderr (mpl_fast.progress)."""
    out = Path(out)
    existing = [store_path(out, split) for split in SPLITS if store_path(out, split).exists()]
    if existing and not overwrite:
        raise TrainError(f"{out} already holds teacher logits ({existing[0].name}): --overwrite "
                         "replaces them")
    if out.exists() and not out.is_dir():
        raise TrainError(f"--out {out} is a file, not a folder")
    run, name, model, meta = source()
    batch_size = batch_size or run.config["train"]["eval_batch_size"]
    report = {}

    rows = {split: len(run.data.labels(split)) for split in SPLITS}

    @torch.no_grad()
    def logits(split):
        total, hits, done = rows[split], 0, 0
        lines = ProgressLines(f"logits: {split}") if progress else None
        model.eval()
        for x, y in run.data.ordered_batches(split, batch_size, run.device):
            if run.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(x.device.type, dtype=run.amp, enabled=run.amp is not None):
                z = model(x).float()
            hits += int((z.argmax(1) == y).sum())
            done += len(y)
            if lines is not None:
                lines(done, total)
            yield z
        report[split] = {"rows": done, "top1": hits / max(done, 1)}

    meta = {**meta, "data": run.config["data"]}
    made = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
        write_folder(out, {split: (rows[split], logits(split)) for split in SPLITS},
                     {split: {**meta, "fingerprint": run.data.fingerprint(split)}
                      for split in SPLITS})
    except OSError as err:
        raise TrainError(f"cannot write teacher logits to {out}: {err.strerror or err}") from err
    except ValueError as err:  # a split that yielded other than its images' count
        raise TrainError(f"teacher logits: {err}") from err
    finally:
        if made and out.is_dir() and not any(out.iterdir()):  # failed: no empty folder left
            out.rmdir()
    return name, report
