import json
import subprocess
import sys

from mpl_fast.data.two_moons import two_moons


def test_two_moons_data_is_seeded_and_balanced():
    a, b = two_moons(3), two_moons(3)
    assert a.x.shape == (2000, 2) and a.labeled.numel() == 6
    assert sorted(a.y[a.labeled].tolist()) == [0, 0, 0, 1, 1, 1]
    assert (a.labeled == b.labeled).all() and (a.x == b.x).all()


def test_two_moons_command_writes_metrics_and_figure(tmp_path):
    out = tmp_path / "moons"
    proc = subprocess.run([sys.executable, "-m", "mpl_fast.cli", "two-moons", "--seed", "2",
                           "--steps", "30", "--out", str(out)], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("supervised_acc", "pseudo_label_acc", "mpl_acc"):
        assert 0.0 <= metrics[key] <= 1.0
    assert metrics["seed"] == 2 and metrics["steps"] == 30
    png = (out / "two_moons.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10000
    assert not list(out.glob("*.tmp*"))


def test_two_moons_bad_input_exits_nonzero(tmp_path, capsys):
    from mpl_fast import cli

    for args in (["--steps", "0"], ["--set", "estimator=bogus"], ["--set", "nokey=1"],
                 ["--set", "noequals"], ["--preset", "nope"]):
        assert cli.main(["two-moons", "--out", str(tmp_path / "x"), *args]) == 2, args
        err = capsys.readouterr().err
        assert err.startswith("mpl-fast: error:") and err.count("\n") == 1, (args, err)
        assert not (tmp_path / "x" / "metrics.json").exists()
