"""The op boundary of mpl-fast: fused ops importable by any trainer.

Each op is also reachable as torch.ops.mpl_fast.<name>. Backend choice: MPL_FAST_BACKEND
(see mpl_fast.ops.backend).
"""
from mpl_fast.ops.multi_tensor import multi_tensor_axpby, multi_tensor_dot

__all__ = ["multi_tensor_dot", "multi_tensor_axpby"]
