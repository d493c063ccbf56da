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


def test_the_design_pages_reading_map_follows_utils_in_order():
    """docs/design.md names every section of utils.py, in the order the file has them."""
    sections = re.findall(r"^# ---- ([^:-]+?)[:-]", (ROOT / "utils.py").read_text(), re.MULTILINE)
    design = (ROOT / "docs" / "design.md").read_text()
    reading_map = design[design.index("## Reading `utils.py`"):]
    named = [re.search(r"\*\*(.+?)\*\*", line).group(1) for line in reading_map.splitlines()
             if re.match(r"\d+\. \*\*", line)]
    assert len(sections) == len(named) >= 10
    for section, name in zip(sections, named):
        assert section.lower().startswith(name.lower()) or name.lower().startswith(section.lower()), (section, name)


def test_utils_reads_with_the_training_loop_first_and_within_its_budget():
    """The shape docs/design.md promises: the first backward() early, fit on one screen, the fence, the budget."""
    import ast

    source = (ROOT / "utils.py").read_text()
    lines = source.splitlines()
    assert len(lines) <= 2000
    first_backward = next(number for number, line in enumerate(lines, 1) if ".backward()" in line)
    fence = next(number for number, line in enumerate(lines, 1) if line.startswith("# PART II"))
    assert first_backward <= 300 and fence <= 1100
    fit = next(node for node in ast.parse(source).body if isinstance(node, ast.FunctionDef) and node.name == "fit")
    assert fit.end_lineno - fit.lineno + 1 <= 60
    assert "DESIGN.md" not in source and "docs/design.md" in source


def test_nothing_in_the_repository_points_outside_it():
    outside = "../" + "shared"  # the workplace's folder beside the repository: a user's clone has none
    tracked = [path for path in ROOT.rglob("*") if path.is_file() and path.suffix in (".py", ".md", ".txt", "")
               and not {".git", ".venv", "runs", "data"} & set(path.relative_to(ROOT).parts)]
    assert [str(path.relative_to(ROOT)) for path in tracked if outside in path.read_text(errors="ignore")] == []
