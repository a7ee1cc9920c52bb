import subprocess
import sys

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
