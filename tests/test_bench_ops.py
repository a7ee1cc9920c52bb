"""The ops benchmark runs end to end and records what the issue asks for (numbers on a CPU
through the Triton interpreter mean nothing; the figures come from GPU runs)."""
import json
import os
import sys
from pathlib import Path

import pytest
import torch

from mpl_fast import cli


def test_bench_ops_records_rows(tmp_path, capsys):
    assert cli.main(["bench", "ops", "--shapes", "8x10", "--dtypes", "float32", "--no-compile",
                     "--device", "cpu", "--out", str(tmp_path)]) == 0
    rows = [json.loads(line) for line in (tmp_path / "ops.jsonl").read_text().splitlines()]
    assert {r["op"] for r in rows} == {"soft_cross_entropy", "uda_loss", "pseudo_labels"}
    for r in rows:
        for key in ("gpu", "torch", "triton", "date", "ms", "eager_ms", "GBps",
                    "bandwidth_fraction", "n", "c", "dtype"):
            assert key in r
        assert r["ms"] > 0 and r["n"] == 8 and r["c"] == 10
        # the bytes the rate is counted on: only the rows a mask keeps are read
        full = {"soft_cross_entropy": 2, "uda_loss": 3, "pseudo_labels": 2}[r["op"]] * 8 * 10 * 4
        assert 0 < r["min_bytes"] <= full
        assert r["graph_ms"] is None and r["speedup_vs_compile"] is None  # no GPU, no compile
        assert r["tile"] == "256:4096:8:512"  # the shipped tile
        # 8 rows of 10 classes fit the 256-element tile's 16: one program of one warp
        assert (r["rows_per_program"], r["block"], r["num_warps"]) == (16, 16, 1)
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("summary:")


def test_bench_ops_sweeps_tiles_and_restores_the_shipped_one(tmp_path, capsys):
    from mpl_fast.kernels import softmax_common

    def settings():
        return (softmax_common.TILE_ELEMENTS, softmax_common.MAX_BLOCK, softmax_common.MAX_WARPS,
                softmax_common.LANE_STATS, softmax_common.STREAM_STAGES,
                softmax_common.ROW_STAGES, softmax_common.MAX_REGISTERS,
                softmax_common.EVICTION_HINTS)

    shipped = settings()
    assert cli.main(["bench", "ops", "--shapes", "5x300", "--dtypes", "bfloat16", "--no-compile",
                     "--tiles", "1024:4096:8,2048:128:4:256,1024:128:4:lanes,1024:128:4:s3,"
                     "1024:4096:8:r2,1024:128:4:r3,1024:4096:8:r2:m40,1024:4096:8:m0,"
                     "1024:128:4:e,1024:4096:8:e",
                     "--device", "cpu", "--out", str(tmp_path)]
                    ) == 0
    rows = [json.loads(line) for line in (tmp_path / "ops.jsonl").read_text().splitlines()]
    assert sorted((r["op"], r["tile"]) for r in rows) == sorted(
        (op, t) for op in ("soft_cross_entropy", "uda_loss", "pseudo_labels")
        for t in ("1024:4096:8:512", "2048:128:4:256", "1024:128:4:512:lanes",
                  "1024:128:4:512:s3", "1024:4096:8:512:r2", "1024:128:4:512:r3",
                  "1024:4096:8:512:r2:m40", "1024:4096:8:512", "1024:128:4:512:e",
                  "1024:4096:8:512:e"))
    # the launch each tile made at 300 classes (rows a program, block, warps, chunks in flight:
    # one for a one-tile row, the tile's for a streamed one; tiles in flight a persistent
    # program: the tile's for one-tile rows, one for streamed ones; the register cap, 0 for
    # none: ":m0" is the uncapped tile, recorded under its name; the eviction hints, for
    # streamed rows only)
    launch = {r["tile"]: (r["rows_per_program"], r["block"], r["num_warps"], r["stages"],
                          r["row_stages"], r["max_registers"], r["evict"]) for r in rows}
    assert launch == {"1024:4096:8:512": (2, 512, 2, 1, 1, 0, False),
                      "2048:128:4:256": (16, 128, 4, 1, 1, 0, False),
                      "1024:128:4:512:lanes": (8, 128, 2, 1, 1, 0, False),
                      "1024:128:4:512:s3": (8, 128, 2, 3, 1, 0, False),
                      "1024:4096:8:512:r2": (2, 512, 2, 1, 2, 0, False),
                      "1024:128:4:512:r3": (8, 128, 2, 1, 1, 0, False),
                      "1024:4096:8:512:r2:m40": (2, 512, 2, 1, 2, 40, False),
                      "1024:128:4:512:e": (8, 128, 2, 1, 1, 0, True),
                      "1024:4096:8:512:e": (2, 512, 2, 1, 1, 0, False)}
    assert settings() == shipped
    capsys.readouterr()
    for bad in ("1024:4096", "1000:4096:8", "a:b:c", "1024:4096:8:rows", "1024:4096:8:lanes:x",
                "1024:4096:8:500", "1024:4096:8:512:2", "lanes", "1024:4096:8:s5",
                "1024:4096:8:s0", "1024:4096:s2", "1024:4096:8:r2:r3", "1024:4096:8:x2",
                "1024:4096:8:r", "1024:4096:8:lanes:lanes", "1024:4096:8:m8",
                "1024:4096:8:m256", "1024:4096:8:m", "1024:4096:8:m40:m32", "1024:4096:8:mx",
                "1024:4096:8:m1000", "1024:4096:8:e:e", "1024:4096:8:e2", "1024:4096:8:ex"):
        with pytest.raises(SystemExit):
            cli.main(["bench", "ops", "--tiles", bad, "--device", "cpu", "--out", str(tmp_path)])
        assert "--tiles" in capsys.readouterr().err


def test_bench_ops_kernels_says_where_each_call_goes(tmp_path, capsys):
    """--kernels: each record holds the costliest profiled entries a call of ours and of eager
    torch (here CPU ops, on a GPU kernels), most costly first; ours' own autograd Function is
    among them, eager's log-softmax too."""
    assert cli.main(["bench", "ops", "--shapes", "6x10", "--dtypes", "float32", "--no-compile",
                     "--kernels", "--device", "cpu", "--out", str(tmp_path)]) == 0
    rows = {json.loads(line)["op"]: json.loads(line)
            for line in (tmp_path / "ops.jsonl").read_text().splitlines()}
    assert set(rows) == {"soft_cross_entropy", "uda_loss", "pseudo_labels"}
    for r in rows.values():
        assert set(r["kernels"]) == {"ours", "eager"}  # no compile row asked for
        for entries in r["kernels"].values():
            assert 0 < len(entries) <= 8
            assert all(isinstance(name, str) and us > 0 for name, us in entries)
            assert [us for _, us in entries] == sorted((us for _, us in entries), reverse=True)
    names = {op: [name for name, _ in r["kernels"]["ours"]] for op, r in rows.items()}
    assert any("SoftCrossEntropy" in name for name in names["soft_cross_entropy"])
    assert any("UdaLoss" in name for name in names["uda_loss"])
    eager = [name for name, _ in rows["soft_cross_entropy"]["kernels"]["eager"]]
    # eager's own ops (which of them makes the costliest eight on a CPU varies with the torch)
    assert any("log_softmax" in name or "nll_loss" in name for name in eager), eager
    assert capsys.readouterr().out.count("    ours: ") == 3
    # no device kernels off CUDA: our kernel's own share is not made up from CPU ops
    for r in rows.values():
        assert r["own_kernel_us"] is None and r["own_kernel_bandwidth_fraction"] is None


