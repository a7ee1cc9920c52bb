"""Argument checks of the fused loss ops: a ValueError naming the argument.

Value checks that would need the data (class index range) run only on plain CPU tensors
outside torch.compile, so that nothing here synchronises with a GPU or breaks a graph.
"""
import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def logits_2d(name, t):
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a tensor, got {type(t).__name__}")
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D (N x C), got shape {list(t.shape)}")
    if t.dtype not in FLOAT_DTYPES and not (t.dtype == torch.float64 and t.device.type == "cpu"):
        raise ValueError(f"{name} must be float32, float16 or bfloat16 (float64 on CPU), "
                         f"got {t.dtype}")
    if t.shape[1] < 2:
        raise ValueError(f"{name} needs at least 2 classes, got C={t.shape[1]}")


def positive(name, v):
    # `not v > 0` also refuses NaN; an infinite temperature makes -inf logits NaN
    if not 0 < v < float("inf"):
        raise ValueError(f"{name} must be finite and > 0, got {v}")


def a_number(name, v):
    # a NaN threshold would silently mask every row
    if v != v:
        raise ValueError(f"{name} must be a number, got {v}")


def in_unit_interval(name, v):
    if not 0.0 <= v <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {v}")


def reduction(v):
    if v not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {v!r}")


def row_vector(name, t, n, device):
    if not isinstance(t, torch.Tensor) or t.dim() != 1 or t.shape[0] != n:
        shape = list(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"{name} must be a 1-D tensor of length N={n}, got {shape}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but logits are on {device}")


def class_indices(name, t, n, c, device):
    row_vector(name, t, n, device)
    if t.dtype != torch.int64:
        raise ValueError(f"{name} must be int64 class indices, got {t.dtype}")
    if (t.device.type == "cpu" and type(t) is torch.Tensor  # not fake or traced
            and not torch.compiler.is_compiling() and t.numel()):
        lo, hi = int(t.min()), int(t.max())
        if lo < 0 or hi >= c:
            raise ValueError(f"{name} holds class indices outside [0, {c}): min {lo}, max {hi}")


def compute_dtype(t):
    """Results and accumulation: float32, or float64 for float64 inputs (CPU, exact tests)."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32
