"""The Triton loss kernels compile for the H100/H200 (sm_90) on this GPU-less machine.

CI otherwise runs them only through the interpreter, which accepts programs the real compiler
rejects; this compiles every variant the launchers can produce (3 dtypes x tiles x the constexpr
switches) to a cubin, and checks that none spills registers beyond a word or two, that long rows
are read and written 16 bytes an instruction, that the pipelined loops (a streamed row's
chunks, softmax_common.STREAM_STAGES; a persistent program's tiles, ROW_STAGES) load through
asynchronous copies, that a register cap (MAX_REGISTERS) holds, and that the L2 eviction hints
(EVICTION_HINTS) reach the streamed rows' loads and stores and no other variant's, and that
the cross-entropy without smoothing spends fewer reduction rounds than with it.
"""
import importlib
import json
import os
import pathlib
import subprocess
import sys

import pytest

triton = pytest.importorskip("triton")

SCRIPT = pathlib.Path(__file__).with_name("compile_kernels_for_gpu.py")
SCRIPT_MODULE = importlib.import_module("tests.compile_kernels_for_gpu")
# the load and store widths come from the PTX; every SASS_EVERY-th variant is also disassembled
# (about a second each) to check that reading against the machine code
SASS_EVERY = 9


def _ptxas_present():
    bin_dir = pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    return (bin_dir / "ptxas").exists() and (bin_dir / "cuobjdump").exists()


