"""The README and docs/ link to each other by relative paths and section anchors: a moved or
renamed section must not leave a link that leads nowhere."""
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
