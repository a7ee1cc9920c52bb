"""Top-1 / top-5 accuracy of a model on a held-out set."""
import torch


@torch.no_grad()
def accuracy(model, x, y, batch_size=512, device="cpu", channels_last=False, autocast_dtype=None):
    was_training = model.training
    model.eval()
    top1 = top5 = 0
    for start in range(0, len(x), batch_size):
        xb = x[start:start + batch_size].to(device)
        if channels_last:
            xb = xb.contiguous(memory_format=torch.channels_last)
        yb = y[start:start + batch_size].to(device)
        with torch.autocast(xb.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            logits = model(xb).float()
        k = min(5, logits.shape[1])
        pred = logits.topk(k, dim=1).indices
        top1 += int((pred[:, 0] == yb).sum())
        top5 += int((pred == yb[:, None]).any(dim=1).sum())
    model.train(was_training)
    n = max(len(x), 1)
    return {"top1": top1 / n, "top5": top5 / n}
