"""Triton kernel of scale_rows_: grad[i, :] *= scale[i] (or a single scale) in place, in fp32.

Rows whose scale is exactly 1 are masked out of every load and store, so they cost no memory
traffic: the backward of a loss op whose gradient was computed in the forward pass is free
when its grad_output is 1 (a loss backpropagated on its own), with no host synchronisation.
A fixed number of programs (a few per SM) loops over the tiles of rows, so a single scale of 1
costs a few hundred programs that read it and stop, not one program per tile (15360 of them
for 15360 rows of 1000 classes).
"""
import triton
import triton.language as tl

from mpl_fast.kernels.softmax_common import (FP_FUSION, aligned, interpreter_quiet,
                                             persistent_programs, row_alignment, tile_for)

PROGRAMS_PER_SM = 4


@triton.jit
def _scale_rows_kernel(grad_ptr, grad_stride, scale_ptr, scale_stride, N, C, TILES,
                       ROWS: tl.constexpr, BLOCK: tl.constexpr, PER_ROW: tl.constexpr,
                       ALIGN: tl.constexpr):
    C = aligned(C, ALIGN)
    grad_stride = aligned(grad_stride, ALIGN)
    cols = tl.arange(0, BLOCK)[None, :]
    if PER_ROW:
        work = True
        s_all = 1.0
    else:  # one scale for every row: read once; a scale of 1 leaves nothing to do
        s_all = tl.load(scale_ptr).to(tl.float32)
        work = s_all != 1.0
    if work:
        for tile in range(tl.program_id(0), TILES, tl.num_programs(0)):
            # int64 rows: row * stride may pass 2**31 (tile * ROWS < N + ROWS does not)
            rows = tl.arange(0, ROWS).to(tl.int64) + tile * ROWS
            row_ok = rows < N
            if PER_ROW:
                s = tl.load(scale_ptr + rows * scale_stride, mask=row_ok,
                            other=1.0).to(tl.float32)
            else:
                s = tl.full([ROWS], s_all, tl.float32)
            todo = row_ok & (s != 1.0)
            g_rows = grad_ptr + rows[:, None] * grad_stride
            for start in range(0, C, BLOCK):
                c = start + cols
                ok = todo[:, None] & (c < C)
                g = tl.load(g_rows + c, mask=ok, other=0.0).to(tl.float32)
                tl.store(g_rows + c, (g * s[:, None]).to(grad_ptr.dtype.element_ty), mask=ok)


def scale_rows_forward(grad, scale, max_programs=None):
    """grad (N x C, rows contiguous) *= scale (0-dim, or N with any stride), in place.
    max_programs: the grid's size at most (default: PROGRAMS_PER_SM per SM, see
    softmax_common.persistent_programs)."""
    n, c = grad.shape
    if n == 0 or c == 0:
        return
    tile = tile_for(c)
    tiles = triton.cdiv(n, tile.rows)
    if max_programs is None:
        max_programs = persistent_programs(grad.device, PROGRAMS_PER_SM)
    with interpreter_quiet():
        _scale_rows_kernel[(min(tiles, max_programs),)](
            grad, grad.stride(0), scale, scale.stride(0) if scale.dim() else 0, n, c, tiles,
            ROWS=tile.rows, BLOCK=tile.block, PER_ROW=scale.dim() > 0,
            ALIGN=row_alignment(c, grad.stride(0)), num_warps=tile.num_warps,
            enable_fp_fusion=FP_FUSION)
