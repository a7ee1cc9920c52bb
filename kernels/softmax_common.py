"""Triton helpers shared by the loss kernels: the online (streaming) softmax update over a tile
of ROWS rows x BLOCK columns, and the choice of that tile."""
import contextlib
from typing import NamedTuple

import triton
import triton.language as tl

# Elements one program holds per loop iteration. Rows of fewer classes are packed several to a
# program so that, e.g., 15360 x 10 logits are 240 programs of 64 rows, not 15360 of one.
# (Module settings, read at each launch: `mpl-fast bench ops --tiles` sweeps them on a GPU.)
TILE_ELEMENTS = 1024
MAX_BLOCK = 4096
MAX_WARPS = 8


@triton.jit
def online_softmax_update(m, s, x):
    """Fold a chunk x [ROWS, BLOCK] into the running max m and sum s of exp(x - m) [ROWS].

    -inf entries (and rows that are -inf so far) are handled without producing NaN.
    """
    m_new = tl.maximum(m, tl.max(x, 1))
    m_safe = tl.where(m_new == -float("inf"), 0.0, m_new)
    s = s * tl.exp(m - m_safe) + tl.sum(tl.exp(x - m_safe[:, None]), 1)
    return m_new, s


@triton.jit
def softmax_stats(x):
    """The max m and the sum of exp(x - m) of each row of a whole-row tile x [ROWS, BLOCK]."""
    m = tl.max(x, 1)
    return m, tl.sum(tl.exp(x - safe_max(m)[:, None]), 1)


@triton.jit
def tile_rows(N, ROWS: tl.constexpr):
    """This program's rows (int64, so that row * stride cannot overflow) and which exist."""
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    return rows, rows < N


@triton.jit
def safe_max(m):
    """The running max with an all -inf row mapped to 0, so that exp(x - m) stays finite."""
    return tl.where(m == -float("inf"), 0.0, m)


@contextlib.contextmanager
def tile_settings(elements: int, max_block: int, max_warps: int):
    """Launch with another tile inside the block (a benchmark sweep, a register report); the
    shipped settings come back after it."""
    global TILE_ELEMENTS, MAX_BLOCK, MAX_WARPS
    shipped = TILE_ELEMENTS, MAX_BLOCK, MAX_WARPS
    TILE_ELEMENTS, MAX_BLOCK, MAX_WARPS = elements, max_block, max_warps
    try:
        yield
    finally:
        TILE_ELEMENTS, MAX_BLOCK, MAX_WARPS = shipped


class Tile(NamedTuple):
    rows: int       # rows per program
    block: int      # columns per loop iteration: the whole row when it fits
    num_warps: int


def tile_for(num_classes: int) -> Tile:
    """The tile of a row-wise kernel over num_classes columns (depends on C only, so the number
    of compiled variants stays small whatever the batch size)."""
    block = min(triton.next_power_of_2(max(num_classes, 2)), MAX_BLOCK)
    rows = max(1, TILE_ELEMENTS // block)
    elements = rows * block
    return Tile(rows, block, min(MAX_WARPS, max(1, elements // 256)))  # 8 elements a thread