def test_bench_ops_separates_our_kernel_from_the_launches_around_it():
    """own_kernel_share: our Triton kernel's time and bandwidth alone, the rest apart (here 52 MB
    in 20 us of 35 at 4.1 TB/s: 63% for the kernel where the whole call made 36%)."""
    import runpy

    share = runpy.run_path(str(Path(__file__).resolve().parent.parent / "benchmarks"
                               / "bench_ops.py"))["own_kernel_share"]
    kernels = [["_soft_cross_entropy_kernel", 20.0], ["void at::native::reduce_kernel", 6.0],
               ["_scale_rows_kernel", 5.5], ["void at::native::vectorized_elementwise", 3.5]]
    got = share("soft_cross_entropy", kernels, 52e6, 4.1e12)
    assert got == {"own_kernel_us": 20.0, "own_kernel_bandwidth_fraction": 0.634,
                   "other_kernels_us": 15.0}
    # the scale kernel is not mistaken for the op's own
    assert share("uda_loss", kernels, 52e6, 4.1e12)["own_kernel_us"] is None


@pytest.mark.parametrize("option,bad", [("--shapes", "10x0"), ("--shapes", "0x10"),
                                        ("--shapes", "10"), ("--shapes", "10x1000x2"),
                                        ("--dtypes", "float64"), ("--dtypes", "int8")])
def test_bench_ops_refuses_bad_shapes_and_dtypes_in_one_line(tmp_path, capsys, option, bad):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["bench", "ops", option, bad, "--device", "cpu", "--out", str(tmp_path)])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert option in err[-1] and bad in err[-1] and "Traceback" not in "\n".join(err)
    assert not (tmp_path / "ops.jsonl").exists()  # nothing half-written


@pytest.mark.parametrize("command", [["bench", "ops"], ["bench", "step"],
                                     ["bench", "data", "--root", "."],
                                     ["bench", "methods", "--set", "data.root=."]])
def test_benchmarks_refuse_a_results_folder_they_cannot_write_before_measuring(tmp_path, capsys,
                                                                              command):
    """A bad --out (--results for methods) stops before minutes of GPU time, not after them."""
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder\n")
    flag = "--results" if command[1] == "methods" else "--out"
    with pytest.raises(SystemExit) as exit_:  # argparse's error: usage, then one line
        cli.main([*command, flag, str(blocker / "results")])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert f"{flag} {blocker / 'results'}: cannot write there" in err[-1]
    assert "Traceback" not in "\n".join(err)
    assert blocker.read_text() == "not a folder\n" and sorted(tmp_path.iterdir()) == [blocker]


@pytest.mark.parametrize("command,bad", [
    (["bench", "step"], ["--device", "tpu"]), (["bench", "step"], ["--device", "meta"]),
    (["bench", "step"], ["--device", "cuda:99"]), (["bench", "ops"], ["--device", "xyz"]),
    (["bench", "ops"], ["--device", "cuda:99"]), (["bench", "step"], ["--warmup", "-1"]),
    (["bench", "step"], ["--num-classes", "1"]),
    (["bench", "data", "--root", "."], ["--threads", "0"]),
    (["bench", "data", "--root", "."], ["--image-size", "0"]),  # ran at the default size
    (["bench", "data", "--root", "."], ["--image-size", "-5"])])
def test_benchmarks_refuse_a_device_or_a_count_they_cannot_run_in_one_line(tmp_path, capsys,
                                                                          command, bad):
    """A device torch does not know, or a CUDA device the machine lacks, used to end in a
    traceback; a negative --warmup ran and recorded a measurement."""
    with pytest.raises(SystemExit) as exit_:
        cli.main([*command, *bad, "--out", str(tmp_path / "r")])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "error: --" in err[-1] and bad[0] in err[-1] and "Traceback" not in "\n".join(err)
    assert not (tmp_path / "r").exists()


def test_bench_data_refuses_gpu_pipelines_without_a_gpu(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    with pytest.raises(SystemExit) as exit_:
        cli.main(["bench", "data", "--root", ".", "--device", "gpu", "--out", str(tmp_path)])
    assert exit_.value.code == 2
    assert "--device gpu: this machine has no CUDA device" in capsys.readouterr().err


def test_reduced_mpl_memory_benchmark_records_the_saving(tmp_path, capsys):
    """Reduced MPL's step holds less (no large teacher's weights, gradients, momentum or
    activations) with any pair of networks named on the command line; bad names and sizes stop
    with argparse's one line before anything is measured."""
    import runpy

    main = runpy.run_path(str(Path(__file__).resolve().parent.parent / "benchmarks"
                              / "reduced_mpl_memory.py"))["main"]
    main(["--out", str(tmp_path), "--teacher", "small_cnn", "--student", "convnet-8",
          "--image-size", "8", "--batch-size", "4", "--mu", "2"])
    record = json.loads((tmp_path / "reduced_mpl_memory.jsonl").read_text())
    full, reduced = record["rows"]
    assert record["teacher"] == "small_cnn" and record["mu"] == 2
    assert reduced["state_bytes"] < full["state_bytes"]
    assert reduced["peak_saved_activation_bytes"] < full["peak_saved_activation_bytes"]
    assert 0 < record["saving"] < 1
    for bad in (["--teacher", "nope"], ["--mu", "0"], ["--classes", "1"], ["--device", "tpu"],
                ["--device", "cuda:99"]):
        with pytest.raises(SystemExit):
            main(["--out", str(tmp_path / "bad"), *bad])
        assert "error: --" in capsys.readouterr().err.strip().splitlines()[-1]
    assert not (tmp_path / "bad").exists()


def test_results_folder_check_leaves_no_folder_behind(tmp_path):
    import argparse

    from mpl_fast.train.run_log import check_results_folder

    parser = argparse.ArgumentParser()
    check_results_folder(parser, "--out", tmp_path / "a" / "b")  # writable: proved, not kept
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "kept").mkdir()
    check_results_folder(parser, "--out", tmp_path / "kept")
    assert list(tmp_path.iterdir()) == [tmp_path / "kept"]


def test_bench_step_smoke_on_cpu(tmp_path, capsys):
    """Eager on a CPU (no graphs, no compile): the record has every field the issue names."""
    assert cli.main(["bench", "step", "--model", "small_cnn", "--batch-size", "4", "--mu", "2",
                     "--image-size", "8", "--steps", "2", "--warmup", "1", "--device", "cpu",
                     "--out", str(tmp_path)]) == 0
    record = json.loads((tmp_path / "step.jsonl").read_text())
    for key in ("model", "batch_size", "mu", "image_size", "gpu", "torch", "date", "ms_per_step",
                "reference_ms_per_step", "compiled_reference_ms_per_step", "floor_ms_per_step",
                "speedup_vs_reference", "speedup_vs_compiled_reference", "overhead_vs_floor",
                "peak_mem_gib"):
        assert key in record, key
    assert record["ms_per_step"] > 0 and record["floor_ms_per_step"] > 0
    # each variant's time as it is measured, before the record (a cut-off run keeps them)
    out = capsys.readouterr().out.splitlines()
    measured = [line.split(":")[0] for line in out if line.startswith("measured ")]
    assert measured == ["measured ours", "measured floor", "measured reference"]
    at = next(i for i, text in enumerate(out) if text.startswith("measured ours:"))
    assert at < len(out) - 3
    # the line shows the time to 0.01 ms, the record keeps 0.001 (so one rounding may differ)
    shown = float(out[at].split(":")[1].split()[0])
    assert abs(shown - record["ms_per_step"]) <= 0.0051
    assert record["compile"] == "none" and record["graph"] is False
    assert record["ce_old_forward"] == "separate"  # the paper preset's
    assert record["floor_graph"] is False and record["graphed_reference_ms_per_step"] is None
    assert record["compiled_reference_mode"] is None  # no compiled reference off a GPU
    # each variant's own work (op time on a CPU); ours is its phases' sum
    assert set(record["kernel_ms"]) == {"ours", "floor", "reference"}
    assert all(v > 0 for v in record["kernel_ms"].values())
    assert record["kernel_ms"]["ours"] == pytest.approx(sum(record["phases_ms"].values()),
                                                        abs=0.01)
    assert set(record["phases_ms"]) == {"teacher_forward", "student_forward_backward_step",
                                        "student_new_forward", "feedback",
                                        "teacher_backward_step", "other"}
    # the host's time in each phase: on a CPU the phase's ops run inside it
    host = record["host_phases_ms"]
    assert set(host) == set(record["phases_ms"]) - {"other"}
    assert all(host[k] >= 0.9 * record["phases_ms"][k] > 0 for k in host), host
    assert any(line.startswith("host time in the phases") for line in out)
    assert out[-1].startswith("summary:")


