import subprocess
import sys

import torch

from mpl_fast import __version__


def _run(*args):
    return subprocess.run([sys.executable, "-m", "mpl_fast.cli", *args], capture_output=True,
                          text=True, timeout=120)


def test_help_lists_subcommands():
    out = _run("--help")
    assert out.returncode == 0
    for name in ("train", "eval", "bench", "two-moons"):
        assert name in out.stdout


def test_version():
    out = _run("--version")
    assert out.returncode == 0 and __version__ in out.stdout


def test_unknown_subcommand_fails():
    assert _run("frobnicate").returncode != 0


def test_the_trainer_imports_scikit_learn_only_for_the_data_sets_that_need_it():
    # scikit-learn with scipy took 3 of the 5 seconds of importing the training loop; a run on
    # images (CIFAR-10, ImageNet) never uses it
    code = ("import sys, mpl_fast.cli, mpl_fast.train.loop, mpl_fast.data.sources; "
            "print(sorted(m for m in ('sklearn', 'scipy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stderr


def test_a_backend_the_ops_cannot_run_stops_a_command_before_any_work(tmp_path, monkeypatch,
                                                                       capsys):
    """MPL_FAST_BACKEND was read at the first loss: an unknown name, or Triton on the CPU
    without its interpreter, ended in a traceback after the run's folder was written."""
    from mpl_fast import cli

    out = tmp_path / "run"
    cases = [({"MPL_FAST_BACKEND": "bogus"}, ["train"], "'bogus' is not one of"),
             ({"MPL_FAST_BACKEND": "bogus"}, ["two-moons"], "'bogus' is not one of"),
             ({"MPL_FAST_BACKEND": "triton", "TRITON_INTERPRET": "0"}, ["train"],
              "triton cannot run on cpu tensors"),
             ({"MPL_FAST_BACKEND": "cuda", "TRITON_INTERPRET": "0"}, ["train"],
              "cuda cannot run on cpu tensors")]
    for env, command, says in cases:
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        assert cli.main([*command, "--out", str(out), "--steps", "2",
                         *(["--device", "cpu"] if command == ["train"] else [])]) == 2
        err = capsys.readouterr().err
        assert says in err and err.count("\n") == 1, err
        assert not out.exists()
        monkeypatch.delenv("MPL_FAST_BACKEND")
        monkeypatch.setenv("TRITON_INTERPRET", "1")


def test_an_interpreter_that_cannot_run_the_kernels_stops_a_command_before_any_work(
        tmp_path, monkeypatch, capsys):
    """triton 3.6's interpreter with numpy 2.4 failed in every persistent kernel's loop (triton
    3.1's returned garbage labels): on CPU tensors under TRITON_INTERPRET=1 a command stops in one
    line naming the fix; with MPL_FAST_BACKEND=torch the kernels are not used, and nothing says so."""
    from mpl_fast import cli
    from mpl_fast.ops import backend

    conflict = backend.interpreter_conflict("3.6.0", "2.4.6")
    assert "triton 3.6.0" in conflict and "numpy 2.4.6" in conflict and "'numpy<2.4'" in conflict
    for fine in (("3.7.1", "2.4.6"), ("3.6.0", "2.3.5"), ("3.10.0", "2.10.1"), ("3.1.0", "1.26.4")):
        assert backend.interpreter_conflict(*fine) is None, fine
    assert backend.interpreter_conflict("3.6.0", "2.10.0")  # 2.10 > 2.4: compared as numbers
    monkeypatch.setattr(backend, "_installed_conflict", lambda: conflict)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    out = tmp_path / "run"
    assert cli.main(["train", "--out", str(out), "--steps", "2", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert conflict in err and err.count("\n") == 1, err
    assert not out.exists()
    monkeypatch.setenv("MPL_FAST_BACKEND", "torch")
    backend.check(torch.device("cpu"))
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the interpreter off: no conflict to report
    monkeypatch.delenv("MPL_FAST_BACKEND")
    backend.check(torch.device("cpu"))


def test_commands_that_write_shared_files_refuse_torchrun(tmp_path, monkeypatch, capsys):
    """Under torchrun every process ran two-moons and the benchmarks (each writing the same
    files). (`logits` shares its work under torchrun: tests/test_reduced_mpl.py.)"""
    from mpl_fast import cli

    monkeypatch.setenv("WORLD_SIZE", "2")
    for command in (["two-moons", "--out", str(tmp_path / "o")],
                    ["bench", "ops", "--out", str(tmp_path / "o")]):
        assert cli.main(command) == 2
        err = capsys.readouterr().err
        assert "runs in one process, not under torchrun" in err and err.count("\n") == 1, err
        assert not (tmp_path / "o").exists()


def test_under_torchrun_rank_0_alone_says_why_a_run_stopped(monkeypatch, capsys):
    """Ctrl-C reaches every process torchrun started, and each printed its line (8 alike on a
    node of 8 GPUs); a stop on SIGTERM, which torchrun passes on to each, is said once too. The
    exit statuses stay on every rank."""
    from mpl_fast import cli
    from mpl_fast.train.stop_signal import Stopped

    for raised, status in ((KeyboardInterrupt(), 130), (cli.Interrupted("interrupted; X"), 130),
                           (Stopped(7, "run/last.pt"), 143)):
        def stopped(args, raised=raised):
            raise raised

        monkeypatch.setattr(cli, "_eval", stopped)
        for rank, lines in (("1", 0), ("0", 1)):
            monkeypatch.setenv("RANK", rank)
            assert cli.main(["eval", "--checkpoint", "x"]) == status
            err = capsys.readouterr().err
            assert err.count("\n") == lines and err.startswith("mpl-fast: " if lines else ""), err
    assert err == ("mpl-fast: stopped by SIGTERM at step 7; run/last.pt holds it: the same "
                   "command with --resume continues from there\n")
