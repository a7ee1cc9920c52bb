"""The op boundary of mpl-fast: fused ops importable by any trainer.

Each op is also reachable as torch.ops.mpl_fast.<name> and works under torch.compile.
Backend choice at call time: MPL_FAST_BACKEND=triton|cuda|torch (see mpl_fast.ops.backend).
"""
from mpl_fast.ops.multi_tensor import multi_tensor_axpby, multi_tensor_dot
from mpl_fast.ops.pseudo_labels import PseudoLabels, pseudo_labels
from mpl_fast.ops.soft_cross_entropy import soft_cross_entropy
from mpl_fast.ops.uda_loss import uda_loss

__all__ = ["multi_tensor_dot", "multi_tensor_axpby", "pseudo_labels", "PseudoLabels",
           "soft_cross_entropy", "uda_loss"]
