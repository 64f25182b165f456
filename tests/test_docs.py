"""The documents are tested: the docs site builds in MkDocs' strict mode (a broken link or a missing
API object fails), and no README, docs or results text names a machine path, a commit id or an
internal label. (Every Python block of the README and docs runs through pytest-markdown-docs.)"""

from __future__ import annotations

import html
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "RESULTS.md"
TEXTS = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md")), RESULTS,
         *sorted((ROOT / "benchmarks" / "results").glob("*.md"))]
README_MAX_LINES, RESULTS_MAX_LINES = 150, 300


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """The docs site, built once in MkDocs' strict mode."""
    out = tmp_path_factory.mktemp("site")
    mkdocs = shutil.which("mkdocs", path=str(Path(sys.executable).parent))
    assert mkdocs, "mkdocs is not installed: pip install -e '.[test]'"
    run = subprocess.run([mkdocs, "build", "--strict", "-f", str(ROOT / "docs" / "mkdocs.yml"), "-d", str(out)],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return out


def test_the_docs_site_builds_strictly(site):
    assert (site / "architecture" / "index.html").is_file()


def test_the_api_reference_shows_no_raw_sphinx_markup(site):
    """The docstrings' Sphinx fields are parsed, not printed: no ``:param``, ``:returns:`` or
    cross-reference role (``:func:`x```) reaches the page as text."""
    text = html.unescape(re.sub(r"<[^>]+>", "", (site / "api" / "index.html").read_text()))
    raw = re.compile(r":(param|type|returns?|rtype|raises?|func|class|meth|mod|data|attr|obj|exc)\b[^:\n]*:")
    found = sorted({match.group(0) for match in raw.finditer(text)})
    assert found == []


def test_the_api_reference_renders_parameters_as_a_table_with_types(site):
    page = (site / "api" / "index.html").read_text()
    start = page.index('id="lift3d.lifting.inflate.inflate"')
    section = page[start:page.index('class="doc doc-object doc-function"', start)]
    rows = re.findall(r'<tr class="doc-section-item">(.*?)</tr>', section, re.DOTALL)
    cells = {re.sub(r"<[^>]+>|\s", "", row.split("</td>")[0]): re.sub(r"<[^>]+>|\s", "", row.split("</td>")[1])
             for row in rows}
    assert "<table>" in section and "<th>Type</th>" in section
    assert cells.get("kernel_size") == "int" and cells.get("padding_mode") == "str"


def test_the_readme_is_a_short_users_guide():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= README_MAX_LINES
    assert lines[0] == "# lift3d"


def test_results_is_a_summary_whose_tables_link_their_detail_pages():
    text = RESULTS.read_text()
    assert len(text.splitlines()) <= RESULTS_MAX_LINES
    links = re.findall(r"\]\((results/[a-z0-9-]+\.md)\)", text)
    assert links and all((RESULTS.parent / link).is_file() for link in links)
    assert text.count("python benchmarks/") >= len(set(links))


def test_no_text_names_a_machine_path_a_commit_or_an_issue():
    bad = re.compile(r"/work/|/tmp/|/root/|\bcommit [0-9a-f]{7,40}\b|\bat [0-9a-f]{7,40}\b|\bissue \d+\b|\bsession \d+\b",
                     re.IGNORECASE)
    found = [f"{p.relative_to(ROOT)}:{i}: {line.strip()}" for p in TEXTS
             for i, line in enumerate(p.read_text().splitlines(), 1) if bad.search(line)]
    assert found == []
