"""Float64 ground truth for the fused loss ops, written independently of mpl_fast.ops."""
import torch


def soft_ce_rows(logits, target, label_smoothing=0.0, mask=None):
    """Per-row loss in float64 via log_softmax; logits must be float64 (requires_grad ok)."""
    n, c = logits.shape
    logp = torch.log_softmax(logits, dim=1)
    if target.dim() == 1:
        t = torch.nn.functional.one_hot(target, c).double()
    else:
        t = target.double()
    t = (1 - label_smoothing) * t + label_smoothing / c
    terms = torch.where(t != 0, t * logp, torch.zeros_like(logp))
    loss = -terms.sum(1)
    if mask is not None:
        loss = torch.where(mask.double() != 0, loss * mask.double(), torch.zeros_like(loss))
    return loss


def reduce(rows, reduction):
    if reduction == "none":
        return rows
    return rows.sum() / max(rows.shape[0], 1) if reduction == "mean" else rows.sum()


def uda_rows(weak, strong, temperature, threshold):
    q = torch.softmax(weak.double() / temperature, dim=1)
    mask = (q.max(1).values >= threshold).double()
    return soft_ce_rows(strong, q, 0.0, mask), mask
