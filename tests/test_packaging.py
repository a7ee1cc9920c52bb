"""The package's build metadata: it builds without setuptools' deprecation warnings, and an older
setuptools than it needs stops the build with one line saying what to install."""
import re
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _setup_module():
    # run_name other than __main__: the module's helpers without running setup()
    return runpy.run_path(str(ROOT / "setup.py"), run_name="setup_under_test")


def test_an_older_setuptools_stops_the_build_with_one_line():
    setup = _setup_module()
    with pytest.raises(SystemExit) as stop:
        setup["_check_setuptools"]("75.8.0")
    message = str(stop.value.code)
    assert "\n" not in message and "75.8.0" in message
    assert f"setuptools>={setup['MIN_SETUPTOOLS']}" in message
    for fine in (f"{setup['MIN_SETUPTOOLS']}.0.3", "84.2.1", "100.0"):
        setup["_check_setuptools"](fine)


def test_every_install_command_asks_for_the_setuptools_the_build_needs():
    minimum = _setup_module()["MIN_SETUPTOOLS"]
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert f'"setuptools>={minimum}"' in pyproject.split("[project]")[0]  # build-system
    for path in ("README.md", ".ci/run"):
        asked = re.findall(r'"setuptools>=(\d+)"', (ROOT / path).read_text())
        assert asked and all(int(v) == minimum for v in asked), (path, asked)


def test_metadata_builds_without_a_warning(tmp_path):
    """setuptools' build backend reads pyproject.toml and runs setup.py as pip would, with every
    warning an error: the license as a TOML table, deprecated since setuptools 77 (and an error
    from 2027-02-18), failed here."""
    pytest.importorskip("setuptools", minversion=str(_setup_module()["MIN_SETUPTOOLS"]))
    code = ("import sys; from setuptools import build_meta as b; "
            "print(b.prepare_metadata_for_build_wheel(sys.argv[1]))")
    done = subprocess.run([sys.executable, "-W", "error", "-c", code, str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    info = tmp_path / done.stdout.strip().splitlines()[-1] / "METADATA"
    assert "License-Expression: Apache-2.0" in info.read_text()
