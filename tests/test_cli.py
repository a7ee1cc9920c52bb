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