def _sitting_script(tmp_path):
    """A copy of the sitting script in an empty checkout: the real one may hold .whl and .dali
    folders (hundreds of MB) that the script would gather into /tmp."""
    import shutil

    script = tmp_path / "repo" / "benchmarks" / "gpu_sitting.sh"
    script.parent.mkdir(parents=True)
    shutil.copy(Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_sitting.sh", script)
    return script


def _sitting_env(tmp_path, **extra):
    """The script's environment with its output, work folder and the caches it keeps between
    calls all under tmp_path (never the machine's /tmp ones); SITTING_SECONDS 60 unless given."""
    return {**os.environ, "OUT": str(tmp_path / "out"), "SITTING_DIR": str(tmp_path / "work"),
            "SITTING_SECONDS": "60", "SITTING_INDUCTOR_CACHE": str(tmp_path / "inductor"),
            "SITTING_TRITON_CACHE": str(tmp_path / "triton"), **extra}


def _fake_python3(tmp_path, body):
    """A folder holding an executable `python3` of that bash body, to put first on PATH."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "python3").write_text("#!/bin/bash\n" + body)
    (bin_dir / "python3").chmod(0o755)
    return bin_dir


def test_gpu_sitting_sweeps_only_tiles_the_benchmark_takes():
    """A tile the benchmark refuses would end the sitting's sweep call at its first launch, device
    time spent for nothing: every `--tiles` spec in the script parses, and is written the way
    the records name it (tile_spec), so that the sweep's records can be found by it."""
    import re

    from mpl_fast.kernels import softmax_common

    script = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_sitting.sh"
    script = script.read_text()
    lists = re.findall(r"--tiles ([^\s\\]+)", script)
    specs = [spec for tiles in lists for spec in tiles.split(",")]
    assert len(lists) >= 3 and "256:8192:16:512" in specs  # the ncu stage's two and the sweep's
    for spec in specs:
        assert softmax_common.tile_spec(softmax_common.parse_tile_spec(spec)) == spec


def test_gpu_sitting_script_refuses_unknown_stages_before_running_any(tmp_path):
    import subprocess

    script = _sitting_script(tmp_path)
    usage = subprocess.run(["bash", str(script)], capture_output=True, text=True)
    assert usage.returncode == 2 and "usage" in usage.stderr
    env = _sitting_env(tmp_path)
    bad = subprocess.run(["bash", str(script), "run", "tests", "bogus"], capture_output=True,
                         text=True, env=env)
    assert bad.returncode == 2 and "unknown stage bogus" in bad.stderr
    assert not (tmp_path / "work").exists() and not (tmp_path / "out").exists()  # nothing ran


def test_gpu_sitting_unpacks_carried_cifar10_once_for_later_calls(tmp_path):
    """CIFAR-10 travels packed (its 60000 files count as more than the 64 MiB carry limit
    unpacked); the first call unpacks it where the later calls on the warm machine find it."""
    import subprocess
    import tarfile

    script = _sitting_script(tmp_path)
    tree = tmp_path / "tree"
    (tree / "train" / "cat").mkdir(parents=True)
    (tree / "train" / "cat" / "0.jpg").write_bytes(b"jpeg")
    data = script.parent.parent / ".data"
    data.mkdir()
    with tarfile.open(data / "cifar10.tgz", "w:gz") as tar:
        tar.add(tree / "train", arcname="train")
    cifar = tmp_path / "cifar10"
    env = _sitting_env(tmp_path, SITTING_CIFAR=str(cifar))
    done = subprocess.run(["bash", str(script), "run", "gather"], capture_output=True,
                          text=True, env=env)
    assert done.returncode == 0, done.stderr
    assert "CIFAR-10 here" in done.stdout
    assert (cifar / "train" / "cat" / "0.jpg").read_bytes() == b"jpeg"
    assert not (tmp_path / "cifar10.partial").exists()
    (data / "cifar10.tgz").unlink()  # a later call carries other things: the tree is kept
    done = subprocess.run(["bash", str(script), "run", "gather"], capture_output=True,
                          text=True, env=env)
    assert done.returncode == 0 and "CIFAR-10 here" in done.stdout, done.stderr


def test_gpu_sitting_build_brings_its_own_setuptools_where_the_machines_is_too_old(tmp_path):
    """setup.py stops on a setuptools older than its MIN_SETUPTOOLS: the build stage installs
    the one `prepare` carried in .whl onto the sitting's path first where the machine's is
    older, and leaves the machine's alone where it is not; the script's minimum is setup.py's."""
    import runpy
    import subprocess

    root = Path(__file__).resolve().parent.parent
    minimum = runpy.run_path(str(root / "setup.py"), run_name="setup_under_test")["MIN_SETUPTOOLS"]
    script = _sitting_script(tmp_path)
    assert f"export MIN_SETUPTOOLS={minimum} " in script.read_text()
    log = tmp_path / "calls"
    # a python3 whose setuptools is FAKE_SITE's (the version check runs for real) and that logs
    # each pip call
    bin_dir = _fake_python3(tmp_path,
                            'if [ "$1" = -c ] && [[ "$2" == *setuptools* ]]; then\n'
                            f'  PYTHONPATH="$FAKE_SITE" exec {sys.executable} "$@"; fi\n'
                            '[ "$1" = -m ] && echo "$*" >> "$CALLS"\nexit 0\n')
    for version, brought in ((f"{minimum - 2}.8.0", True), (f"{minimum}.0.3", False),
                             (f"{minimum + 7}.2.1", False)):
        site = tmp_path / version / "setuptools"
        site.mkdir(parents=True)
        (site / "__init__.py").write_text(f"__version__ = {version!r}\n")
        log.write_text("")
        env = _sitting_env(tmp_path, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
                           FAKE_SITE=str(site.parent), CALLS=str(log))
        done = subprocess.run(["bash", str(script), "run", "build"], capture_output=True,
                              text=True, env=env)
        assert "stage build: rc=0" in done.stdout, done.stdout + done.stderr
        calls = log.read_text().splitlines()
        assert calls[-1].startswith("-m pip install --no-build-isolation") and calls[-1].endswith(
            "-e ."), calls
        want = [f"-m pip install -q --no-deps --no-index --find-links .whl --target "
                f"/tmp/sitting-site setuptools>={minimum}"] if brought else []
        assert calls[:-1] == want, (version, calls)


def test_gpu_sitting_spreads_the_gpu_tests_over_workers_when_xdist_is_carried(tmp_path):
    """The tests stage hands pytest `-n TEST_WORKERS` (8 unless set) where pytest-xdist imports,
    and runs in one process where it does not or one worker is asked for."""
    import subprocess

    script = _sitting_script(tmp_path)
    log = tmp_path / "pytest_args"
    # a python3 that has xdist or not (FAKE_XDIST) and logs how pytest was called
    bin_dir = _fake_python3(
        tmp_path,
        'if [ "$1" = -c ]; then [[ "$2" == *xdist* ]] && exit $((1 - FAKE_XDIST)); exit 0; fi\n'
        'echo "$*" > "$ARGS_LOG"\necho "= 1 passed in 0.01s ="\n')
    for xdist, workers, want in ((1, None, ["-n", "8"]), (1, "4", ["-n", "4"]), (1, "1", None),
                                 (0, None, None)):
        env = _sitting_env(tmp_path, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
                           FAKE_XDIST=str(xdist), ARGS_LOG=str(log))
        if workers:
            env["TEST_WORKERS"] = workers
        done = subprocess.run(["bash", str(script), "run", "tests"], capture_output=True,
                              text=True, env=env)
        assert done.returncode == 0 and "stage tests: rc=0" in done.stdout, done.stdout
        args = log.read_text().split()
        assert args[:2] == ["-m", "pytest"] and "gpu" in args and args[-1] == "tests/", args
        got = args[args.index("-n"):args.index("-n") + 2] if "-n" in args else None
        assert got == want, (xdist, workers, args)


def test_gpu_sitting_carries_compiled_kernels_from_one_sitting_to_the_next(tmp_path):
    """Packed caches carried in are unpacked without overwriting the warm machine's entries; a
    call whose stages compiled something sends the caches back beside its archive (inductor's
    autotune timings apart), one that compiled nothing does not, and caches that do not fit
    (COMPILE_CACHE_MIB, or what the archive leaves of the 64 MiB a call returns) stay behind,
    inductor's first."""
    import io
    import subprocess
    import tarfile

    script = _sitting_script(tmp_path)
    repo = script.parent.parent

    def packed(path, files):
        with tarfile.open(path, "w:gz") as tar:
            for name, data in files.items():
                info = tarfile.TarInfo(f"./{name}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))

    (repo / ".compile-cache").mkdir()
    packed(repo / ".compile-cache" / "triton.tar.gz",
           {"k1/soft_ce.cubin": b"carried", "k2/uda.cubin": b"carried, stale"})
    packed(repo / ".compile-cache" / "inductor.tar.gz", {"fxgraph/g/entry": b"graph"})
    triton, inductor = tmp_path / "triton", tmp_path / "inductor"
    (triton / "k2").mkdir(parents=True)
    (triton / "k2" / "uda.cubin").write_bytes(b"this machine's")
    (inductor / "cache").mkdir(parents=True)
    (inductor / "cache" / "timings").write_text("autotune")
    # the tests stage "compiles" one new kernel of NEW_BYTES (a python3 standing in for pytest)
    bin_dir = _fake_python3(
        tmp_path,
        'if [ "$1" = -c ]; then exit 1; fi\n'
        'd="$TRITON_CACHE_DIR/new$RANDOM$RANDOM"; mkdir -p "$d"; head -c "$NEW_BYTES" '
        '/dev/urandom > "$d/k.cubin"\necho "= 1 passed in 0.01s ="\n')
    out, runs = tmp_path / "out", tmp_path / "runs"

    def sitting(stage, **extra):
        env = _sitting_env(tmp_path, **{"SITTING_RUNS": str(runs), "NEW_BYTES": "100",
                                        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
                                        **extra})
        done = subprocess.run(["bash", str(script), "run", stage], capture_output=True,
                              text=True, env=env)
        assert done.returncode == 0, done.stdout + done.stderr
        files = sorted(out.iterdir())
        assert len(files) <= 8 and sum(f.stat().st_size for f in files) <= 64 * 2**20
        parts = [f.read_bytes() for f in files if f.name.startswith("compile-cache.tar.")]
        if not parts:
            return done.stdout, {}
        with tarfile.open(fileobj=io.BytesIO(b"".join(parts))) as tar:
            return done.stdout, {n: tar.extractfile(n).read() for n in tar.getnames()
                                 if n.endswith(".tar.gz")}

    def members(data):
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            return {n: tar.extractfile(n).read() for n in tar.getnames()
                    if tar.getmember(n).isfile()}

    stdout, back = sitting("tests")
    assert (triton / "k1" / "soft_ce.cubin").read_bytes() == b"carried"
    assert (triton / "k2" / "uda.cubin").read_bytes() == b"this machine's"
    assert (inductor / "fxgraph" / "g" / "entry").read_bytes() == b"graph"
    assert "2 Triton entries here at the start" in stdout and "Triton cache +1" in stdout
    assert set(back) == {"triton.tar.gz", "inductor.tar.gz"}
    kernels = members(back["triton.tar.gz"])
    assert kernels["./k2/uda.cubin"] == b"this machine's" and "./k1/soft_ce.cubin" in kernels
    assert len(kernels) == 3
    assert set(members(back["inductor.tar.gz"])) == {"./fxgraph/g/entry"}  # no ./cache

    # nothing compiled (the gather stage): nothing sent back
    stdout, back = sitting("gather")
    assert back == {} and "Triton cache +0" in stdout
    # over COMPILE_CACHE_MIB together, Triton's alone fits; then neither does
    (inductor / "fxgraph" / "big").write_bytes(os.urandom(3 * 2**20))
    stdout, back = sitting("tests", COMPILE_CACHE_MIB="2")
    assert set(back) == {"triton.tar.gz"}
    stdout, back = sitting("tests", COMPILE_CACHE_MIB="2", NEW_BYTES=str(3 * 2**20))
    assert back == {} and "not sent back" in stdout
    # a run of #8 (its last.pt, 58 MiB) leaves 5 MiB of what a call returns: Triton's 3 fit,
    # with inductor's 3 more they would not have
    (runs / "mpl").mkdir(parents=True)
    (runs / "mpl" / "last.pt").write_bytes(os.urandom(58 * 2**20))
    stdout, back = sitting("tests", METHODS="mpl", NEW_BYTES="100")
    assert set(back) == {"triton.tar.gz"}
    (runs / "mpl" / "last.pt").write_bytes(os.urandom(61 * 2**20))
    stdout, back = sitting("tests", METHODS="mpl", NEW_BYTES="100")
    assert back == {} and "not sent back" in stdout


def _bench_step_module():
    import runpy

    return runpy.run_path(str(Path(__file__).resolve().parent.parent / "benchmarks" /
                              "bench_step.py"))


def test_largest_batch_search_finds_the_limit_with_few_probes():
    largest_batch = _bench_step_module()["largest_batch"]
    for limit, start in ((37, 64), (1000, 64), (64, 64), (5, 1), (3000, 8)):
        probes = []

        def fits(b):
            probes.append(b)
            return b <= limit
        found = largest_batch(fits, start)
        assert found <= limit and limit - found <= max(1, limit // 32), (limit, found)
        assert len(probes) <= 2 * limit.bit_length() + 2, (limit, probes)
        assert len(set(probes)) == len(probes)  # no batch probed twice
    assert largest_batch(lambda b: False, 64) == 0  # not even one image fits
    assert largest_batch(lambda b: True, 64, cap=500) == 500


def test_bench_step_counts_what_each_variant_computes(tmp_path, capsys, monkeypatch):
    """--work-only counts each variant's conv and matmul GFLOPs without timing: the gradient-free
    weak view saves exactly the teacher's backward on the mu*B weak images, the reference does
    exactly one student forward on the labeled batch more than the floor, checkpointing adds
    the forwards it runs again; the timed record counts the same."""
    import argparse

    import torch

    from benchmarks import bench_step

    b, mu = 2, 3
    common = ["bench", "step", "--model", "wrn28_2", "--batch-size", str(b), "--mu", str(mu),
              "--image-size", "8", "--device", "cpu", "--out", str(tmp_path)]
    for extra in ([], ["--weak-no-grad"], ["--checkpoint", "both"]):
        assert cli.main([*common, "--work-only", *extra]) == 0
    assert not (tmp_path / "step.jsonl").exists()  # nothing timed
    monkeypatch.setenv("MPL_FAST_BACKEND", "triton")  # the loss kernels a GPU runs, interpreted
    assert cli.main([*common, "--work-only", "--weak-no-grad"]) == 0
    plain, weak_no_grad, checkpointed, triton = [
        json.loads(line)["gflops_by_variant"]
        for line in (tmp_path / "step_work.jsonl").read_text().splitlines()]
    assert triton == weak_no_grad
    args = argparse.Namespace(model="wrn28_2", num_classes=10)
    net = bench_step.networks(args, torch.device("cpu"))[0]
    x = torch.randn(b * mu, 3, 8, 8)
    forward = bench_step.gflops(lambda: net(x))
    teacher_backward = bench_step.gflops(lambda: net(x).sum().backward()) - forward
    assert teacher_backward > forward > 0
    assert plain["ours"] - weak_no_grad["ours"] == pytest.approx(teacher_backward, abs=2e-3)
    student_forward_l = bench_step.gflops(lambda: net(x[:b]))
    assert plain["reference"] - plain["floor"] == pytest.approx(student_forward_l, abs=2e-3)
    assert checkpointed["ours"] > plain["ours"]
    assert {k: v for k, v in checkpointed.items() if k != "ours"} == {
        k: v for k, v in plain.items() if k != "ours"}
    records = [json.loads(line) for line in (tmp_path / "step_work.jsonl").read_text()
               .splitlines()]
    assert not records[0]["weak_no_grad"]  # WRN-28-2 has BatchNorm: the joint forward
    record = records[1]
    assert record["weak_no_grad"] and record["device"] == "cpu"
    assert record["work_ratio_vs_reference"] == pytest.approx(
        weak_no_grad["reference"] / weak_no_grad["ours"], abs=1e-3)
    assert record["work_vs_floor"] == pytest.approx(
        weak_no_grad["ours"] / weak_no_grad["floor"], abs=1e-3)
    capsys.readouterr()
    assert cli.main([*common, "--weak-no-grad", "--steps", "1", "--warmup", "0"]) == 0
    timed = json.loads((tmp_path / "step.jsonl").read_text())
    assert timed["gflops_by_variant"] == weak_no_grad
    assert timed["work_ratio_vs_reference"] == record["work_ratio_vs_reference"]
    assert any(line.startswith("work (conv and matmul GFLOPs")
               for line in capsys.readouterr().out.splitlines())


def test_bench_step_runs_ours_with_the_trainers_default_weak_view(tmp_path):
    """Without --weak-no-grad, ours takes the weak view as mpl.teacher_weak_no_grad 'auto' does:
    apart for a teacher without BatchNorm (the mlp: the same work as with the flag, and as with
    'joint' and 'shared', which take the forward apart there too), in the joint forward for one
    with it (the WRN case is in the test above)."""
    common = ["bench", "step", "--model", "mlp", "--batch-size", "2", "--mu", "3",
              "--image-size", "8", "--device", "cpu", "--work-only", "--out", str(tmp_path)]
    for extra in ([], ["--weak-no-grad"], ["--weak-no-grad", "joint"],
                  ["--weak-no-grad", "shared"]):
        assert cli.main([*common, *extra]) == 0
    records = [json.loads(line) for line in (tmp_path / "step_work.jsonl").read_text()
               .splitlines()]
    assert [r["weak_no_grad"] for r in records] == [True] * 4  # what the step ran
    assert all(r["gflops_by_variant"] == records[0]["gflops_by_variant"] for r in records)


def test_bench_step_weak_view_in_the_joint_forward_without_autograd(tmp_path, capsys):
    """--weak-no-grad joint: a BatchNorm teacher's weak view in the joint forward with its rows
    outside autograd, and --weak-no-grad shared, apart with the other views' statistics, each
    counted as the forward apart's work (and less than the joint forward's); any other word
    after the flag is refused."""
    common = ["bench", "step", "--model", "small_cnn", "--batch-size", "2", "--mu", "3",
              "--image-size", "8", "--device", "cpu", "--work-only", "--out", str(tmp_path)]
    for extra in ([], ["--weak-no-grad"], ["--weak-no-grad", "joint"],
                  ["--weak-no-grad", "shared"]):
        assert cli.main([*common, *extra]) == 0
    joint_forward, apart, rows_constant, shared = [
        json.loads(line) for line in (tmp_path / "step_work.jsonl").read_text().splitlines()]
    assert [r["weak_no_grad"] for r in (joint_forward, apart, rows_constant, shared)] == [
        False, True, "joint", "shared"]
    assert rows_constant["gflops_by_variant"]["ours"] == apart["gflops_by_variant"]["ours"] \
        == shared["gflops_by_variant"]["ours"] < joint_forward["gflops_by_variant"]["ours"]
    with pytest.raises(SystemExit):
        cli.main([*common, "--weak-no-grad", "apart"])
    assert "invalid choice: 'apart'" in capsys.readouterr().err


def test_bench_step_keeps_its_timings_when_the_work_count_fails(tmp_path, capsys, monkeypatch):
    """The count runs after every variant is timed; should it fail (a mode FlopCounterMode cannot
    follow), the record is still written, its work fields empty, and the run says why."""
    from benchmarks import bench_step

    def broken(*args, **kwargs):
        raise RuntimeError("cannot count this")
    monkeypatch.setattr(bench_step, "step_work", broken)
    assert bench_step.main(["--model", "small_cnn", "--batch-size", "2", "--mu", "1",
                            "--image-size", "8", "--steps", "1", "--warmup", "0", "--device",
                            "cpu", "--out", str(tmp_path)]) == 0
    record = json.loads((tmp_path / "step.jsonl").read_text())
    assert record["ms_per_step"] > 0 and record["reference_ms_per_step"] > 0
    assert record["gflops_by_variant"] is None and record["work_ratio_vs_reference"] is None
    assert "work not counted: RuntimeError: cannot count this" in capsys.readouterr().out


def test_bench_step_checkpointing_is_recorded_and_refused_without_blocks(tmp_path, capsys):
    common = ["bench", "step", "--batch-size", "2", "--mu", "1", "--image-size", "8", "--steps",
              "1", "--warmup", "0", "--no-reference", "--device", "cpu", "--out", str(tmp_path)]
    assert cli.main([*common, "--model", "wrn28_2", "--checkpoint", "both"]) == 0
    record = json.loads((tmp_path / "step.jsonl").read_text())
    assert record["checkpoint"] == "both" and record["ms_per_step"] > 0
    assert record["checkpoint_blocks"] is None  # all of them
    assert record["cudnn_benchmark"] is False
    import torch

    before = torch.backends.cudnn.benchmark
    assert cli.main([*common, "--model", "small_cnn", "--cudnn-benchmark"]) == 0
    assert json.loads((tmp_path / "step.jsonl").read_text().splitlines()[-1])["cudnn_benchmark"]
    assert torch.backends.cudnn.benchmark == before  # a global flag, set back after the run
    assert record["max_batch_size"] is None and record["activation_mem_gib"] is None  # no GPU
    assert cli.main([*common, "--model", "wrn28_2", "--checkpoint", "teacher",
                     "--checkpoint-blocks", "4"]) == 0
    record = json.loads((tmp_path / "step.jsonl").read_text().splitlines()[-1])
    assert record["checkpoint"] == "teacher" and record["checkpoint_blocks"] == 4
    (tmp_path / "step.jsonl").unlink()
    capsys.readouterr()
    for bad in (["--checkpoint-blocks", "4"], ["--checkpoint", "both", "--checkpoint-blocks", "0"]):
        with pytest.raises(SystemExit):
            cli.main([*common, "--model", "wrn28_2", *bad])
        assert "--checkpoint-blocks needs" in capsys.readouterr().err
    assert not (tmp_path / "step.jsonl").exists()
    assert cli.main([*common, "--model", "small_cnn", "--checkpoint", "teacher"]) == 2
    assert "small_cnn has no blocks to checkpoint (WRN or ResNet blocks, or a Sequential" \
        in capsys.readouterr().err
    assert not (tmp_path / "step.jsonl").exists()  # nothing appended
    with pytest.raises(SystemExit):  # argparse: one line, exit 2
        cli.main([*common, "--model", "small_cnn", "--max-batch"])
    assert "--max-batch needs a CUDA device" in capsys.readouterr().err


def test_gpu_sitting_stages_share_one_deadline_and_come_back_in_one_archive(tmp_path):
    import subprocess
    import tarfile

    script = _sitting_script(tmp_path)
    # inductor's autotune timings: one carried in from a past sitting, one the warm machine has
    # from an earlier call (it wins over a carried file of the same name)
    carried = script.parent.parent / ".autotune"
    carried.mkdir()
    (carried / "h100-timings").write_text("carried")
    (carried / "h200-timings").write_text("carried, older")
    cache = tmp_path / "inductor" / "cache"
    cache.mkdir(parents=True)
    (cache / "h200-timings").write_text("this machine's")
    # a run of #8 on the warm machine: its last.pt (incompressible, 20 MiB) comes back, its
    # best.pt does not, and a method not named in METHODS stays behind
    runs = tmp_path / "runs"
    for method in ("mpl", "uda"):
        (runs / method).mkdir(parents=True)
        (runs / method / "last.pt").write_bytes(os.urandom(20 * 2**20))
        (runs / method / "best.pt").write_bytes(b"best")
        (runs / method / "metrics.jsonl").write_text('{"step": 500}\n')
    (runs / "methods.png").write_bytes(b"curves")
    env = _sitting_env(tmp_path, SITTING_SECONDS="15", SITTING_RUNS=str(runs), METHODS="mpl")
    done = subprocess.run(["bash", str(script), "run", "tests", "ops"], capture_output=True,
                          text=True, env=env)
    assert done.returncode == 0, done.stderr
    # under 20 s left for each stage: both skipped, neither started
    assert "stage tests: skipped" in done.stdout and "stage ops: skipped" in done.stdout
    assert not (tmp_path / "work" / "tests.log").exists()
    # parts a device call can return: 15 MiB each, numbered
    parts = sorted((tmp_path / "out").iterdir())
    assert [p.name for p in parts] == ["sitting.tar.gz.00", "sitting.tar.gz.01"]
    assert all(p.stat().st_size <= 15 * 2**20 for p in parts)
    assert (cache / "h100-timings").read_text() == "carried"
    joined = tmp_path / "sitting.tar.gz"
    joined.write_bytes(b"".join(p.read_bytes() for p in parts))
    with tarfile.open(joined) as tar:
        names = set(tar.getnames())
        summary = tar.extractfile("./summary.txt").read().decode()
        timings = {name: tar.extractfile(f"./autotune/{name}").read().decode()
                   for name in ("h100-timings", "h200-timings")}
        last = tar.extractfile("methods/mpl/last.pt").read()
    assert summary.count("skipped") == 2
    assert timings == {"h100-timings": "carried", "h200-timings": "this machine's"}
    assert last == (runs / "mpl" / "last.pt").read_bytes()
    assert "methods/mpl/metrics.jsonl" in names and "methods/mpl/best.pt" not in names
    assert "methods/methods.png" in names  # the curves of the runs so far
    assert not any(n.startswith("methods/uda") for n in names)


@pytest.mark.gpu
def test_bench_ops_times_graph_replays_on_a_gpu(tmp_path):
    """The GPU-time column: each variant captured and replayed (bench ops' own path on CUDA)."""
    assert cli.main(["bench", "ops", "--shapes", "130x1000", "--dtypes", "bfloat16",
                     "--tiles", "1024:4096:8,4096:4096:8", "--device", "cuda", "--kernels",
                     "--out", str(tmp_path)]) == 0
    rows = [json.loads(line) for line in (tmp_path / "ops.jsonl").read_text().splitlines()]
    assert len(rows) == 6
    kernel = {"soft_cross_entropy": "_soft_cross_entropy_kernel", "uda_loss": "_uda_loss_kernel",
              "pseudo_labels": "_pseudo_labels_kernel"}
    for r in rows:
        # --kernels: on a GPU the device kernels, ours' Triton kernel among them
        assert any(kernel[r["op"]] in name for name, _ in r["kernels"]["ours"]), r["kernels"]
        assert set(r["kernels"]) == {"ours", "eager", "compile"}
        # and our kernel's own time apart from the small ones around it
        assert 0 < r["own_kernel_us"] <= r["graph_ms"] * 1e3, r
        assert 0 < r["own_kernel_bandwidth_fraction"] and r["other_kernels_us"] >= 0, r
        for key in ("graph_ms", "eager_graph_ms", "compile_graph_ms"):
            assert r[key] is not None and r[key] > 0, (r["op"], key)
        assert r["graph_timed"]  # the ratios come from the GPU times (rounded in the record)
        assert r["speedup_vs_eager"] == pytest.approx(r["eager_graph_ms"] / r["graph_ms"],
                                                      rel=0.03, abs=0.01)


def test_bench_ops_profiler_range_needs_a_cuda_device(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["bench", "ops", "--profiler-range", "--device", "cpu", "--out", str(tmp_path)])
    assert exit_.value.code != 0
    err = capsys.readouterr().err
    assert "--profiler-range" in err and "not a CUDA device" in err
    assert not (tmp_path / "ops.jsonl").exists()


@pytest.mark.gpu
def test_bench_ops_profiler_range_profiles_each_case_once_on_a_gpu(tmp_path, capsys,
                                                                   monkeypatch):
    """One call of ours per case and tile inside a profiler range (what ncu profiles), after
    its warm-up calls outside it; nothing timed or written."""
    import torch

    ranges = []
    monkeypatch.setattr(torch.cuda, "cudart", lambda: type("R", (), {
        "cudaProfilerStart": staticmethod(lambda: ranges.append("start")),
        "cudaProfilerStop": staticmethod(lambda: ranges.append("stop"))})())
    assert cli.main(["bench", "ops", "--profiler-range", "--shapes", "130x1000,3x9000",
                     "--dtypes", "bfloat16", "--tiles", "256:4096:8:512,256:4096:8:512:s2",
                     "--device", "cuda", "--out", str(tmp_path)]) == 0
    assert ranges == ["start", "stop"] * 12  # 2 shapes x 3 ops x 2 tiles
    out = capsys.readouterr().out
    assert "profiled uda_loss 3x9000 bfloat16 tile 256:4096:8:512:s2" in out
    assert not (tmp_path / "ops.jsonl").exists()


@pytest.mark.gpu
def test_bench_step_graphs_the_floor_and_the_reference_on_a_gpu(tmp_path):
    assert cli.main(["bench", "step", "--model", "small_cnn", "--batch-size", "8", "--mu", "2",
                     "--image-size", "16", "--steps", "3", "--warmup", "2", "--no-compiled",
                     "--device", "cuda", "--out", str(tmp_path)]) == 0
    record = json.loads((tmp_path / "step.jsonl").read_text())
    assert record["graph"] is True and record["floor_graph"] is True
    assert record["graphed_reference_ms_per_step"] > 0 and record["ms_per_step"] > 0
    assert record["activation_mem_gib"] is not None
    # graphed variants count their capture in their peak, ours and the reference alike (the
    # reference's was counted after it, a sixth of ours in the second sitting)
    peaks = record["peak_mem_gib_by_variant"]
    assert peaks["graphed_reference"] > 0.5 * peaks["ours"], peaks
    assert peaks["floor"] > 0.25 * peaks["ours"], peaks
    # the backward kernels (launched from autograd's device thread) are in their phases: the
    # first sitting's ranges showed the teacher's backward + step at 4% of its forward
    phases = record["phases_ms"]
    assert phases["teacher_backward_step"] > 0.5 * phases["teacher_forward"], phases
    assert phases["other"] < 0.1 * sum(phases.values()), phases
    assert all(v > 0 for v in record["host_phases_ms"].values()), record["host_phases_ms"]
    kernel_ms = record["kernel_ms"]
    assert set(kernel_ms) == {"ours", "floor", "reference", "graphed_reference"}
    # the graph removes launch gaps, not work: the graphed step is not faster than its kernels
    assert record["ms_per_step"] > 0.8 * kernel_ms["ours"], (record["ms_per_step"], kernel_ms)


def test_bench_ops_ratios_never_mix_gpu_and_host_times():
    import runpy

    import torch

    record = runpy.run_path(str(Path(__file__).resolve().parent.parent / "benchmarks" /
                                "bench_ops.py"))["record"]
    tile = (1024, 4096, 8, False, 512, 1, 1, 0, False)
    # ours could not be captured: every ratio from host times
    r = record({}, "op", 2, 3, torch.float32, tile, (0.5, None),
               {"eager": (0.4, 0.02), "compile": (0.3, 0.01)}, 1e6, 1e12)
    assert not r["graph_timed"] and r["speedup_vs_eager"] == 0.8
    assert r["speedup_vs_compile"] == 0.6
    # all captured but the compiled one: GPU times, and no compile ratio rather than a mixed one
    r = record({}, "op", 2, 3, torch.float32, tile, (0.5, 0.01),
               {"eager": (0.4, 0.02), "compile": (0.3, None)}, 1e6, 1e12)
    assert r["graph_timed"] and r["speedup_vs_eager"] == 2.0 and r["speedup_vs_compile"] is None
    assert r["GBps"] == 100.0  # 1e6 bytes in 0.01 ms


def test_phase_breakdown_of_a_real_step_covers_its_backwards(monkeypatch):
    """On a CPU: the phases of one real MPL step hold nearly all its op time, and the teacher's
    backward (a forward's worth of work or more) is not lost to the thread that ran it. (The
    plain-torch losses: interpreted Triton kernels would dominate the forward's time.)"""
    import argparse

    import torch

    monkeypatch.setenv("MPL_FAST_BACKEND", "torch")

    mod = _bench_step_module()
    args = argparse.Namespace(model="small_cnn", num_classes=10, batch_size=8, mu=2,
                              image_size=16, checkpoint="none", compile="none",
                              estimator="loss_diff", weak_no_grad=False,
                              ce_old_forward="separate")
    device = torch.device("cpu")
    step = mod["our_step"](args, device)
    batch = mod["make_batch"](args, device, torch.Generator().manual_seed(0))
    step(batch, 0)
    # op times on a shared 2-core machine: one intra-op thread (two, with another process busy,
    # once stalled each other into a teacher forward of 83 ms against its usual 6), and the
    # median of three steps, so that one stalled op does not decide the test
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        runs = [mod["phase_breakdown"](lambda: step(batch, 0), device) for _ in range(3)]
    finally:
        torch.set_num_threads(threads)
    phases = {k: sorted(r[k] for r in runs)[1] for k in runs[0]}
    assert set(phases) == {"teacher_forward", "student_forward_backward_step",
                           "student_new_forward", "feedback", "teacher_backward_step", "other"}
    assert phases["other"] < 0.1 * sum(phases.values()), phases
    assert phases["teacher_backward_step"] > 0.5 * phases["teacher_forward"], phases


def test_every_gpu_sitting_stage_has_its_function():
    """A stage named in LIMIT without its stage_<name> function would fail on the GPU machine
    (command not found) and waste the call: caught here."""
    import re

    text = (Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_sitting.sh").read_text()
    limits = re.search(r"declare -A LIMIT=\((.*?)\)\n", text, re.S).group(1)
    stages = re.findall(r"\[([a-z-]+)\]=\d+", limits)
    assert len(stages) >= 10
    for stage in stages:
        assert re.search(rf"^stage_{stage.replace('-', '_')}\(\) \{{", text, re.M), stage
    usage = re.search(r"usage: .*run \[([^\]]*)\]", text).group(1).split()
    assert sorted(usage) == sorted(stages)  # the usage line names every stage


def _sitting_bench_commands():
    """Every `mpl-fast bench ...` command of gpu_sitting.sh: its argv after `bench`, the
    continuation lines joined, cut at the shell's && || ; and the variables replaced."""
    import re
    import shlex

    text = (Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_sitting.sh").read_text()
    joined = text.replace("\\\n", " ")
    out = []
    for line in joined.splitlines():
        at = line.find("mpl-fast bench ")
        if at < 0 or line.lstrip().startswith("#"):
            continue
        command = re.split(r"&&|\|\||;", line[at:])[0]
        command = re.sub(r"\$\{[A-Z_]+:-\}", "", command)  # optional extras: none
        command = re.sub(r"\$\{?[A-Z_]+\}?", "x", command)
        out.append(shlex.split(command)[2:])
    return out


def test_every_bench_command_of_the_gpu_sitting_parses(monkeypatch):
    """A flag the benchmark does not know (or a bad --variant) would end a GPU call at once and
    waste it: each command is parsed by its benchmark's own parser here, without running."""
    import argparse
    import runpy

    class Parsed(Exception):
        pass

    parse = argparse.ArgumentParser.parse_args

    def parse_only(self, args=None, namespace=None):
        raise Parsed(parse(self, args, namespace))

    commands = _sitting_bench_commands()
    assert {argv[0] for argv in commands} == {"ops", "step", "data", "methods"}
    assert len(commands) >= 20
    root = Path(__file__).resolve().parent.parent / "benchmarks"
    modules = {what: runpy.run_path(str(root / f"bench_{what}.py"))
               for what in ("ops", "step", "data", "methods")}
    mains = {what: module["main"] for what, module in modules.items()}
    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_only)
    for argv in commands:
        try:
            mains[argv[0]](argv[1:])
        except Parsed as parsed:
            if argv[0] == "ops":  # bench ops' own checks of its lists, made after parse_args
                args = parsed.args[0]
                ops_module = modules["ops"]
                for option, parser_name in (("tiles", "parse_tile"), ("shapes", "parse_shape"),
                                            ("dtypes", "parse_dtype")):
                    for value in getattr(args, option).split(","):
                        ops_module[parser_name](value)  # raises on a bad one
            if argv[0] == "data":  # bench data's own check, made after it indexes the files
                args = parsed.args[0]
                for v in args.variant or []:
                    assert (args.batch_size * args.mu) % v.get("pipelines", 1) == 0, (
                        f"gpu_sitting.sh: pipelines={v['pipelines']} does not divide the "
                        f"unlabeled batch of `mpl-fast bench {' '.join(argv)}`")
            continue
        except SystemExit:
            pytest.fail(f"gpu_sitting.sh: the parser refused `mpl-fast bench {' '.join(argv)}`")
        pytest.fail("the parser was not reached")
    with pytest.raises(SystemExit):  # and the check itself can fail
        mains["data"](["--root", "x", "--variant", "decode=twice"])


def test_the_gpu_sittings_placement_runs_are_valid_configs():
    """Each placement of stage_placements is a `mpl-fast train` run of cifar10_4k_short with the
    speed settings: every --set there must be a key and value the config accepts, and the
    profiled window must end inside the run, or the GPU call is wasted."""
    import re
    import shlex

    from mpl_fast.cli import build_parser
    from mpl_fast.train import config as cfg

    text = (Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_sitting.sh").read_text()
    placements = re.findall(r'"([a-z0-9-]+):([^"]*)"',
                            re.search(r"PLACEMENTS=\((.*?)\)\n", text, re.S).group(1))
    assert [name for name, _ in placements][0] == "preset" and len(placements) >= 3
    body = re.search(r"^stage_placements\(\) \{\n(.*?)\n\}", text, re.S | re.M).group(1)
    command = re.search(r"(mpl-fast train .*?)\|\|", body.replace("\\\n", " "), re.S).group(1)
    command = re.sub(r'\$\{sets\[@\]\+"\$\{sets\[@\]\}"\}', "", command)
    command = command.replace("${PLACEMENT_ARGS:-}", "")
    command = re.sub(r'"?\$[A-Za-z_{}]+"?', "x", command)
    args = build_parser().parse_args(shlex.split(command)[1:])
    assert args.config == "cifar10_4k_short" and args.overwrite
    for name, sets in placements:
        config = cfg.load(args.config, [*args.set, *sets.split()])
        t = config["train"]
        assert t["cuda_graph"] is True and config["model"]["compile"] == "default", name
        assert t["profile_from"] + args.profile <= args.steps, name
    assert cfg.load(args.config, args.set + ["data.unlabeled_pipelines=8"])  # a known key


def test_gpu_sittings_methods_and_placements_stages_run_end_to_end_on_the_cpu(tmp_path):
    """Plan G's call 6 (`run methods placements` with METHODS=supervised) through the script on
    tiny runs: each stage must end with rc=0, the supervised record and a record for each
    placement run (two of the four here: SITTING_PLACEMENTS; ~10 s a run on the CPU) land in the
    archive, each named with its own --set options. The GPU settings the stages fix (graph,
    compiled networks, 400 steps) are overridden for the CPU by METHODS_ARGS and PLACEMENT_ARGS,
    which go after them."""
    pytest.importorskip("nvidia.dali")
    import re
    import shutil
    import subprocess
    import sys
    import tarfile

    from PIL import Image

    script = _sitting_script(tmp_path)
    shutil.copy(Path(__file__).resolve().parent.parent / "benchmarks" / "placement_record.py",
                script.parent)
    cifar = tmp_path / "cifar"
    for split, per_class in (("train", 8), ("test", 2)):
        for c in range(3):
            (cifar / split / f"class{c}").mkdir(parents=True)
            for i in range(per_class):
                colour = (40 + 60 * c, 20 + 25 * i, 200 - 50 * c)
                Image.new("RGB", (16, 16), colour).save(cifar / split / f"class{c}" / f"{i}.jpg")
    tiny = ("--set data.image_size=16 --set data.labeled_per_class=2 --set data.batch_size=4 "
            "--set data.mu=2 --set data.num_threads=1 --set data.cutout=4 "
            "--set model.teacher=mlp --set model.student=mlp "
            "--set train.device=cpu --set model.compile=none --set train.finetune_steps=0 "
            "--set optim.warmup_steps=1 --set mpl.uda_ramp_steps=2 --set train.eval_batch_size=8")
    env = _sitting_env(
        tmp_path, SITTING_SECONDS="300", SITTING_CIFAR=str(cifar),
        SITTING_RUNS=str(tmp_path / "runs"),
        METHODS="supervised",
        METHODS_ARGS=f"{tiny} --set train.cuda_graph=emulate --set train.steps=4 "
                     "--set train.eval_every=2",
        PLACEMENT_ARGS=f"{tiny} --set train.cuda_graph=emulate --steps 6 --profile 2 "
                       "--set train.profile_from=3",
        SITTING_PLACEMENTS="augment-cpu,steps-per-run-8",
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    done = subprocess.run(["bash", str(script), "run", "methods", "placements"],
                          capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    lines = re.findall(r"^stage (\w+): rc=(\d+)", done.stdout, re.M)
    assert lines == [("methods", "0"), ("placements", "0")], (
        done.stdout, (tmp_path / "work" / "placements.log").read_text()[-3000:])
    joined = tmp_path / "sitting.tar.gz"
    joined.write_bytes(b"".join(p.read_bytes() for p in sorted((tmp_path / "out").iterdir())
                                if p.name.startswith("sitting.tar.gz.")))
    with tarfile.open(joined) as tar:
        methods = tar.extractfile("./results/methods.jsonl").read().decode().splitlines()
        placements = tar.extractfile("./results/placements.jsonl").read().decode().splitlines()
    assert [json.loads(line)["method"] for line in methods] == ["supervised"]
    records = [json.loads(line) for line in placements]
    assert [r["placement"] for r in records] == ["augment-cpu", "steps-per-run-8"]
    assert records[0]["sets"] == ["data.augment_device=cpu", "data.unlabeled_pipelines=8",
                                  "data.num_threads=2"]
    assert records[1]["sets"] == ["data.steps_per_run=8"]
    for r in records:
        assert r["wall_ms_per_step"] > 0 and r["profiled_steps"] == [4, 5] and r["gpu"] == "cpu"


def test_import_sitting_files_records_runs_and_caches_where_they_belong(tmp_path, capsys):
    """benchmarks/import_sitting.py on two calls' returned files: logs and autotune timings into
    the sitting's folder, records appended once (a record two calls sent is added once, one the
    checkout holds is not added), runs into runs/methods with their checkpoint and into the
    sitting without it, the compile cache into .compile-cache; a call without its archive, or
    with a part missing, stops it before anything is written."""
    import io
    import runpy
    import tarfile

    main = runpy.run_path(str(Path(__file__).resolve().parent.parent / "benchmarks" /
                              "import_sitting.py"))["main"]
    repo = tmp_path / "repo"
    (repo / "benchmarks" / "results").mkdir(parents=True)
    old = json.dumps({"op": "uda_loss", "ms": 1.0})
    (repo / "benchmarks" / "results" / "ops.jsonl").write_text(old + "\n")

    def tar_of(files, gz=True):
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w:gz" if gz else "w") as tar:
            for name, data in files.items():
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        return buffer.getvalue()

    new = json.dumps({"op": "pseudo_labels", "ms": 2.0})
    calls = []
    for k, files in enumerate([
            {"./summary.txt": b"stage build: rc=0", "./build.log": b"built",
             "./results/ops.jsonl": f"{old}\n{new}\n".encode(),
             "./autotune/h200.json": b"{}"},
            {"./summary.txt": b"stage methods: rc=0", "./results/ops.jsonl": f"{new}\n".encode(),
             "./results/methods.jsonl": b'{"method": "supervised"}\n',
             "methods/supervised/last.pt": b"checkpoint",
             "methods/supervised/metrics.jsonl": b'{"step": 1}\n',
             "methods/supervised/summary.json": b"{}"}], 1):
        call = tmp_path / f"call{k}"
        call.mkdir()
        archive = tar_of(files)
        (call / "sitting.tar.gz.00").write_bytes(archive[:100])
        (call / "sitting.tar.gz.01").write_bytes(archive[100:])
        calls.append(call)
    (calls[1] / "compile-cache.tar.00").write_bytes(
        tar_of({"triton.tar.gz": b"kernels"}, gz=False))

    base = ["--repo", str(repo), "--name", "2026-11-28-h200"]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main([*base, str(calls[0]), str(empty)]) == 2
    cut = tmp_path / "cut"
    cut.mkdir()
    (cut / "sitting.tar.gz.00").write_bytes((calls[0] / "sitting.tar.gz.00").read_bytes())
    assert main([*base, str(cut)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and "no sitting.tar.gz" in err[0] and "part missing" in err[1], err
    assert not (repo / "benchmarks" / "results" / "sittings").exists()

    assert main([*base, *map(str, calls)]) == 0
    sitting = repo / "benchmarks" / "results" / "sittings" / "2026-11-28-h200"
    assert (sitting / "call1" / "build.log").read_text() == "built"
    assert (sitting / "call2" / "summary.txt").read_text() == "stage methods: rc=0"
    assert (sitting / "call1" / "autotune" / "h200.json").exists()
    assert (repo / ".autotune" / "h200.json").exists()
    results = repo / "benchmarks" / "results"
    assert (results / "ops.jsonl").read_text().splitlines() == [old, new]
    assert (results / "methods.jsonl").read_text() == '{"method": "supervised"}\n'
    assert (repo / "runs" / "methods" / "supervised" / "last.pt").read_bytes() == b"checkpoint"
    assert (sitting / "call2" / "methods" / "supervised" / "metrics.jsonl").exists()
    assert not (sitting / "call2" / "methods" / "supervised" / "last.pt").exists()
    assert not (sitting / "call2" / "results").exists()
    assert (repo / ".compile-cache" / "triton.tar.gz").read_bytes() == b"kernels"
    out = capsys.readouterr().out
    assert "call 1: ops.jsonl: 1 new record(s)" in out and "call 2: ops.jsonl: 0 new" in out
    assert main([*base, str(calls[0])]) == 2  # the name is taken now
    assert "exists already" in capsys.readouterr().err
