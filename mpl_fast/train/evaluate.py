"""Top-1 / top-5 accuracy of a model over evaluation batches."""
import torch


@torch.no_grad()
def accuracy(model, batches, channels_last=False, autocast_dtype=None):
    """batches: an iterable of (images, labels) already on the model's device."""
    was_training = model.training
    model.eval()
    top1 = top5 = n = 0
    for xb, yb in batches:
        if channels_last:
            xb = xb.contiguous(memory_format=torch.channels_last)
        with torch.autocast(xb.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            logits = model(xb).float()
        k = min(5, logits.shape[1])
        pred = logits.topk(k, dim=1).indices
        top1 += int((pred[:, 0] == yb).sum())
        top5 += int((pred == yb[:, None]).any(dim=1).sum())
        n += len(yb)
    model.train(was_training)
    return {"top1": top1 / max(n, 1), "top5": top5 / max(n, 1)}
