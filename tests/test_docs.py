"""The README and docs/ as a newcomer reads them: every relative link leads to a file that exists, the README
stays short, and no text speaks of the way it was written rather than of the package."""

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), REPO / "dataset" / "README.md"]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_lead_to_files(page):
    broken = []
    for target in LINK.findall(page.read_text(encoding="utf-8")):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue  # a web address or an anchor in the page
        if not (page.parent / target.split("#")[0]).exists():
            broken.append(target)
    assert not broken, f"{page.relative_to(REPO)} links to missing files: {broken}"


def test_readme_is_a_front_door():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert len(readme.encode()) < 12_000, "README.md grew past a five-minute read: move long material to docs/"
    for doc in ("docs/speed.md", "docs/robustness.md", "docs/avec2019.md", "docs/mmsa.md", "docs/differences.md",
                "docs/configuration.md"):
        assert f"({doc})" in readme, f"the README should link {doc}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_no_notes_about_how_the_text_was_written(page):
    text = page.read_text(encoding="utf-8").lower()
    for word in ("session", "workplace", "lab note", "helper"):
        assert word not in text, f"{page.relative_to(REPO)} speaks of '{word}'"
