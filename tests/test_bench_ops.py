"""The ops benchmark runs end to end and records what the issue asks for (numbers on a CPU
through the Triton interpreter mean nothing; the figures come from GPU runs)."""
import json
import os
from pathlib import Path

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
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("summary:")


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
    assert record["compile"] == "none" and record["graph"] is False
    assert set(record["phases_ms"]) == {"teacher_forward", "student_forward_backward_step",
                                        "student_new_forward", "feedback",
                                        "teacher_backward_step"}
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("summary:")


def test_gpu_sitting_script_refuses_unknown_stages_before_running_any(tmp_path):
    import subprocess

    script = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_sitting.sh"
    usage = subprocess.run(["bash", str(script)], capture_output=True, text=True)
    assert usage.returncode == 2 and "usage" in usage.stderr
    bad = subprocess.run(["bash", str(script), "run", "tests", "bogus"], capture_output=True,
                         text=True, env={**os.environ, "OUT": str(tmp_path)})
    assert bad.returncode == 2 and "unknown stage bogus" in bad.stderr
    assert not (tmp_path / "tests.log").exists()  # the valid stage before it did not run
