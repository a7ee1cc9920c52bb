"""`mpl-fast logits`: a trained network's logits over a data set's training and test splits,
stored once for Reduced MPL (model.teacher=reduced reads them; mpl_fast.data.logit_store).

The network comes from a checkpoint `mpl-fast train` wrote (its run's data), or is named with
its weights (a state-dict file, or timm's pretrained weights) and run over the data of a config.
Each image is seen as evaluation sees it (no augmentation), in the data's index order, so a
store's row i belongs to image i of the split: the rows the data sources name in each batch.
"""
import shutil
from pathlib import Path

import torch

from mpl_fast.data.logit_store import (SPLITS, LogitStore, store_path, write_folder,
                                       write_logits)
from mpl_fast.data.sources import eval_share
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


def _write_shared(out, dist, rows, shares, batch_size, logits, metas):
    """write_folder under torchrun: each process stores its shares of the splits under
    OUT/.shards (the run folder must be on a filesystem every node shares, as for checkpoints),
    then rank 0 writes the stores from them in index order (all of them or none, as in one
    process) and removes the shards; the others wait until the stores are in place."""
    shards = out / ".shards"

    def shard_path(split, rank):
        return shards / f"{split}.rank{rank}.logits"
    if dist.main:
        shutil.rmtree(shards, ignore_errors=True)
        shards.mkdir()
    dist.barrier()
    try:
        for split in SPLITS:
            if shares[split]:
                write_logits(shard_path(split, dist.rank), len(shares[split]), logits(split))
            else:  # more processes than batches: nothing here (the counts stay zero)
                for _ in logits(split):
                    pass
        dist.barrier()
        if dist.main:
            def in_order(split):  # batch i of the split is batch i // world of rank i % world
                parts = [LogitStore(shard_path(split, r))
                         if eval_share(rows[split], batch_size, r, dist.world) else None
                         for r in range(dist.world)]
                for i in range(-(-rows[split] // batch_size)):
                    j = i // dist.world * batch_size
                    yield parts[i % dist.world][j:j + batch_size]
            write_folder(out, {split: (rows[split], in_order(split)) for split in SPLITS}, metas)
    finally:
        if dist.main:
            shutil.rmtree(shards, ignore_errors=True)
    dist.barrier()


def check_store_folder(out: Path, overwrite: bool):
    """Stop before any work where --out already holds stores (unless overwrite) or is a file."""
    existing = [store_path(out, split) for split in SPLITS if store_path(out, split).exists()]
    if existing and not overwrite:
        raise TrainError(f"{out} already holds teacher logits ({existing[0].name}): --overwrite "
                         "replaces them")
    if out.exists() and not out.is_dir():
        raise TrainError(f"--out {out} is a file, not a folder")


def write(out, source, batch_size=None, overwrite=False, progress=False):
    """Write OUT/train.logits and OUT/test.logits (each with its .json), both or neither, from
    `source()`, a call of from_checkpoint or from_model made once OUT is known to be free.
    Returns (network name, {split: {"rows", "top1"}}): the network's top-1 on each split,
    measured on the way. progress: lines on stderr (mpl_fast.progress)."""
    out = Path(out)
    check_store_folder(out, overwrite)
    run, name, model, meta = source()
    dist = run.dist
    batch_size = batch_size or run.config["train"]["eval_batch_size"]
    rows = {split: len(run.data.labels(split)) for split in SPLITS}
    # under torchrun each process runs the network on its share of each split (eval_share: every
    # world-th batch) and writes it aside; rank 0 then puts the shares together in index order
    shares = {split: (eval_share(rows[split], batch_size, dist.rank, dist.world)
                      if dist.enabled else None) for split in SPLITS}
    counts = {}  # split -> [hits, rows] of this process

    @torch.no_grad()
    def logits(split):
        total, share = rows[split], shares[split]
        mine, hits, done = total if share is None else len(share), 0, 0
        lines = ProgressLines(f"logits: {split}") if progress and dist.main else None
        model.eval()
        for x, y in run.data.ordered_batches(split, batch_size, run.device, share):
            if run.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(x.device.type, dtype=run.amp, enabled=run.amp is not None):
                z = model(x).float()
            hits += int((z.argmax(1) == y).sum())
            done += len(y)
            if lines is not None:  # rank 0's share scaled to the split
                lines(done * total // max(mine, 1), total)
            yield z
        counts[split] = [hits, done]

    metas = ({split: {**meta, "data": run.config["data"], "fingerprint": run.data.fingerprint(
        split)} for split in SPLITS} if dist.main else None)
    made = dist.main and not out.exists()
    try:
        if dist.main:
            out.mkdir(parents=True, exist_ok=True)
        if dist.enabled:
            _write_shared(out, dist, rows, shares, batch_size, logits, metas)
        else:
            write_folder(out, {split: (rows[split], logits(split)) for split in SPLITS}, metas)
    except OSError as err:
        raise TrainError(f"cannot write teacher logits to {out}: {err.strerror or err}") from err
    except ValueError as err:  # a split that yielded other than its images' count
        raise TrainError(f"teacher logits: {err}") from err
    finally:
        if made and out.is_dir() and not any(out.iterdir()):  # failed: no empty folder left
            out.rmdir()
    local = torch.tensor([counts.get(split, [0, 0]) for split in SPLITS], dtype=torch.int64)
    if dist.enabled:
        local = dist.sum(local.to(run.device)).cpu()
    report = {split: {"rows": int(done), "top1": int(hits) / max(int(done), 1)}
              for split, (hits, done) in zip(SPLITS, local.tolist())}
    return name, report
