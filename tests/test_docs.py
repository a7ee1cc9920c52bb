"""The README and docs/ link to each other by relative paths and section anchors: a moved or
renamed section must not leave a link that leads nowhere; and their Python examples run."""
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def github_anchor(heading):
    """The id GitHub gives a heading: lower case, punctuation but '-' and '_' dropped, spaces
    to '-'."""
    text = heading.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path):
    ids, in_code = set(), False
    for line in path.read_text().splitlines():
        if line.startswith("```"):
            in_code = not in_code
        elif not in_code and line.startswith("#"):
            ids.add(github_anchor(line.lstrip("#")))
    return ids


def relative_links(path):
    for target in LINK.findall(path.read_text()):
        if not re.match(r"[a-z]+:", target):
            yield target


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_relative_link_leads_to_a_file_and_section_that_exist(doc):
    broken = []
    for target in relative_links(doc):
        file_part, _, anchor = target.partition("#")
        dest = (doc.parent / file_part).resolve() if file_part else doc
        if not dest.exists():
            broken.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target}: no such section")
    assert not broken, f"{doc.name}: " + "; ".join(broken)


def test_the_anchor_rule_matches_githubs_for_the_headings_we_link():
    assert github_anchor(" CIFAR-10-4K on an H200") == "cifar-10-4k-on-an-h200"
    assert (github_anchor(" How good are a run's pseudo labels?")
            == "how-good-are-a-runs-pseudo-labels")
    assert github_anchor(" The whole step as one CUDA graph") == "the-whole-step-as-one-cuda-graph"


def test_the_readme_links_every_document_in_docs():
    readme = ROOT / "README.md"
    linked = {(readme.parent / t.partition("#")[0]).resolve() for t in relative_links(readme)}
    missing = [p.name for p in DOCS[1:] if p.resolve() not in linked]
    assert not missing, f"README links none of: {missing}"


@pytest.mark.parametrize("name", ["pseudo_labels", "soft_cross_entropy", "uda_loss",
                                  "multi_tensor_dot", "multi_tensor_axpby"])
def test_each_public_op_documents_every_argument(name):
    """The ops are imported into other trainers: help(op) is their reference."""
    import inspect

    from mpl_fast import ops

    op = getattr(ops, name)
    doc = inspect.getdoc(op) or ""
    missing = [p for p in inspect.signature(op).parameters if not re.search(rf"\b{p}\b", doc)]
    assert not missing, f"{name}'s docstring does not mention {missing}"


def python_blocks(path):
    """The ```python blocks of a document, in order."""
    return re.findall(r"^```python\n(.*?)^```", path.read_text(), re.S | re.M)


@pytest.mark.parametrize("doc", [d for d in DOCS if python_blocks(d)],
                         ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_python_example_of_a_document_runs(doc, capsys, monkeypatch):
    """A user copies these into a trainer of their own: each document's blocks run in order in
    one namespace (a later block may use an earlier one's names), on the CPU."""
    monkeypatch.delenv("MPL_FAST_BACKEND", raising=False)
    namespace = {"__name__": f"doc_{doc.stem}"}
    for i, block in enumerate(python_blocks(doc)):
        exec(compile(block, f"{doc.name} python block {i + 1}", "exec"), namespace)
    assert namespace.keys() - {"__name__", "__builtins__"}  # the blocks defined what they use


def test_the_step_example_trains_both_networks(capsys):
    """The MPL step example of algorithm.md moves the teacher and the student, and reports the
    metrics its printed line shows."""
    import torch

    (block,) = python_blocks(ROOT / "docs" / "algorithm.md")
    setup, loop = block.split("for step_index", 1)  # the networks, then the steps
    namespace = {}
    exec(compile(setup, "algorithm.md setup", "exec"), namespace)
    before = {name: [p.detach().clone() for p in namespace[name].parameters()]
              for name in ("teacher", "student")}
    exec(compile("for step_index" + loop, "algorithm.md steps", "exec"), namespace)
    for name, old in before.items():
        assert any(not torch.equal(a, b) for a, b in zip(old, namespace[name].parameters()))
    shown = capsys.readouterr().out
    for key in ("teacher/loss", "teacher/mpl", "student/ce_old", "h", "lr/student"):
        assert f"'{key}'" in shown, key
