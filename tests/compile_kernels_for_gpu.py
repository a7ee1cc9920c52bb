"""Compile every Triton loss kernel for a GPU target on a machine without one (run as a script).

The interpreter that CI runs the kernels under (TRITON_INTERPRET=1) executes them as numpy and
accepts programs that the real compiler rejects (dtype mixes in tl.where, loop-carried values
changing type, ...). This script drives the real launchers with CPU tensors, catches each launch
(kernel, arguments, meta-parameters) before it reaches a driver, and compiles it ahead of time
for the target (default sm_90, the H100/H200) down to a cubin, whose register, spill and
shared-memory use it reads with cuobjdump. The widths of its global loads and stores are read
from the PTX that ptxas compiled: disassembling the SASS costs about a second a variant, most of
this script's time, so `--sass-every K` does it for a sample to check the PTX reading against
(on 2026-11-27 the two gave the same widths for all 499 variants; only counts differ, where
ptxas unrolls a loop or merges scalar loads). One JSON object a line per distinct kernel variant.

It must run without TRITON_INTERPRET (then @triton.jit gives compilable functions).
"""
import argparse
import contextlib
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile

import torch

# the stages a pipelined variant is compiled with (a streamed row's chunks, or a persistent
# program's tiles, in flight)
PIPELINED_STAGES = 2
PERSISTENT_CLASSES = (10, 1000)
# the register cap a capped variant is compiled with (softmax_common.MAX_REGISTERS), at the
# class counts of PERSISTENT_CLASSES: 25 programs of two warps an SM instead of 18-21 at 1000
CAPPED_REGISTERS = 40
POINTER_TYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16",
                 torch.int64: "i64", torch.int32: "i32", torch.bool: "i1"}


class LaunchRecorder:
    """Stands in for a @triton.jit kernel: `kernel[grid](...)` records the call, runs nothing."""

    def __init__(self, kernel):
        self.kernel = kernel
        self.calls = []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.calls.append((args, kwargs))
        return launch


def signature_of(kernel, args, kwargs):
    """Triton's (signature, constexprs, options) for one recorded launch."""
    options = {k: kwargs.pop(k) for k in ("num_warps", "num_stages", "maxnreg",
                                         "enable_fp_fusion") if k in kwargs}
    values = dict(zip(kernel.arg_names, args))
    values.update(kwargs)
    signature, constexprs = {}, {}
    for param in kernel.params:
        value = values[param.name]
        if param.is_constexpr:
            signature[param.name] = "constexpr"
            constexprs[param.name] = value
        elif isinstance(value, torch.Tensor):
            signature[param.name] = "*" + POINTER_TYPES[value.dtype]
        elif isinstance(value, bool):
            signature[param.name] = "i1"
        elif isinstance(value, int):
            signature[param.name] = "i32" if -2**31 <= value < 2**31 else "i64"
        elif isinstance(value, float):
            signature[param.name] = "fp32"
        else:
            raise TypeError(f"{kernel.__name__}: cannot type argument {param.name}={value!r}")
    return signature, constexprs, options


def specialization_of(kernel, args, kwargs):
    """The attributes Triton's launcher would compile this call with: divisibility by 16 of
    each pointer whose address and each integer whose value 16 divides (what lets it emit
    16-byte loads); without them the compiled code is not what runs."""
    values = dict(zip(kernel.arg_names, args))
    values.update(kwargs)
    attrs = {}
    for i, param in enumerate(kernel.params):
        value = values[param.name]
        if param.is_constexpr:
            continue
        if (isinstance(value, torch.Tensor) and value.data_ptr() % 16 == 0) or \
                (type(value) is int and value % 16 == 0):
            attrs[(i,)] = [["tt.divisibility", 16]]
    return attrs


def cuobjdump(cubin: bytes, flag: str) -> str:
    """What triton's bundled cuobjdump prints for a cubin with flag (-res-usage, -sass)."""
    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin",
                        "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([tool, flag, f.name], capture_output=True, text=True,
                              check=True).stdout


def resource_usage(cubin: bytes):
    """{'REG': n, 'STACK': n, 'SHARED': n, 'LOCAL': n} of the one kernel in a cubin."""
    line = next(ln for ln in cuobjdump(cubin, "-res-usage").splitlines() if "REG:" in ln)
    usage = dict(field.split(":", 1) for field in line.split() if ":" in field)
    return {k: int(usage[k]) for k in ("REG", "STACK", "SHARED", "LOCAL")}


def global_access_widths(cubin: bytes):
    """{'load': {bits: count}, 'store': {bits: count}, 'async': {bits: count}} of the kernel's
    global loads and stores (LDG/STG in its SASS) and its asynchronous copies from global to
    shared memory (LDGSTS, cp.async: a software-pipelined loop's loads): 128 where a thread
    moves 16 bytes an instruction, 16 where a bf16 row goes an element at a time."""
    widths = {"load": {}, "store": {}, "async": {}}
    kinds = {"LDG": "load", "STG": "store", "LDGSTS": "async"}
    for op, suffix in re.findall(r"\b(LDGSTS|LDG|STG)\.E((?:\.[A-Z0-9]+)*)",
                                 cuobjdump(cubin, "-sass")):
        bits = next((int(p.lstrip("SU")) for p in suffix.split(".")[1:]
                     if p.lstrip("SU").isdigit()), 32)
        kind = widths[kinds[op]]
        kind[bits] = kind.get(bits, 0) + 1
    return widths


