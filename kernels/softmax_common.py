"""Triton helpers shared by the loss kernels: the online (streaming) softmax update over a tile
of ROWS rows x BLOCK columns, and the choice of that tile.

Rows longer than one tile are streamed in chunks. Their running statistics are kept either per
row (online_softmax_update: a max and a sum reduced across the tile at every chunk, two
reductions that wait on each other) or per lane (lane_softmax_update: each column slot of the
tile keeps its own max and sum, one exp an element and no reduction inside the loop; the lanes
are combined once, after it). Which one is faster is for a GPU to say: LANE_STATS picks it
(`mpl-fast bench ops --tiles 256:4096:8:512:lanes` times the per-lane one).

A streamed row's chunks are loaded one at a time unless STREAM_STAGES > 1: then the loops are
software-pipelined (tl.range's num_stages), the next STREAM_STAGES - 1 chunks copied
asynchronously into shared memory (cp.async) while the current one is reduced, so a program
keeps more than one chunk's bytes in flight (`--tiles 256:4096:8:512:s3` times it).

One-tile rows are one tile a program unless ROW_STAGES > 1: then a persistent grid
(PERSISTENT_PROGRAMS_PER_SM programs a SM) loops over the tiles, software-pipelined (tl.range's
num_stages): the next tiles' rows are loaded while the current one is reduced, instead of each
program paying a load's latency before its reductions (`--tiles 256:4096:8:512:r2` times it).
Its grid holds as many programs an SM as fit there at once (registers, shared memory, warps:
resident_programs, read from the compiled kernel after its first launch), at most
PERSISTENT_PROGRAMS_PER_SM: a program that found no room would start only once another had
looped over all its tiles, doubling the time.

A streamed row is read twice when a gradient or probabilities are written: its statistics, then
the values. At 32000 classes the rows that the programs on the GPU hold at once (4-6 programs an
SM, 64-128 KiB a row) pass the L2 cache (50 MiB on the H100/H200) together with the written
rows, so the second read may come from memory again: up to 1.5x the traffic the op must move
for the cross-entropy and pseudo_labels, 5/3 for UDA, which reads two rows twice (pseudo_labels'
timings say its second read mostly hit the cache; the others' do not say). EVICTION_HINTS asks the
cache to keep what is read again (evict_last on the first pass's loads) and to drop first what
is not (evict_first on the second pass's loads and on the stores): `--tiles 256:4096:8:512:e`
times it. The hints change no value (tested), only what the L2 keeps. A wider tile holds fewer
rows at once for the same bytes in flight: `--tiles 256:8192:16:512` (8192-column chunks over 16
warps, 2 programs an SM) and `256:8192:32:256` (1-2) time that.

MAX_REGISTERS caps a kernel's registers a thread (ptxas' maxnreg; 0: the compiler's choice).
Rows of 1000 classes are latency-bound, so the programs an SM holds at once matter: the bf16
cross-entropy with its gradient takes 55 registers, so an SM holds 18 programs of two warps
(36 of its 64 warps), where pseudo_labels at 32 registers fills all 32 slots; capped at 32 the
cross-entropy spills 8 bytes a thread (`--tiles 256:4096:8:512:m32` times it).

A temperature is applied after the max is subtracted, exp((x - m) * inv_t), never as
exp(x * inv_t - m'): the compiler contracts a product and a difference into one FMA, which
subtracts the rounded max from the unrounded product, so the max element's weight was
exp(+-ulp/2) instead of 1 (at logits in the thousands, a "largest probability" of 1.0002 and a
confidence mask off at threshold 1; seen on the H200, never in the interpreter). A difference
scaled afterwards leaves nothing to contract: the max element's weight is exp(0) = 1 exactly.
"""
import contextlib
import functools
import itertools
import math
import os
import re
from typing import NamedTuple

import torch
import triton
import triton.language as tl

