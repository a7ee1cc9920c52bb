"""Triton kernel of scale_rows_: grad[i, :] *= scale[i] (or a single scale) in place, in fp32.

Rows whose scale is exactly 1 are masked out of every load and store, so they cost no memory
traffic: the backward of a loss op whose gradient was computed in the forward pass is free
when its grad_output is 1 (a loss backpropagated on its own), with no host synchronisation.
"""
import triton
import triton.language as tl

from mpl_fast.kernels.softmax_common import tile_for, tile_rows


@triton.jit
def _scale_rows_kernel(grad_ptr, grad_stride, scale_ptr, scale_stride, N, C,
                       ROWS: tl.constexpr, BLOCK: tl.constexpr):
    rows, row_ok = tile_rows(N, ROWS)
    s = tl.load(scale_ptr + rows * scale_stride, mask=row_ok, other=1.0).to(tl.float32)
    todo = row_ok & (s != 1.0)
    g_rows = grad_ptr + rows[:, None] * grad_stride
    cols = tl.arange(0, BLOCK)[None, :]
    for start in range(0, C, BLOCK):
        c = start + cols
        ok = todo[:, None] & (c < C)
        g = tl.load(g_rows + c, mask=ok, other=0.0).to(tl.float32)
        tl.store(g_rows + c, (g * s[:, None]).to(grad_ptr.dtype.element_ty), mask=ok)


def scale_rows_forward(grad, scale):
    """grad (N x C, rows contiguous) *= scale (0-dim, or N with any stride), in place."""
    n, c = grad.shape
    if n == 0 or c == 0:
        return
    tile = tile_for(c)
    _scale_rows_kernel[(triton.cdiv(n, tile.rows),)](
        grad, grad.stride(0), scale, scale.stride(0) if scale.dim() else 0, n, c,
        ROWS=tile.rows, BLOCK=tile.block, num_warps=tile.num_warps)
