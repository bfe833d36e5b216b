"""The documentation holds together: every relative link in README.md and docs/*.md leads to
an existing file, every #anchor to a heading of its target page (GitHub's slug rule), and the
README stays an entry point (at most 200 lines)."""
from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import unquote

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
README_MAX_LINES = 200

LINK = re.compile(r"(?<!!)\[(?:[^\]\[]|\[[^\]]*\])*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
CODE_SPAN = re.compile(r"(`+)(.+?)\1")


def prose_lines(text: str) -> list[str]:
    """The lines outside fenced code blocks."""
    out, fence = [], None
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith(("```", "~~~")):
            marker = stripped[:3]
            fence = marker if fence is None else (None if stripped.startswith(fence) else fence)
            continue
        if fence is None:
            out.append(line)
    return out


def slug(heading: str) -> str:
    """GitHub's anchor of a heading's text: Markdown links and code marks reduced to their text,
    lowercased, every character but letters, digits, '_', '-' and spaces removed, spaces to '-'."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)   # [text](url) -> text
    text = text.replace("`", "").strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(text: str) -> set[str]:
    """The anchors of a page's headings; a repeated slug gets -1, -2, ... as on GitHub."""
    seen: dict[str, int] = {}
    out = set()
    for line in prose_lines(text):
        m = re.match(r"^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        base = slug(m.group(2))
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def links(text: str) -> list[str]:
    """The link targets of a page's prose (not inside code blocks or code spans)."""
    found = []
    for line in prose_lines(text):
        found += LINK.findall(CODE_SPAN.sub("", line))
    return found


def test_slug_follows_githubs_rule():
    assert slug("Fast paths chosen from the machine (`auto`)") == "fast-paths-chosen-from-the-machine-auto"
    assert slug("Bad input: one line, exit status 2, nothing written") == \
        "bad-input-one-line-exit-status-2-nothing-written"
    assert slug("GPUs: close, not equal") == "gpus-close-not-equal"
    assert slug("The native ops (`csrc/`, `mlsys/ops.py`)") == "the-native-ops-csrc-mlsysopspy"
    assert slug("`auto` fast paths differ by machine") == "auto-fast-paths-differ-by-machine"
    assert slug("snake_case and hyphen-ated") == "snake_case-and-hyphen-ated"
    assert slug("Ünïcode — and dashes") == "ünïcode--and-dashes"
    assert slug("See [the docs](docs/x.md)") == "see-the-docs"
    text = "# A\n## A\n```bash\n# A (a comment, not a heading)\n```\n### A!\n"
    assert anchors(text) == {"a", "a-1", "a-2"}


def test_links_ignore_code_and_images():
    text = "[a](x.md) `[b](y.md)` ![img](z.png)\n```\n[c](w.md)\n```\n[d](v.md#h \"title\")\n"
    assert links(text) == ["x.md", "v.md#h"]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_and_anchors_resolve(page):
    text = page.read_text()
    broken = []
    for target in links(text):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):   # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / unquote(path)).resolve() if path else page
        if not dest.exists():
            broken.append(f"{target}: {dest.relative_to(ROOT) if dest.is_relative_to(ROOT) else dest} does not exist")
            continue
        if anchor and dest.suffix == ".md" and unquote(anchor) not in anchors(dest.read_text()):
            broken.append(f"{target}: no heading of {dest.relative_to(ROOT)} has the anchor #{anchor}")
    assert not broken, "\n".join(broken)


def test_every_docs_page_is_linked_from_the_readme():
    linked = {(ROOT / t.partition("#")[0]).resolve() for t in links((ROOT / "README.md").read_text())}
    assert not [p.name for p in PAGES[1:] if p.resolve() not in linked]


def test_readme_is_an_entry_point():
    lines = len((ROOT / "README.md").read_text().splitlines())
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines; move detail to a page under docs/"
