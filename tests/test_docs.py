"""The README and the pages under docs/ quote every measured figure from the benchmark report, so that two answers
to one question cannot appear, and every link between them leads somewhere."""
import re

import pytest

from conftest import ROOT

REPORT = ROOT / "benchmarks" / "results" / "README.md"
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# what a measurement looks like in prose: a ratio (0.78x), seconds, images/s, GiB of memory, an accuracy (0.9774)
FIGURE = re.compile(r"(?<![\w.])(\d+(?:\.\d+)?x|\d+(?:\.\d+)? (?:s|images/s|GiB)|0\.\d{4})(?!\w|\.\d)")


def prose(page):
    """The page without its fenced code blocks (commands and sample output, not quoted figures)."""
    return re.sub(r"```.*?```", "", page.read_text(), flags=re.DOTALL)


@pytest.mark.parametrize("page", PAGES, ids=lambda page: page.name)
def test_every_figure_of_a_page_is_in_the_report(page):
    report = REPORT.read_text()
    missing = sorted({figure for figure in FIGURE.findall(prose(page)) if figure not in report})
    assert not missing, f"{page.name} quotes figures the report does not hold: {missing}"


@pytest.mark.parametrize("page", [*PAGES, REPORT], ids=lambda page: page.name)
def test_every_relative_link_leads_to_a_file(page):
    targets = re.findall(r"\]\((?!https?:)([^)#]+)(?:#[^)]*)?\)", page.read_text())
    broken = [target for target in targets if not (page.parent / target).exists()]
    assert not broken, f"{page.name} links to what does not exist: {broken}"
