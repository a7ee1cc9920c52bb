"""benchmarks/dali_conditionals.py: what DALI's if/else routing costs a sample (CPU)."""
import json
import runpy
import time
from pathlib import Path

import pytest

pytest.importorskip("nvidia.dali")

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "dali_conditionals.py"


def test_it_records_a_rate_per_count_and_threads_and_the_routing_costs(tmp_path, capsys):
    main = runpy.run_path(str(SCRIPT))["main"]
    assert main(["--ifs", "8", "--threads", "1", "--batch", "64", "--runs", "3",
                 "--repeats", "2", "--out", str(tmp_path)]) == 0
    records = [json.loads(r) for r in
               (tmp_path / "dali_conditionals.jsonl").read_text().splitlines()]
    assert [(r["ifs"], r["threads"]) for r in records] == [(0, 1), (8, 1)]  # 0: the baseline
    base, routed = records
    assert base["us_per_sample_per_if"] is None
    assert (base["runs"], base["repeats"]) == (routed["runs"], routed["repeats"]) == (3, 2)
    # the cost is the difference of the two rates' reciprocals spread over the eight if/else;
    # which rate is higher is a measurement (a busy CI machine can flip it), so it is not tested
    assert base["samples_per_s"] > 0 and routed["samples_per_s"] > 0
    expected = (1 / routed["samples_per_s"] - 1 / base["samples_per_s"]) / 8 * 1e6
    assert routed["us_per_sample_per_if"] == pytest.approx(expected, rel=1e-3, abs=0.02)
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("summary: one if/else")


@pytest.mark.parametrize("bad", [["--ifs", "a"], ["--ifs", "-1"], ["--threads", "0"],
                                 ["--runs", "0"], ["--repeats", "0"]])
def test_bad_input_exits_2(bad, tmp_path):
    main = runpy.run_path(str(SCRIPT))["main"]
    with pytest.raises(SystemExit) as err:
        main(bad + ["--out", str(tmp_path)])
    assert err.value.code == 2
    assert not (tmp_path / "dali_conditionals.jsonl").exists()


def test_rates_time_the_pipelines_in_turn_and_keep_each_ones_best_round():
    rates = runpy.run_path(str(SCRIPT))["rates"]
    calls = []

    class Pipe:
        def __init__(self, name, slow_rounds):
            self.name, self.slow_rounds = name, slow_rounds

        def run(self):
            calls.append(self.name)
            if self.slow_rounds:  # a busy machine, for this pipeline's first round alone
                self.slow_rounds -= 1
                time.sleep(0.05)

    best = rates([Pipe("a", 1), Pipe("b", 0)], batch=1, runs=1, repeats=3)
    assert calls == ["a", "b"] * 3
    assert best[0] > 100  # the slow round (at most 20 samples/s) did not count
