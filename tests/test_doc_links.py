"""Every relative link of README.md and of the docs/ pages points at a file that exists, and at a heading
of it where the link names one. `mkdocs build --strict` checks the docs/ pages too, but it runs in CI,
not here, and it never reads README.md, whose links GitHub renders."""

from __future__ import annotations

import re
import unicodedata
from pathlib import Path

import pytest

REPOSITORY = Path(__file__).resolve().parents[1]
DOCS = REPOSITORY / "docs"
PAGES = [REPOSITORY / "README.md", *sorted(DOCS.glob("**/*.md"))]
FENCED_CODE = re.compile(r"^(```|~~~).*?^\1", re.MULTILINE | re.DOTALL)
INLINE_CODE = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^#{1,6}\s+(.*?)\s*#*\s*$", re.MULTILINE)


def prose(text: str) -> str:
    """The text without its code blocks, where brackets and parentheses are no links."""
    return FENCED_CODE.sub("", text)


def anchors(page: Path) -> set[str]:
    """The ids of the page's headings, as mkdocs (its toc extension) and as GitHub make them."""
    ids = set()
    for heading in HEADING.findall(prose(page.read_text())):
        text = unicodedata.normalize("NFKD", heading.replace("`", "")).lower()
        ids.add(re.sub(r"[-\s]+", "-", re.sub(r"[^\w\s-]", "", text).strip()))  # mkdocs
        ids.add(re.sub(r"\s", "-", re.sub(r"[^\w\s-]", "", text.strip())))  # GitHub
    return ids


def relative_links(page: Path) -> list[str]:
    """The link targets of the page that name no scheme (https:, mailto:…), code spans left out."""
    targets = [match[1] for match in LINK.finditer(INLINE_CODE.sub("", prose(page.read_text())))]
    return [target for target in targets if not re.match(r"[a-z][a-z0-9+.-]*:", target)]


@pytest.mark.parametrize("page", PAGES, ids=lambda page: str(page.relative_to(REPOSITORY)))
def test_relative_links_point_at_existing_files_and_headings(page):
    broken = []
    for target in relative_links(page):
        path, _, anchor = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        if not linked.exists():
            broken.append(f"{target}: no such file")
        elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
            broken.append(f"{target}: no heading #{anchor} in {linked.name}")
    assert not broken, f"{page.relative_to(REPOSITORY)}: " + "; ".join(broken)


def test_the_check_finds_links_and_catches_a_broken_one(tmp_path):
    page = tmp_path / "page.md"
    (tmp_path / "other.md").write_text("# Other page\n\n## A `code` heading: with punctuation\n")
    page.write_text(
        "[ok](other.md#a-code-heading-with-punctuation) [`code`](other.md) [web](https://x.org)\n"
        "[gone](missing.md) [bad anchor](other.md#nowhere)\n\n```\n[in code](nothing.md)\n```\n"
    )
    assert relative_links(page) == [
        "other.md#a-code-heading-with-punctuation",
        "other.md",
        "missing.md",
        "other.md#nowhere",
    ]
    assert "a-code-heading-with-punctuation" in anchors(tmp_path / "other.md")
    assert "nowhere" not in anchors(tmp_path / "other.md")
