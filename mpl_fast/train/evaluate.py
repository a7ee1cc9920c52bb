"""Top-1 / top-5 accuracy of models over evaluation batches, on one replica or shared among
data-parallel replicas."""
from typing import Callable, NamedTuple

import torch


class Shard(NamedTuple):
    """An evaluation shared among data-parallel replicas, each given its own batches (the data's
    eval_share): sum_across sums a tensor over the replicas (an all-reduce every replica
    joins)."""
    sum_across: Callable[[torch.Tensor], torch.Tensor]
    device: torch.device


@torch.no_grad()
def accuracies(models, batches, channels_last=False, autocast_dtype=None, progress=None,
               shard=None):
    """{name: {"top1", "top5"}} for a dict of models, in one pass over `batches` (an iterable of
    (images, labels) on the models' device): each batch is decoded once for all the models, and
    the counts stay on the device until the end (one host synchronisation, not two a batch).
    progress(images done) is called after each batch. With a Shard, `batches` are this
    replica's share of the set and the counts are summed across replicas: every replica gets the
    whole set's accuracies (a replica given no batch adds zeros)."""
    was_training = {name: m.training for name, m in models.items()}
    for m in models.values():
        m.eval()
    counts = {name: None for name in models}  # [top1, top5] hits, on the device
    n = 0  # images evaluated here
    try:
        for xb, yb in batches:
            if channels_last:
                xb = xb.contiguous(memory_format=torch.channels_last)
            for name, model in models.items():
                with torch.autocast(xb.device.type, dtype=autocast_dtype,
                                    enabled=autocast_dtype is not None):
                    logits = model(xb).float()
                pred = logits.topk(min(5, logits.shape[1]), dim=1).indices
                hits = torch.stack([(pred[:, 0] == yb).sum(),
                                    (pred == yb[:, None]).any(dim=1).sum()])
                counts[name] = hits if counts[name] is None else counts[name] + hits
            n += len(yb)
            if progress is not None:
                progress(n)
    finally:
        for name, m in models.items():
            m.train(was_training[name])
    if shard is not None:  # one all-reduce of every count; a replica without a batch adds zeros
        local = torch.tensor([n], dtype=torch.int64, device=shard.device)
        parts = [local] + [c.to(shard.device, torch.int64) if c is not None
                           else torch.zeros(2, dtype=torch.int64, device=shard.device)
                           for c in counts.values()]
        total = shard.sum_across(torch.cat(parts))
        n = total[0]
        counts = {name: total[1 + 2 * k:3 + 2 * k] for k, name in enumerate(counts)}
    n = int(n)
    out = {}
    for name, c in counts.items():
        top1, top5 = c.tolist() if c is not None else (0, 0)
        out[name] = {"top1": top1 / max(n, 1), "top5": top5 / max(n, 1)}
    return out
