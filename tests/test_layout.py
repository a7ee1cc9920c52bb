"""The layout's rules (DESIGN.md), read from the sources: data flows cli -> train -> (data,
models, mpl) -> ops -> (kernels, csrc) and nothing below imports anything above it (imports
inside functions included); .cu files include no torch header; each loss op's file and kernel
share its name; the algorithm package does no I/O, logging or argument parsing."""
import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# a package's height in the flow; mpl_fast itself (its __version__) and progress (the progress
# line, a leaf that imports nothing of ours) may be imported from anywhere
HEIGHT = {"cli": 4, "train": 3, "data": 2, "models": 2, "mpl": 2, "ops": 1, "_C": 0,
          "kernels": 0}
ANYWHERE = {"", "progress", "__version__"}


def _layer(module):
    """The layer a dotted module name of ours belongs to, or None for anything else."""
    parts = module.split(".")
    if parts[0] == "kernels":
        return "kernels"
    if parts[0] != "mpl_fast":
        return None
    return parts[1] if len(parts) > 1 else ""


def _module_name(path):
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path):
    """Every module of ours a source file imports, as dotted names (`from a import b` gives a.b
    too, which is a module when b is one)."""
    name = _module_name(path)
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolved against the file's package
                base = ".".join(package[:len(package) - node.level + 1] + ([base] if base else []))
            found += [base] + [f"{base}.{alias.name}" for alias in node.names]
    return [module for module in found if _layer(module) is not None]


def upward_imports(path):
    here = _layer(_module_name(path))
    return [module for module in imported_modules(path)
            if _layer(module) not in ANYWHERE and here not in ANYWHERE | {_layer(module)}
            and HEIGHT[_layer(module)] > HEIGHT[here]]


SOURCES = sorted([*ROOT.joinpath("mpl_fast").rglob("*.py"),
                  *ROOT.joinpath("kernels").rglob("*.py")])


def test_every_package_of_ours_has_a_place_in_the_flow():
    layers = {_layer(_module_name(path)) for path in SOURCES}
    assert layers - ANYWHERE == set(HEIGHT) - {"_C"}


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_nothing_imports_a_layer_above_its_own(path):
    assert upward_imports(path) == []


def test_progress_is_a_leaf():
    assert imported_modules(ROOT / "mpl_fast" / "progress.py") == []


def test_an_upward_import_is_found_wherever_it_is_written(tmp_path, monkeypatch):
    """The rule's reader finds absolute, relative and function-local imports of a higher layer."""
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    ops = tmp_path / "mpl_fast" / "ops"
    ops.mkdir(parents=True)
    cases = {"from mpl_fast.train import loop": ["mpl_fast.train"],
             "from ..mpl import step": ["mpl_fast.mpl"],
             "def f():\n    import mpl_fast.cli": ["mpl_fast.cli"],
             "from .. import data": ["mpl_fast.data"],
             "from mpl_fast import __version__, progress\nimport kernels.uda_loss": []}
    for source, expected in cases.items():
        path = ops / "x.py"
        path.write_text(source + "\n")
        found = {".".join(m.split(".")[:2]) for m in upward_imports(path)}
        assert found == set(expected), source


TORCH_HEADERS = ("torch/", "ATen/", "c10/", "pybind11/", "Python.h")


def included_headers(path, seen=None):
    """Every header a C++/CUDA file includes, through the project's own headers beside it."""
    seen = set() if seen is None else seen
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if not stripped.startswith("#include"):
            continue
        name = stripped.split(None, 1)[1].strip('<>"')
        if name not in seen:
            seen.add(name)
            local = path.parent / name
            if local.is_file():
                included_headers(local, seen)
    return seen


CUDA_SOURCES = sorted(ROOT.joinpath("csrc").glob("*.cu"))


@pytest.mark.parametrize("path", CUDA_SOURCES, ids=lambda p: p.name)
def test_a_cu_file_includes_no_torch_header(path):
    """.cu files stay free of torch's headers (DESIGN.md), so nvcc compiles them fast; the .cpp
    glue beside them talks to torch."""
    assert not [h for h in included_headers(path) if h.startswith(TORCH_HEADERS)]


def test_the_header_reader_follows_local_headers(tmp_path):
    (tmp_path / "a.h").write_text("#pragma once\n#include <ATen/ATen.h>\n")
    (tmp_path / "k.cu").write_text('#include <vector>\n  #include "a.h"\n')
    assert included_headers(tmp_path / "k.cu") == {"vector", "a.h", "ATen/ATen.h"}
    assert CUDA_SOURCES  # the rule has something to hold


def _registered_ops(path):
    """The mpl_fast:: names a source registers with torch.library.custom_op."""
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if (isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "custom_op"
                and node.args and isinstance(node.args[0], ast.Constant)):
            names.append(node.args[0].value)
    return names


OP_FILES = [path for path in sorted(ROOT.joinpath("mpl_fast", "ops").glob("*.py"))
            if _registered_ops(path)]


@pytest.mark.parametrize("path", OP_FILES, ids=lambda p: p.name)
def test_an_op_file_holds_one_op_of_its_name_and_its_kernel_sits_under_that_name(path):
    """DESIGN.md: one file in mpl_fast/ops/ an op; its Triton kernel in kernels/, same name."""
    assert _registered_ops(path) == [f"mpl_fast::{path.stem}"]
    assert (ROOT / "kernels" / path.name).is_file()
    assert f"kernels.{path.stem}" in {".".join(m.split(".")[-2:]) for m in imported_modules(path)}


def test_the_three_loss_ops_are_found():
    assert {p.stem for p in OP_FILES} >= {"pseudo_labels", "soft_cross_entropy", "uda_loss"}


IO_MODULES = {"argparse", "logging", "json", "yaml", "pathlib", "os", "sys", "shutil", "pickle",
              "tqdm", "rich", "torch.utils.tensorboard"}
IO_CALLS = {"print", "open", "input"}


def io_used(path):
    """What of I/O, logging and argument parsing a source uses: modules imported, calls made."""
    used = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            used |= {a.name for a in node.names if a.name in IO_MODULES}
        elif isinstance(node, ast.ImportFrom) and node.module in IO_MODULES:
            used.add(node.module)
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
              and node.func.id in IO_CALLS):
            used.add(f"{node.func.id}()")
        elif (isinstance(node, ast.Attribute) and node.attr in {"save", "load"}
              and isinstance(node.value, ast.Name) and node.value.id == "torch"):
            used.add(f"torch.{node.attr}")
    return used


@pytest.mark.parametrize("path", sorted(ROOT.joinpath("mpl_fast", "mpl").glob("*.py")),
                         ids=lambda p: p.name)
def test_the_algorithm_does_no_io_logging_or_argument_parsing(path):
    """DESIGN.md: mpl_fast/mpl is plain objects a user drives from their own loop."""
    assert io_used(path) == set()


def test_the_io_reader_finds_what_it_looks_for(tmp_path):
    path = tmp_path / "x.py"
    path.write_text("import logging\nfrom pathlib import Path\nimport torch\n"
                    "def f(x):\n    print(x)\n    torch.save(x, 'f')\n    return open('f')\n")
    assert io_used(path) == {"logging", "pathlib", "print()", "torch.save", "open()"}