# Elements one program holds per loop iteration, at least one row's worth. Rows of fewer classes
# are packed several to a program: 15360 x 10 logits are 960 programs of 16 rows, not 15360 of
# one. A program has a warp per 512 elements (16 a thread), at most MAX_WARPS: 10 classes, 16 rows
# and one warp; 1000 classes, one row and two warps; a streamed row, 4096 columns a step and 8.
# Chosen on the H200 (2026-11-26, benchmarks/results/ops.jsonl): against the earlier tile (1024
# elements, 8 a thread: 64 rows and 4 warps at 10 classes, one row and 4 warps at 1000) 15-17%
# less time at 1000 classes in bf16 (within 5% either way in fp32), 5-10% less at 10 classes
# in bf16 (1-12% in fp32); per-lane statistics were slower at 32000 classes in every op and
# dtype. (Module settings, read at each launch: `mpl-fast bench ops --tiles` sweeps them on a
# GPU.)
TILE_ELEMENTS = 256
MAX_BLOCK = 4096
MAX_WARPS = 8
ELEMENTS_PER_WARP = 512
LANE_STATS = False  # streamed rows: statistics per lane (True) or per row
STREAM_STAGES = 1  # streamed rows: chunks in flight a program (1: no pipelining; not measured)
ROW_STAGES = 1  # one-tile rows: tiles in flight a persistent program (1: a program a tile; not
#                 measured)
MAX_REGISTERS = 0  # registers a thread at most (0: no cap; not measured)
EVICTION_HINTS = False  # streamed rows: L2 eviction hints on the two passes (not measured)
PERSISTENT_PROGRAMS_PER_SM = 16  # 16 programs of 1-2 warps: a quarter to half of an SM's warps
PERSISTENT_PROGRAMS_OFF_CUDA = 64  # a persistent grid in the interpreter


@triton.jit
def running_max(m, chunk_m, inv_t):
    """A running row max m [ROWS] met by a chunk's max: (the new max, it with -inf mapped to 0
    so that exp(x - it) stays finite, the factor exp((m - that) * inv_t) rescaling sums kept
    against m)."""
    m_new = tl.maximum(m, chunk_m)
    m_safe = safe_max(m_new)
    return m_new, m_safe, tl.exp((m - m_safe) * inv_t)


@triton.jit
def online_softmax_update(m, s, x, chunk_m, inv_t):
    """Fold a chunk x [ROWS, BLOCK], whose row max is chunk_m (reduced by the caller, maybe
    jointly with something else), into the running max m and sum s of exp((x - m) * inv_t)
    [ROWS] (inv_t: the inverse temperature, 1.0 for none).

    -inf entries (and rows that are -inf so far) are handled without producing NaN.
    """
    m_new, m_safe, scale = running_max(m, chunk_m, inv_t)
    return m_new, s * scale + tl.sum(tl.exp((x - m_safe[:, None]) * inv_t), 1)


@triton.jit
def lane_weight(m, x, inv_t):
    """For a chunk x against per-lane running maxima m ([ROWS, BLOCK] both): (the new maxima,
    e, up), one exp an element: e = exp(-|x - m| * inv_t) is the new element's weight when it is
    not above its lane's max (up False), else the factor that rescales the lane's sums (up
    True); 0 where both are -inf (nothing to add)."""
    m_new = tl.maximum(m, x)
    e = tl.where(m_new == -float("inf"), 0.0, tl.exp(-tl.abs(x - m) * inv_t))
    return m_new, e, x > m


@triton.jit
def lane_softmax_update(m, s, x, inv_t):
    """Fold a chunk x [ROWS, BLOCK] into per-lane running maxima m and sums s of
    exp((x - m) * inv_t) [ROWS, BLOCK] (see lane_weight). -inf entries add nothing."""
    m_new, e, up = lane_weight(m, x, inv_t)
    return m_new, tl.where(up, s * e + 1.0, s + e)


@triton.jit
def lane_softmax_combine(m, s, inv_t):
    """The row max and sum of exp((x - max) * inv_t) [ROWS] from per-lane ones [ROWS, BLOCK]."""
    row_m = tl.max(m, 1)
    return row_m, tl.sum(s * tl.exp((m - safe_max(row_m)[:, None]) * inv_t), 1)


# Combine functions of joint reductions: tl.reduce over a tuple of tensors reduces them all in
# one pass across the warps, with one round of barriers, where a tl.max or tl.sum each has its own
# (a row of 1000 classes over 4 warps: each round is a shared-memory trip and two barriers, and
# the kernels there are bound by such latencies, not by bandwidth).
@triton.jit
def max_max(a0, b0, a1, b1):
    return tl.maximum(a0, a1), tl.maximum(b0, b1)


@triton.jit
def max_sum(a0, b0, a1, b1):
    return tl.maximum(a0, a1), b0 + b1


@triton.jit
def max_sum_sum(a0, b0, c0, a1, b1, c1):
    return tl.maximum(a0, a1), b0 + b1, c0 + c1


@triton.jit
def sum_sum_sum(a0, b0, c0, a1, b1, c1):
    return a0 + a1, b0 + b1, c0 + c1