@pytest.mark.slow
@pytest.mark.skipif(not _ptxas_present(), reason="this triton wheel carries no ptxas/cuobjdump")
def test_every_kernel_variant_compiles_for_sm90(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "cache")  # compile for real, not from a cache
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(SCRIPT.parent.parent),
                                                     env.get("PYTHONPATH")]))
    # two shards in parallel: compiling is CPU-bound and CI has two cores
    procs = []
    for i in range(2):
        out, err = (open(tmp_path / f"shard{i}.{ext}", "w+") for ext in ("jsonl", "log"))
        procs.append((subprocess.Popen(
            [sys.executable, str(SCRIPT), "--arch", "90", "--classes", "10,100,1000,4000,32000",
             "--shard", f"{i}/2", "--sass-every", str(SASS_EVERY)],
            stdout=out, stderr=err, text=True, env=env), out, err))
    lines = []
    for proc, out, err in procs:
        proc.wait(timeout=900)
        out.seek(0)
        err.seek(0)
        log, text = err.read(), out.read()
        out.close()
        err.close()
        assert proc.returncode == 0, log[-4000:]
        lines += text.splitlines()
    records = [json.loads(line) for line in lines]
    by_kernel = {}
    for r in records:
        by_kernel.setdefault(r["kernel"], []).append(r)
    # every launcher was driven, in every dtype and at every block size
    assert set(by_kernel) == {"_pseudo_labels_kernel", "_soft_cross_entropy_kernel",
                              "_uda_loss_kernel", "_scale_rows_kernel"}
    for name, rs in by_kernel.items():
        tiles = {(r["constexprs"]["ROWS"], r["constexprs"]["BLOCK"],
                  r["constexprs"].get("SINGLE", True)) for r in rs}
        assert tiles == {(16, 16, True), (2, 128, True), (1, 1024, True), (1, 4096, True),
                         (1, 4096, name == "_scale_rows_kernel")}, name
        # the shipped tile's warps (softmax_common: a warp per 512 elements, at most 8)
        warps = {(r["constexprs"]["ROWS"], r["constexprs"]["BLOCK"], r["num_warps"]) for r in rs}
        assert warps == {(16, 16, 1), (2, 128, 1), (1, 1024, 2), (1, 4096, 8)}, name
        first_ptr = {next(iter(r["signature"].values())) for r in rs}
        assert first_ptr == {"*fp32", "*bf16", "*fp16"}, name
    # 2 x 2 x 2 x 2 switches of soft_cross_entropy per dtype and tile (4096 single and chunked),
    # the chunked tile also with per-lane statistics, with its chunks pipelined and with the
    # eviction hints; and the persistent programs over one-tile rows and the register-capped
    # kernels, in bf16 at 10 and 1000 classes
    assert len(by_kernel["_soft_cross_entropy_kernel"]) == 16 * 3 * 8 + 16 * 2 + 16 * 2
    pipelined = SCRIPT_MODULE.PIPELINED_STAGES
    for name in ("_pseudo_labels_kernel", "_soft_cross_entropy_kernel", "_uda_loss_kernel"):
        streams = {tuple(r["constexprs"][k] for k in ("SINGLE", "LANES", "STAGES", "ROW_STAGES",
                                                      "EVICT"))
                   for r in by_kernel[name]}
        assert streams == {(True, False, 1, 1, False), (False, False, 1, 1, False),
                           (False, True, 1, 1, False), (False, False, pipelined, 1, False),
                           (True, False, 1, pipelined, False), (False, False, 1, 1, True)}, name
        for r in by_kernel[name]:
            # a streamed row's first pass asks the L2 to keep what the second reads again, the
            # second to drop first what it reads and writes; where no second pass reads the row
            # (no gradient), and in every other variant, no access carries a hint
            hints = r["hints"]
            if r["constexprs"]["EVICT"] and r["constexprs"].get("COMPUTE_GRAD", True):
                assert hints["policies"] == ["evict_first", "evict_last"], r
                assert hints["load"].get("evict_last", 0) >= 1, r
                assert hints["load"].get("evict_first", 0) >= 1, r
                assert set(hints["store"]) == {"evict_first"}, r
            else:
                assert hints == {"load": {}, "store": {}, "policies": []}, r
        for r in by_kernel[name]:
            copies = r["async"]
            if r["constexprs"]["STAGES"] > 1 or r["constexprs"]["ROW_STAGES"] > 1:
                # the pipelined loops' loads became asynchronous copies into shared memory (a
                # row's 16 bytes a copy from 1000 classes on, a persistent program's masks and
                # class indices 4 and 8); the buffers fit an SM's shared memory (227 KiB on
                # sm_90)
                assert sum(copies.values()) >= 1 and "16" not in copies, r
                if r["constexprs"]["BLOCK"] >= 1024:
                    assert copies.get("128", 0) >= 1, r
                assert r["dynamic_shared"] <= 227 * 1024, r
            else:
                assert copies == {}, r
    # the PTX's widths are the machine code's: the same widths of load, store and asynchronous
    # copy in each sampled variant (the counts may differ: ptxas unrolls loops, merges loads),
    # the same count of two-byte loads, and the sample holds long bf16 rows and pipelined loops
    sampled = [r for r in records if "sass" in r]
    assert len(sampled) >= len(records) // SASS_EVERY, len(sampled)
    for r in sampled:
        for kind in ("load", "store", "async"):
            assert set(r[kind]) == set(r["sass"][kind]), (kind, r)
        assert r["load"].get("16", 0) == r["sass"]["load"].get("16", 0), r
    assert any(r["constexprs"]["BLOCK"] >= 1024 and "*bf16" in r["signature"].values()
               for r in sampled)
    assert any(r["sass"]["async"] for r in sampled)
    cap = SCRIPT_MODULE.CAPPED_REGISTERS
    capped = [r for r in records if "maxnreg" in r]
    assert {r["kernel"] for r in capped} == {"_pseudo_labels_kernel",
                                             "_soft_cross_entropy_kernel", "_uda_loss_kernel"}
    assert {r["constexprs"]["BLOCK"] for r in capped} == {16, 1024}
    for r in records:
        assert r["arch"] == "sm_90"
        # contraction asked for by every launcher, not left to triton's default (off from 3.10)
        assert r["enable_fp_fusion"] is True, r
        if "maxnreg" in r:
            # the cap holds, and what it is for: more programs an SM (25 of two warps at 40
            # registers, against 18-21 for most kernels uncapped at 1000 classes); what does not
            # fit is spilled, a few words a thread at most
            assert r["maxnreg"] == cap and r["REG"] <= cap, r
            assert r["programs_per_sm"] >= min(32, 65536 // (cap * 32 * r["num_warps"])), r
            assert r["LOCAL"] == 0 and r["STACK"] <= 128, f"register spill: {r}"
        else:
            # ptxas 13 under triton's --regAllocOptLevel=2 may park a word or two on the stack;
            # a register-starved tile would spill hundreds of bytes
            assert r["LOCAL"] == 0 and r["STACK"] <= 16, f"register spill: {r}"
        assert 0 < r["REG"] <= 255, r
        # what an SM holds of it at once (occupancy, softmax_common.resident_programs)
        assert 1 <= r["programs_per_sm"] <= 32, r
        # rows of 1000 classes and more (C and the row strides multiples of 8: the launchers
        # tell the compiler, see softmax_common.aligned) move 16 bytes a load, not one bf16
        # element (what triton did at C = 1000 before: 8 two-byte loads a thread and input); the
        # two-byte loads left take one element a row: the reference logit of the cross-entropy
        # and of UDA's streamed rows, and the cross-entropy's gather of the target's logit in a
        # streamed row
        if r["constexprs"]["BLOCK"] >= 1024:
            wide = r["load"].get("128", 0) + r["async"].get("128", 0)
            assert wide >= 1 and r["load"].get("16", 0) <= 2, r
            assert r["store"].get("16", 0) == 0, r
    # a one-tile row's cross-entropy on class indices without smoothing reduces two quantities
    # across the warps (the max and the target's logit), not the third only smoothing uses:
    # fewer shuffles and no more barriers than the same kernel with smoothing
    one_tile = {}
    for r in by_kernel["_soft_cross_entropy_kernel"]:
        c = r["constexprs"]
        if c["HARD"] and c["SINGLE"] and c["ROW_STAGES"] == 1 and "maxnreg" not in r:
            key = (json.dumps(r["signature"]), c["BLOCK"], c["HAS_MASK"], c["COMPUTE_GRAD"])
            one_tile.setdefault(key, {})[c["SMOOTH"]] = r
    assert len(one_tile) == 3 * 4 * 4, len(one_tile)  # dtypes x one-tile blocks x switches
    for key, pair in one_tile.items():
        plain, smooth = pair[False], pair[True]
        assert plain["shuffles"] < smooth["shuffles"], (key, plain["shuffles"], smooth["shuffles"])
        assert plain["barriers"] <= smooth["barriers"], key


def test_ptx_access_widths_reads_vector_scalar_and_async_accesses():
    # lines as triton emits them for sm_90 (predicated inline asm, cp.async with its byte count)
    ptx = """
    @%p1 ld.global.v4.b32 { %r1, %r2, %r3, %r4 }, [ %rd1 + 0 ];
    @%p1 ld.global.v4.b32 { %r5, %r6, %r7, %r8 }, [ %rd2 + 0 ];
    @%p2 ld.global.b16 { %rs1 }, [ %rd3 + 0 ];
    @%p1 ld.global.L1::evict_last.b64 { %rd4 }, [ %rd5 + 0 ];
    @%p3 st.global.v2.b32 [ %rd6 + 0 ], { %r9, %r10 };
    @%p4 st.global.b32 [ %rd7 + 0 ], { %r11 };
    @%p27 cp.async.ca.shared.global [ %r31 + 0 ], [ %rd22 + 0 ], 0x8, %r32;
    @%p5 cp.async.cg.shared.global [ %r6 + 0 ], [ %rd19 + 0 ], 0x10, %r362;
    cp.async.commit_group;
    cp.async.wait_group 0;
    ld.shared.v4.b32 { %r12, %r13, %r14, %r15 }, [ %r16 + 0 ];
    """
    assert SCRIPT_MODULE.ptx_access_widths(ptx) == {
        "load": {128: 2, 16: 1, 64: 1}, "store": {64: 1, 32: 1}, "async": {64: 1, 128: 1}}


def test_ptx_eviction_hints_counts_hinted_accesses_by_policy():
    # as triton 3.9 emits them for sm_90: a fractional L2 policy handed to each hinted access
    ptx = """
    createpolicy.fractional.L2::evict_last.b64 %rd2, 1.0;
    createpolicy.fractional.L2::evict_first.b64 %rd9, 1.0;
    @%p1 ld.global.L1::evict_last.L2::cache_hint.v4.b32 { %r1, %r2, %r3, %r4 }, [ %rd1 + 0 ], %rd2;
    @%p1 ld.global.L1::evict_last.L2::cache_hint.b16 { %rs1 }, [ %rd3 + 0 ], %rd2;
    @%p2 ld.global.L1::evict_first.L2::cache_hint.v4.b32 { %r5, %r6, %r7, %r8 }, [ %rd4 + 0 ], %rd9;
    @%p3 st.global.L1::evict_first.L2::cache_hint.v4.b32 [ %rd6 + 0 ], { %r9, %r10, %r11, %r12 }, %rd9;
    @%p1 ld.global.L1::evict_last.b64 { %rd4 }, [ %rd5 + 0 ];
    @%p4 st.global.b32 [ %rd7 + 0 ], { %r11 };
    """
    assert SCRIPT_MODULE.ptx_eviction_hints(ptx) == {
        "load": {"evict_last": 2, "evict_first": 1}, "store": {"evict_first": 1},
        "policies": ["evict_first", "evict_last"]}
    assert SCRIPT_MODULE.ptx_eviction_hints("@%p4 st.global.b32 [ %rd7 + 0 ], { %r11 };") == {
        "load": {}, "store": {}, "policies": []}
