"""Learning-rate multipliers (for torch.optim.lr_scheduler.LambdaLR)."""
import math


def warmup_cosine(warmup: int, total: int):
    """Linear warm-up to 1 over `warmup` steps, then cosine decay to 0 at `total`."""
    def factor(step):
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return factor


def wait_warmup_cosine(wait: int, warmup: int, total: int):
    """0 for the first `wait` steps (the student waits for the teacher), then warmup_cosine over
    the remaining steps."""
    inner = warmup_cosine(warmup, max(1, total - wait))

    def factor(step):
        return 0.0 if step < wait else inner(step - wait)
    return factor
