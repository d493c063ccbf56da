"""The README and docs/ point at things that exist, and CI runs the test command the README gives."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)|src=\"([^\"]+)\"")  # [text](target), ![alt](target), <img src="...">


def test_ci_runs_the_test_command_the_readme_gives():
    readme = (ROOT / "README.md").read_text()
    command = re.search(r"^(python -m pytest[^#\n]*?)\s*(#.*)?$", readme, re.MULTILINE)
    assert command, "the README gives no test command"
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert command.group(1).strip() in ci_lines


def heading_anchors(page: Path) -> set[str]:
    """The anchors GitHub gives a page's headings: lower case, punctuation dropped, spaces to hyphens."""
    headings = re.findall(r"^#+ (.+)$", page.read_text(), re.MULTILINE)
    return {re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-") for heading in headings}


@pytest.mark.parametrize("page", PAGES, ids=[page.name for page in PAGES])
def test_every_relative_link_and_picture_exists(page):
    missing = []
    for target in (link or image for link, image in LINK.findall(page.read_text())):
        if re.match(r"[a-z]+:", target):
            continue  # web addresses
        file, _, anchor = target.partition("#")
        path = (page.parent / file).resolve() if file else page
        if not path.exists() or (anchor and anchor not in heading_anchors(path)):
            missing.append(target)
    assert not missing, f"{page.name} links to files or headings that do not exist: {missing}"


def test_every_script_is_in_the_readmes_table():
    readme = (ROOT / "README.md").read_text()
    scripts = ["lenet", "mnist_8k", "mnist_ablation", "cifar_norms", "cifar_dilated_dw", "vgg", "inceptionnet",
               "resnet", "efficientnet"]
    assert [name for name in scripts if f"| `{name}.py` |" not in readme] == []
