"""The ops benchmark runs end to end and records what the issue asks for (numbers on a CPU
through the Triton interpreter mean nothing; the figures come from GPU runs)."""
import json

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


def test_bench_unbuilt_parts_fail_cleanly(capsys):
    assert cli.main(["bench", "step"]) == 2
    assert "not built yet" in capsys.readouterr().err
