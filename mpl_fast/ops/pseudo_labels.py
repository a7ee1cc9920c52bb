"""pseudo_labels: softmax(logits / T), its row max, the confidence mask and labels (argmax,
or a categorical draw) in one op, without gradient."""
from typing import NamedTuple, Optional

import torch

from mpl_fast.ops import _checks, backend
from mpl_fast.ops._checks import compute_dtype as _compute_dtype

MODES = ("argmax", "sample")


class PseudoLabels(NamedTuple):
    probs: torch.Tensor  # N x C float32, softmax(logits / temperature)
    max_prob: torch.Tensor  # N float32
    mask: torch.Tensor  # N float32: max_prob >= threshold
    labels: torch.Tensor  # N int64


def pseudo_labels_torch(logits, temperature, threshold):
    probs = torch.softmax(logits.to(_compute_dtype(logits)) / temperature, dim=1)
    max_prob, labels = probs.max(dim=1)
    return probs, max_prob, (max_prob >= threshold).to(probs.dtype), labels


def _pseudo_labels_impl(logits, temperature, threshold):
    if backend.loss_backend(logits) == "triton":
        from mpl_fast.kernels.pseudo_labels import pseudo_labels_forward

        return pseudo_labels_forward(logits, temperature, threshold)
    return pseudo_labels_torch(logits, temperature, threshold)


@torch.library.custom_op("mpl_fast::pseudo_labels", mutates_args=())
def _pseudo_labels_op(logits: torch.Tensor, temperature: float, threshold: float
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _pseudo_labels_impl(logits, temperature, threshold)


@_pseudo_labels_op.register_fake
def _(logits, temperature, threshold):
    n, c = logits.shape
    f32 = dict(dtype=_compute_dtype(logits), device=logits.device)
    return (logits.new_empty(n, c, **f32), logits.new_empty(n, **f32),
            logits.new_empty(n, **f32), logits.new_empty(n, dtype=torch.int64))


def pseudo_labels(logits: torch.Tensor, temperature: float = 1.0, threshold: float = 0.0,
                  mode: str = "argmax", generator: Optional[torch.Generator] = None
                  ) -> PseudoLabels:
    """Pseudo labels from teacher logits, in one read of the logits and without gradient.

    Args:
        logits: N x C (N >= 0, C >= 2), float32, bfloat16 or float16 (float64 on the CPU),
            rows contiguous or strided.
        temperature: finite, > 0; probs = softmax(logits / temperature).
        threshold: mask = (max_prob >= threshold).
        mode: "argmax" (labels = argmax of probs) or "sample" (a categorical draw from probs,
            as an exponential race: argmax(probs / E), E ~ Exp(1), which needs no host
            synchronisation).
        generator: the torch.Generator "sample" draws from (default: torch's).

    Returns:
        PseudoLabels(probs, max_prob, mask, labels): probs N x C, max_prob N, mask N (float,
        1 or 0), all float32 (float64 for float64 CPU logits); labels N int64.

    Raises:
        ValueError naming the argument: logits not 2-D, not floating point or of fewer than 2
        classes, a temperature not finite and > 0, a NaN threshold, an unknown mode.
    """
    _checks.logits_2d("logits", logits)
    _checks.positive("temperature", temperature)
    _checks.a_number("threshold", threshold)
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    # no gradient, so in plain eager mode the body runs directly (see backend.plain_eager)
    op = _pseudo_labels_impl if backend.plain_eager(logits) else _pseudo_labels_op
    probs, max_prob, mask, labels = op(logits.detach(), float(temperature), float(threshold))
    if mode == "sample":
        race = torch.empty_like(probs).exponential_(generator=generator)
        labels = (probs / race).argmax(dim=1)
    return PseudoLabels(probs, max_prob, mask, labels)
