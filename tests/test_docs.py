"""The documentation holds together: README.md stays short (at most 250 lines), every relative
link and image in README.md and docs/*.md points at a file that exists (and, with a #anchor into
a Markdown page, at one of its headings, slugged as GitHub slugs them), README.md links every
docs page, and no page reads like a diary ("since the previous ...", "no longer", ...)."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [README, *DOCS]
MAX_README_LINES = 250
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
FENCE = re.compile(r"^ *```.*?^ *```", re.S | re.M)
CODE = re.compile(r"`[^`\n]*`")
EXTERNAL = ("http://", "https://", "mailto:")
DIARY = ("since the previous", "the previous readme", "no longer", "used to be", "this session",
         "last session", "previous session", "new in ")


def prose(page: Path) -> str:
    """The page's text without fenced blocks and inline code, where brackets are not links."""
    return CODE.sub("", FENCE.sub("", page.read_text(encoding="utf-8")))


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lowercase, punctuation but '-' and '_' dropped, spaces to '-'."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """Every heading's anchor on ``page`` (a repeated one as GitHub numbers it: x, x-1, ...)."""
    counts: dict[str, int] = {}
    found: set[str] = set()
    for line in FENCE.sub("", page.read_text(encoding="utf-8")).splitlines():
        if m := re.match(r"#{1,6} +(.*)", line):
            base = slug(m.group(1))
            found.add(f"{base}-{counts[base]}" if base in counts else base)
            counts[base] = counts.get(base, 0) + 1
    return found


def links(page: Path) -> list[str]:
    """The relative link and image targets on ``page``."""
    return [t for t in LINK.findall(prose(page)) if not t.startswith(EXTERNAL)]


def all_links() -> list[tuple[Path, str]]:
    return [(page, target) for page in PAGES for target in links(page)]


def test_the_readme_is_short() -> None:
    count = len(README.read_text(encoding="utf-8").splitlines())
    assert count <= MAX_README_LINES, f"README.md has {count} lines (at most {MAX_README_LINES})"


@pytest.mark.parametrize("page,target", all_links(), ids=[f"{p.name}:{t}" for p, t in all_links()])
def test_a_link_resolves(page: Path, target: str) -> None:
    path, _, anchor = target.partition("#")
    file = (page.parent / path).resolve() if path else page
    assert file.exists(), f"{page.name}: {target}: no such file"
    if anchor and file.suffix == ".md":
        assert anchor in anchors(file), f"{page.name}: {target}: no heading with anchor #{anchor}"


@pytest.mark.parametrize("doc", DOCS, ids=[d.name for d in DOCS])
def test_every_docs_page_is_linked_from_the_readme(doc: Path) -> None:
    linked = {(ROOT / t.partition("#")[0]).resolve() for t in links(README)}
    assert doc.resolve() in linked, f"README.md does not link {doc.relative_to(ROOT)}"


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_no_diary_phrases(page: Path) -> None:
    text = page.read_text(encoding="utf-8").lower()
    found = [phrase for phrase in DIARY if phrase in text]
    assert not found, f"{page.name} reads like a diary: {found}"


@pytest.mark.parametrize("page", DOCS, ids=[d.name for d in DOCS])
def test_a_docs_page_starts_with_a_title_and_links_back(page: Path) -> None:
    text = page.read_text(encoding="utf-8")
    assert re.match(r"# \S", text), f"{page.name} does not start with a '# Title' line"
    assert "../README.md" in links(page), f"{page.name} does not link back to README.md"


def test_the_slug_is_githubs() -> None:
    assert slug("Reproducing a published number: `studies/crd_cifar100.yaml`") == \
        "reproducing-a-published-number-studiescrd_cifar100yaml"
    assert slug("Its cost, and why ≤ ×3 a CE step is out of reach") == "its-cost-and-why--3-a-ce-step-is-out-of-reach"
