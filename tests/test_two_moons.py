import json
import subprocess
import sys

import pytest
import torch

from mpl_fast.data.two_moons import two_moons


@pytest.fixture(autouse=True)
def plain_torch_ops(monkeypatch):
    # These tests are about the experiment, not the kernels (tested on their own): the Triton
    # interpreter would make each tiny MPL step take ~100x longer.
    monkeypatch.setenv("MPL_FAST_BACKEND", "torch")


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
    assert "uda_teacher_acc" not in metrics and metrics["uda_noise"] == 0.0
    check = metrics["objective_check"]
    assert check["labeled_ce_student_on_true_labels"] > 0
    assert check["labeled_ce_student_on_supervised_labels"] > 0
    png = (out / "two_moons.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10000
    assert not list(out.glob("*.tmp*"))


def test_two_moons_bad_input_exits_nonzero(tmp_path, capsys):
    from mpl_fast import cli

    for args in (["--steps", "0"], ["--set", "estimator=bogus"], ["--set", "nokey=1"],
                 ["--set", "noequals"], ["--preset", "nope"], ["--seed", "3-1"], ["--seed", "x"],
                 ["--seed", "-1"], ["--seed", "2-"], ["--uda-noise", "-0.1"],
                 ["--uda-noise", "nan"], ["--uda-noise", "inf"], ["--lr", "-1"], ["--lr", "0"],
                 ["--lr", "nan"], ["--lr", "inf"], ["--set", "mpl_weight=.inf"],
                 ["--set", "grad_clip=.nan"],
                 # make_moons' seeds end at 2**32 - 1 (a traceback after creating --out)
                 ["--seed", "4294967296"], ["--seed", "4294967290-4294967296"]):
        assert cli.main(["two-moons", "--out", str(tmp_path / "x"), *args]) == 2, args
        err = capsys.readouterr().err
        assert err.startswith("mpl-fast: error:") and err.count("\n") == 1, (args, err)
        assert not (tmp_path / "x").exists()  # refused before anything is written


def test_seed_range_writes_each_seed_and_a_summary_of_them(tmp_path):
    from mpl_fast import cli

    out = tmp_path / "sweep"
    assert cli.main(["two-moons", "--seed", "4-5", "--steps", "20", "--uda-noise", "0.2",
                     "--out", str(out)]) == 0
    runs = [json.loads((out / f"seed_{s}" / "metrics.json").read_text()) for s in (4, 5)]
    assert [r["seed"] for r in runs] == [4, 5]
    assert all((out / f"seed_{s}" / "two_moons.png").exists() for s in (4, 5))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["seeds"] == [4, 5] and summary["settings"]["uda_noise"] == 0.2
    assert summary["settings"]["uda_weight"] == 1.0  # --uda-noise turns the teacher's UDA on
    for key in ("supervised_acc", "pseudo_label_acc", "uda_teacher_acc", "mpl_acc"):
        per_seed = [r[key] for r in runs]
        assert summary["accuracy"][key]["per_seed"] == per_seed
        assert summary["accuracy"][key]["mean"] == pytest.approx(sum(per_seed) / 2)
        assert summary["accuracy"][key]["min"] == min(per_seed)


def test_uda_teacher_and_mpl_start_from_the_same_weights_and_batches(monkeypatch):
    # The UDA-only teacher is the control for MPL + UDA: only the MPL term may differ.
    from mpl_fast.train import two_moons as tm

    entries, real_mpl = [], tm._mpl

    def recording_mpl(data, config, steps, lr, batch, gen, uda_noise=0.0):
        entries.append((config.mpl_weight, gen.get_state(), torch.random.get_rng_state()))
        return real_mpl(data, config, steps, lr, batch, gen, uda_noise)

    monkeypatch.setattr(tm, "_mpl", recording_mpl)
    metrics, _, models = tm.run(1, steps=20, lr=1.0, uda_noise=0.1, progress=lambda *a: None)
    assert list(models) == ["Supervised", "Pseudo Labels", "UDA teacher", "MPL + UDA"]
    (w_uda, gen_uda, rng_uda), (w_mpl, gen_mpl, rng_mpl) = entries
    assert (w_uda, w_mpl) == (0.0, 1.0) and metrics["uda_weight"] == 1.0
    assert torch.equal(gen_uda, gen_mpl) and torch.equal(rng_uda, rng_mpl)


def test_mpl_objective_prefers_the_supervised_boundary_to_the_moons():
    # The finding the README reports: a student trained on the supervised teacher's labels has a
    # lower labeled-set CE (the quantity MPL's feedback minimises) than one trained on the true
    # moons, so plain MPL has no incentive to move the teacher towards the moons.
    from mpl_fast.train import two_moons as tm

    for seed in (0, 1):
        data = tm.two_moons(seed)
        torch.manual_seed(seed)
        supervised = tm._supervised(data, 1500, 1.0)
        with torch.no_grad():
            supervised_labels = supervised(data.x).argmax(1)
        gen = torch.Generator().manual_seed(seed)
        on_supervised = tm._student_on_labels(data, supervised_labels, 1500, 1.0, 64, gen)
        on_truth = tm._student_on_labels(data, data.y, 1500, 1.0, 64, gen)
        assert tm.accuracy(on_truth, data.x, data.y) > tm.accuracy(on_supervised, data.x, data.y)
        assert tm.labeled_ce(on_supervised, data) < tm.labeled_ce(on_truth, data)
