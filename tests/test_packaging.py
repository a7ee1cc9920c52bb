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


def test_an_older_torch_stops_the_build_with_one_line():
    """Before torch 2.9 compiled checkpoints count BatchNorm statistics twice: the build stops
    there, before the extension is compiled against a torch pip would then replace."""
    setup = _setup_module()
    need = ".".join(map(str, setup["MIN_TORCH"]))
    for old in ("2.8.0", "2.5.1+cu124", "1.13.1"):
        with pytest.raises(SystemExit) as stop:
            setup["_check_torch"](old)
        message = str(stop.value.code)
        assert "\n" not in message and old in message and f"torch>={need}" in message
    for fine in (f"{need}.1", "2.10.0a0+git1234567", "2.13.0+cpu", "3.0.0"):
        setup["_check_torch"](fine)


def test_the_torch_floor_is_the_same_everywhere_it_is_stated():
    need = ".".join(map(str, _setup_module()["MIN_TORCH"]))
    build, project = (ROOT / "pyproject.toml").read_text().split("[project]")
    assert f'"torch>={need}"' in build and f'"torch>={need}"' in project
    assert f"any build >= {need}" in (ROOT / "README.md").read_text()