PTX_ACCESS = re.compile(
    r"\b(ld|st)\.global((?:\.[\w:]+)*)"
    r"|\bcp\.async\.c[ag]\.shared\.global(?:\.[\w:]+)*\s*\[[^\]]*\]\s*,\s*\[[^\]]*\]\s*,"
    r"\s*(0x[0-9a-fA-F]+|\d+)")


def ptx_access_widths(ptx: str):
    """global_access_widths read from the PTX that ptxas compiles the cubin from: each
    ld.global / st.global (its vector count times its element bits) and cp.async (its bytes)."""
    widths = {"load": {}, "store": {}, "async": {}}
    for op, qualifiers, copy_bytes in PTX_ACCESS.findall(ptx):
        if copy_bytes:
            kind, bits = widths["async"], 8 * int(copy_bytes, 0)
        else:
            parts = qualifiers.split(".")[1:]
            vector = next((int(p[1:]) for p in parts if re.fullmatch(r"v\d+", p)), 1)
            element = next(int(m.group(1)) for p in reversed(parts)
                           if (m := re.fullmatch(r"[bufs](\d+)", p)))
            kind, bits = widths["load" if op == "ld" else "store"], vector * element
        kind[bits] = kind.get(bits, 0) + 1
    return widths


def ptx_eviction_hints(ptx: str):
    """{'load': {policy: count}, 'store': {policy: count}} of the global loads and stores that
    carry an L2 eviction hint (softmax_common.EVICTION_HINTS): a fractional L2 policy
    (`createpolicy.fractional.L2::evict_last|first`) handed to the access by `L2::cache_hint`,
    named by the access's L1 qualifier (`L1::evict_last|first`)."""
    hints = {"load": {}, "store": {}}
    policies = set(re.findall(r"createpolicy\.fractional\.L2::(evict_\w+)", ptx))
    for op, qualifiers, _ in PTX_ACCESS.findall(ptx):
        if not op or "L2::cache_hint" not in qualifiers:
            continue
        policy = re.search(r"L1::(evict_\w+)", qualifiers)
        name = policy.group(1) if policy else "unnamed"
        kind = hints["load" if op == "ld" else "store"]
        kind[name] = kind.get(name, 0) + 1
    hints["policies"] = sorted(policies)
    return hints


def record_launches(num_classes, dtypes):
    """Drive every launcher over its options; returns [(kernel, args, kwargs), ...]."""
    from mpl_fast.kernels import pseudo_labels, scale_rows, soft_cross_entropy, uda_loss

    recorders = {}
    for module, name in ((pseudo_labels, "_pseudo_labels_kernel"),
                         (soft_cross_entropy, "_soft_cross_entropy_kernel"),
                         (uda_loss, "_uda_loss_kernel"),
                         (scale_rows, "_scale_rows_kernel")):
        recorders[name] = LaunchRecorder(getattr(module, name))
        setattr(module, name, recorders[name])
    n = 3
    from mpl_fast.kernels import softmax_common as sc

    # each tile with a streamed row's statistics per row and per lane (LANES, where it streams),
    # and per row with its chunks software-pipelined (STAGES; softmax_common.STREAM_STAGES)
    for (lanes, stages), c, dtype in itertools.product(
            ((False, 1), (True, 1), (False, PIPELINED_STAGES)), num_classes, dtypes):
        with sc.tile_settings(sc.TILE_ELEMENTS, sc.MAX_BLOCK, sc.MAX_WARPS, lanes,
                              stages=stages):
            _launch_all(pseudo_labels, soft_cross_entropy, uda_loss, scale_rows, n, c, dtype)
    # streamed rows with L2 eviction hints on their two passes (EVICTION_HINTS; one-tile rows
    # take none, so their launches repeat the variants above)
    for c, dtype in itertools.product(num_classes, dtypes):
        with sc.tile_settings(sc.TILE_ELEMENTS, sc.MAX_BLOCK, sc.MAX_WARPS, evict=True):
            _launch_all(pseudo_labels, soft_cross_entropy, uda_loss, scale_rows, n, c, dtype)
    # one-tile rows by persistent, pipelined programs (ROW_STAGES; softmax_common.ROW_STAGES),
    # in bf16 at the class counts given among PERSISTENT_CLASSES (the other dtypes compile the
    # same loop; compiling every variant of it would double the time of this script)
    for c in (c for c in num_classes if c in PERSISTENT_CLASSES):
        with sc.tile_settings(sc.TILE_ELEMENTS, sc.MAX_BLOCK, sc.MAX_WARPS,
                              row_stages=PIPELINED_STAGES):
            _launch_all(pseudo_labels, soft_cross_entropy, uda_loss, scale_rows, n, c,
                        torch.bfloat16)
        # and with a register cap, so that an SM holds more programs (MAX_REGISTERS)
        with sc.tile_settings(sc.TILE_ELEMENTS, sc.MAX_BLOCK, sc.MAX_WARPS,
                              max_registers=CAPPED_REGISTERS):
            _launch_all(pseudo_labels, soft_cross_entropy, uda_loss, scale_rows, n, c,
                        torch.bfloat16)
    return [(rec.kernel, args, kwargs) for rec in recorders.values()
            for args, kwargs in rec.calls]