# (the interpreter folds these one element at a time in Python: see interpreter_reductions)
INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"  # read by Triton at import, likewise

if INTERPRETING:
    from mpl_fast.kernels.interpreter_reductions import install as _install

    _install({max_max: ("max", "max"), max_sum: ("max", "sum"), max_sum_sum: ("max", "sum", "sum"),
              sum_sum_sum: ("sum", "sum", "sum")})


@triton.jit
def tile_rows(tile, N, ROWS: tl.constexpr):
    """The rows of tile number `tile` (int64, so that row * stride cannot overflow; tile * ROWS
    < N + ROWS cannot) and which exist."""
    rows = tl.arange(0, ROWS).to(tl.int64) + tile * ROWS
    return rows, rows < N


@triton.jit
def safe_max(m):
    """The running max with an all -inf row mapped to 0, so that exp(x - m) stays finite."""
    return tl.where(m == -float("inf"), 0.0, m)


@triton.jit
def reference_logit(first_ptrs, row_ok):
    """Each row's first logit (float32), or 0 where it is not finite. The loss kernels take the
    targets' weighted sums of logit - ref, small numbers where the logits are large, so that the
    loss keeps the precision of torch's log_softmax (a sum of t * logit near 4000 in float32
    loses about 4e-4 to rounding, a loss of 1e-4 included)."""
    x0 = tl.load(first_ptrs, mask=row_ok, other=0.0).to(tl.float32)
    return tl.where((x0 > -float("inf")) & (x0 < float("inf")), x0, 0.0)


@triton.jit
def aligned(value, ALIGN: tl.constexpr):
    """value, which ALIGN divides (the launcher checked: row_alignment), written so that the
    compiler knows it: Triton assumes nothing of an integer argument that 16 does not divide
    (C = 1000, a row stride of 1000), and then loads and stores one element at a time; with C
    and the row strides known to be multiples of 8 a bf16 row moves 16 bytes an instruction
    (tl.multiple_of on a scalar argument does not tell it, in triton 3.6)."""
    return (value // ALIGN) * ALIGN


def row_alignment(num_classes: int, *row_strides: int) -> int:
    """The largest power of two, at most 16, that divides the class count and every row stride
    (in elements): the ALIGN the kernels may round them to (see aligned)."""
    g = num_classes
    for stride in row_strides:
        g = math.gcd(g, stride)
    return min(g & -g, 16) if g else 16


def current_tile() -> tuple:
    """The module's tile settings, in tile_settings' argument order."""
    return (TILE_ELEMENTS, MAX_BLOCK, MAX_WARPS, LANE_STATS, ELEMENTS_PER_WARP, STREAM_STAGES,
            ROW_STAGES, MAX_REGISTERS, EVICTION_HINTS)


TILE_SPEC = ("ELEMENTS:MAX_BLOCK:MAX_WARPS[:PER_WARP][:lanes][:sSTAGES][:rROW_STAGES]"
             "[:mREGISTERS][:e]")


def parse_tile_spec(spec: str) -> tuple:
    """A tile written as TILE_SPEC -> its settings in current_tile's order. ELEMENTS, MAX_BLOCK,
    MAX_WARPS and PER_WARP (elements a warp holds) are powers of two; lanes: a streamed row's
    statistics per lane; STAGES and ROW_STAGES (1 to 4): a streamed row's chunks, a persistent
    program's one-tile rows in flight; REGISTERS (16 to 255, or 0 for none): a thread's register
    cap; e: L2 eviction hints on a streamed row's two passes. What is left out is the shipped
    setting; options follow the numbers, each at most once. Raises ValueError naming the
    spec."""
    parts = spec.split(":")
    numbers = list(itertools.takewhile(str.isdigit, parts))
    options = parts[len(numbers):]
    kinds = [o[:1] for o in options]  # "l" for lanes, "e" for the eviction hints
    values = {o[0]: int(o[1:]) for o in options if re.fullmatch(r"[sr][1-4]|m\d{1,3}", o)}
    if (len(numbers) not in (3, 4) or len(set(kinds)) != len(kinds)
            or len(values) + ("lanes" in options) + ("e" in options) != len(options)
            or not all(int(p) > 0 and int(p) & (int(p) - 1) == 0 for p in numbers)
            or values.get("m", 0) not in (0, *range(16, 256))):
        raise ValueError(f"tile {spec!r}: expected {TILE_SPEC}, powers of two, stages 1 to 4, "
                         "registers 16 to 255")
    numbers = [int(p) for p in numbers]
    return (*numbers[:3], "lanes" in options,
            numbers[3] if len(numbers) == 4 else ELEMENTS_PER_WARP,
            values.get("s", STREAM_STAGES), values.get("r", ROW_STAGES),
            values.get("m", MAX_REGISTERS), "e" in options)


def tile_spec(tile: tuple) -> str:
    """Settings in current_tile's order -> 'E:B:W:P[:lanes][:sS][:rR][:mM][:e]' (options named
    only when they do something, as earlier records were written)."""
    elements, max_block, max_warps, lanes, per_warp, stages, row_stages, registers, evict = tile
    return (f"{elements}:{max_block}:{max_warps}:{per_warp}" + (":lanes" if lanes else "")
            + (f":s{stages}" if stages != 1 else "")
            + (f":r{row_stages}" if row_stages != 1 else "")
            + (f":m{registers}" if registers else "") + (":e" if evict else ""))


@contextlib.contextmanager
def tile_settings(elements: int, max_block: int, max_warps: int, lanes: bool = False,
                  elements_per_warp=None, stages=None, row_stages=None, max_registers=None,
                  evict=None):
    """Launch with another tile inside the block (a benchmark sweep, a register report); the
    shipped settings come back after it. elements_per_warp, stages, row_stages, max_registers
    or evict None keeps the shipped one (max_registers 0: no cap)."""
    global TILE_ELEMENTS, MAX_BLOCK, MAX_WARPS, LANE_STATS, ELEMENTS_PER_WARP, STREAM_STAGES
    global ROW_STAGES, MAX_REGISTERS, EVICTION_HINTS
    shipped = current_tile()
    TILE_ELEMENTS, MAX_BLOCK, MAX_WARPS, LANE_STATS = elements, max_block, max_warps, lanes
    if elements_per_warp is not None:
        ELEMENTS_PER_WARP = elements_per_warp
    if stages is not None:
        STREAM_STAGES = stages
    if row_stages is not None:
        ROW_STAGES = row_stages
    if max_registers is not None:
        MAX_REGISTERS = max_registers
    if evict is not None:
        EVICTION_HINTS = evict
    try:
        yield
    finally:
        (TILE_ELEMENTS, MAX_BLOCK, MAX_WARPS, LANE_STATS, ELEMENTS_PER_WARP,
         STREAM_STAGES, ROW_STAGES, MAX_REGISTERS, EVICTION_HINTS) = shipped


class Tile(NamedTuple):
    rows: int       # rows per program
    block: int      # columns per loop iteration: the whole row when it fits
    num_warps: int
    single: bool    # a row fits in one tile (read once)
    lanes: bool     # a streamed row's statistics per lane (see the module docstring)
    stages: int     # a streamed row's chunks in flight (1 for a one-tile row)
    row_stages: int  # a persistent program's tiles in flight (1: a program a tile, streamed rows)
    max_registers: int  # registers a thread at most (0: the compiler's choice)
    evict: bool     # L2 eviction hints on a streamed row's two passes (False for a one-tile row)


def tile_for(num_classes: int) -> Tile:
    """The tile of a row-wise kernel over num_classes columns (depends on C only, so the number
    of compiled variants stays small whatever the batch size)."""
    block = min(triton.next_power_of_2(max(num_classes, 2)), MAX_BLOCK)
    rows = max(1, TILE_ELEMENTS // block)
    elements = rows * block
    single = num_classes <= block
    return Tile(rows, block, min(MAX_WARPS, max(1, elements // ELEMENTS_PER_WARP)),
                single, LANE_STATS and not single, 1 if single else STREAM_STAGES,
                ROW_STAGES if single else 1, MAX_REGISTERS, EVICTION_HINTS and not single)


class SmLimits(NamedTuple):
    """What one SM holds at once, for the programs of one kernel."""
    registers: int  # 32-bit registers
    threads: int
    shared_bytes: int
    programs: int   # thread blocks


# Hopper's (sm_90) and the data-centre Amperes' (sm_80): the compile report's and the default
SM90_LIMITS = SmLimits(registers=65536, threads=2048, shared_bytes=233472, programs=32)
# thread blocks an SM holds where fewer than 32 (CUDA's occupancy table: Turing, GA10x, Ada)
_PROGRAMS_PER_SM = {(7, 5): 16, (8, 6): 16, (8, 7): 16, (8, 9): 24}


@functools.lru_cache(maxsize=None)
def sm_limits(device_index: int) -> SmLimits:
    """An SM's limits on this device (Hopper's where torch's properties do not say)."""
    p = torch.cuda.get_device_properties(device_index)
    return SmLimits(getattr(p, "regs_per_multiprocessor", SM90_LIMITS.registers),
                    getattr(p, "max_threads_per_multi_processor", SM90_LIMITS.threads),
                    getattr(p, "shared_memory_per_multiprocessor", SM90_LIMITS.shared_bytes),
                    _PROGRAMS_PER_SM.get((p.major, p.minor), SM90_LIMITS.programs))


def resident_programs(registers: int, num_warps: int, shared_bytes: int,
                      limits: SmLimits = SM90_LIMITS) -> int:
    """Programs of a kernel (registers a thread, num_warps, dynamic shared memory a program)
    that an SM holds at once: registers are given to a warp in blocks of 256, and each program
    also takes 1 KiB of shared memory that the system reserves (sm_80 and later)."""
    warp_registers = -(-max(registers, 1) * 32 // 256) * 256
    return max(1, min(limits.registers // (warp_registers * num_warps),
                      limits.threads // (32 * num_warps),
                      limits.shared_bytes // (shared_bytes + 1024),
                      limits.programs))


@functools.lru_cache(maxsize=None)
def sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def persistent_programs(device, per_sm: int) -> int:
    """The size of a persistent grid (programs that loop over the tiles): per_sm programs a SM
    on CUDA, PERSISTENT_PROGRAMS_OFF_CUDA in the interpreter."""
    if device.type == "cuda":
        return per_sm * sm_count(device.index or 0)
    return PERSISTENT_PROGRAMS_OFF_CUDA


def grid(tile: Tile, n: int, device, per_sm: int = None) -> tuple:
    """The launch grid of a row-wise kernel over n rows: a program a tile of rows, or with
    row_stages > 1 a persistent grid of at most per_sm (PERSISTENT_PROGRAMS_PER_SM) programs a
    SM looping over the tiles."""
    tiles = triton.cdiv(n, tile.rows)
    if tile.row_stages == 1:
        return (tiles,)
    per_sm = min(per_sm or PERSISTENT_PROGRAMS_PER_SM, PERSISTENT_PROGRAMS_PER_SM)
    return (min(tiles, persistent_programs(device, per_sm)),)


# Floating-point contraction (a * b + c as one FMA) asked for by name rather than left to
# Triton's default: the kernels' GPU precision tests and timings ran with it on (triton 3.6's
# default), and triton 3.9 warns that its default turns it off from 3.10.
FP_FUSION = True


def launch_options(tile: Tile) -> dict:
    """The compile options of a launch with this tile (a register cap only when one is set, so
    that the uncapped kernels compile exactly as they did before there was one)."""
    options = {"num_warps": tile.num_warps, "enable_fp_fusion": FP_FUSION}
    if tile.max_registers:
        options["maxnreg"] = tile.max_registers
    return options


def interpreter_quiet():
    """Where Triton's interpreter runs a launch (numpy arrays for the kernel's blocks): no
    RuntimeWarning for the lanes a mask or a tl.where drops, which log, divide or multiply 0 and
    -inf before being dropped (the values are right; a user's interpreted call printed a dozen
    warnings). numpy's error state is the launching thread's own and restored after it."""
    if not INTERPRETING:
        return contextlib.nullcontext()
    import numpy as np

    return np.errstate(divide="ignore", invalid="ignore", over="ignore")


# (kernel, device, its compile-time arguments) -> programs of the compiled variant an SM holds
_resident = {}


def launch(kernel, tile: Tile, n: int, device, *args, **constexprs) -> None:
    """kernel[grid](*args, **constexprs) over n rows with the tile's grid and options. A
    persistent grid (row_stages > 1) is sized, from a variant's second launch on, by how many
    of its programs an SM holds (resident_programs of the compiled kernel): a CUDA graph
    captured after warm-up steps gets the sized grid."""
    options = launch_options(tile)
    if tile.row_stages == 1 or device.type != "cuda":
        with interpreter_quiet():
            kernel[grid(tile, n, device)](*args, **constexprs, **options)
        return
    key = (kernel, device.index, tuple(constexprs.values()), tuple(options.values()),
           tuple(a.dtype for a in args if isinstance(a, torch.Tensor)))
    compiled = kernel[grid(tile, n, device, _resident.get(key))](*args, **constexprs, **options)
    if key not in _resident and getattr(compiled, "n_regs", None):
        _resident[key] = resident_programs(compiled.n_regs, tile.num_warps,
                                           compiled.metadata.shared,
                                           sm_limits(device.index or 0))