def _launch_all(pseudo_labels, soft_cross_entropy, uda_loss, scale_rows, n, c, dtype):
    """One launch of every launcher in each of its options, for n x c logits of dtype."""
    logits = torch.zeros(n, c, dtype=dtype)
    index = torch.zeros(n, dtype=torch.int64)
    probs = torch.zeros(n, c, dtype=torch.float32)
    row_mask = torch.ones(n, dtype=torch.float32)
    pseudo_labels.pseudo_labels_forward(logits, 0.7, 0.6)
    for hard, smooth, masked, grad in itertools.product((True, False), repeat=4):
        soft_cross_entropy.soft_cross_entropy_forward(
            logits, index if hard else None, None if hard else probs.to(dtype),
            row_mask if masked else None, 0.15 if smooth else 0.0, grad)
    for grad in (True, False):
        uda_loss.uda_loss_forward(logits, logits, 0.7, 0.6, grad)
    for scale in (torch.tensor(0.5), row_mask):
        scale_rows.scale_rows_forward(logits, scale)


def main(argv=None):
    from mpl_fast.kernels import softmax_common

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 90")
    parser.add_argument("--classes", default="10,100,1000,4000,32000",
                        help="class counts to launch with (each picks a tile)")
    parser.add_argument("--tile", default=None,
                        help="a tile as `mpl-fast bench ops --tiles` takes it ("
                        + softmax_common.TILE_SPEC + ") instead of the shipped one: what a swept "
                        "tile costs in registers")
    parser.add_argument("--sass-every", type=int, default=0, metavar="K",
                        help="also read the load and store widths from the SASS of every K-th "
                        "variant (record key 'sass'), to check the PTX reading against")
    parser.add_argument("--shard", default="0/1",
                        help="i/n: compile only every n-th variant from the i-th (parallel runs)")
    args = parser.parse_args(argv)
    shard, shards = (int(v) for v in args.shard.split("/"))
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("compile_kernels_for_gpu: unset TRITON_INTERPRET (it makes kernels uncompilable)")
    if args.tile:
        try:
            tile = softmax_common.tile_settings(*softmax_common.parse_tile_spec(args.tile))
        except ValueError as err:
            parser.error(f"--tile: {err}")
    else:
        tile = contextlib.nullcontext()
    with tile:
        compile_all(args, shard, shards)


def compile_all(args, shard, shards):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from mpl_fast.kernels.softmax_common import resident_programs

    target = GPUTarget("cuda", args.arch, 32)
    seen = set()
    classes = [int(c) for c in args.classes.split(",")]
    for kernel, call_args, kwargs in record_launches(
            classes, (torch.float32, torch.bfloat16, torch.float16)):
        signature, constexprs, options = signature_of(kernel, call_args, dict(kwargs))
        attrs = specialization_of(kernel, call_args, kwargs)
        key = (kernel.__name__, json.dumps(signature), json.dumps(constexprs),
               json.dumps(options), json.dumps(sorted(attrs)))
        if key in seen:
            continue
        seen.add(key)
        if (len(seen) - 1) % shards != shard:
            continue
        compiled = triton.compile(ASTSource(kernel, signature, constexprs, attrs),
                                  target=target, options=options)
        usage = resource_usage(compiled.asm["cubin"])
        record = {"kernel": kernel.__name__, "arch": f"sm_{args.arch}",
                  "signature": {k: v for k, v in signature.items() if v != "constexpr"},
                  "constexprs": constexprs, **options, **usage,
                  "dynamic_shared": compiled.metadata.shared,
                  # what an H100/H200 SM holds at once of this variant (occupancy)
                  "programs_per_sm": resident_programs(usage["REG"], options["num_warps"],
                                                       compiled.metadata.shared),
                  **ptx_access_widths(compiled.asm["ptx"]),
                  "hints": ptx_eviction_hints(compiled.asm["ptx"]),
                  # the rounds of reductions across lanes and warps (their latency bounds the
                  # 1000-class kernels): warp shuffles and barriers in the PTX
                  "shuffles": compiled.asm["ptx"].count("shfl.sync"),
                  "barriers": compiled.asm["ptx"].count("bar.sync")}
        if args.sass_every and (len(seen) - 1) % args.sass_every == 0:
            # the same widths read from the machine code (a second per variant: a sample only)
            record["sass"] = global_access_widths(compiled.asm["cubin"])
        print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
