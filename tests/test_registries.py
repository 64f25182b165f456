"""Every kind is one registry, and what the README and docs say of the kinds is what the registries hold;
``inflate`` with a built-in kind stays light (no plugin, dataset, evaluation or I/O module)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from lift3d.cli.main import import_registries
from lift3d.plugins import PluginManager, all_registries

ROOT = Path(__file__).resolve().parents[1]
ARCHITECTURE = ROOT / "docs" / "pages" / "architecture.md"
FORBIDDEN_AFTER_INFLATE = ("lift3d_plugins", "nibabel", "scipy", "lift3d.data", "lift3d.evaluation", "lift3d.io")

PROBE = """
import json, sys
import torch
import lift3d
before = set(sys.modules)
lift3d.inflate(torch.nn.Conv2d(4, 4, 3))
print(json.dumps({"before": sorted(before), "after": sorted(sys.modules)}))
"""


@pytest.fixture(scope="module")
def registries():
    import_registries()
    return all_registries()


def _section(text: str, heading: str) -> str:
    start = text.index(heading)
    end = text.find("\n#", start + len(heading))
    return text[start:end if end >= 0 else None]


def _table(text: str) -> list[list[str]]:
    """The rows of the first markdown table in ``text`` (header and rule left out), cells stripped."""
    rows = [line for line in text.splitlines() if line.startswith("|")]
    return [[cell.strip() for cell in row.strip("|").split("|")] for row in rows[2:]]


def _ticked(cell: str) -> list[str]:
    return re.findall(r"`([^`]+)`", cell)


def test_inflate_on_a_conv_loads_no_plugin_data_evaluation_or_io_module():
    done = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    modules = json.loads(done.stdout.strip().splitlines()[-1])
    loaded = [m for m in modules["after"] if any(m == f or m.startswith(f + ".") for f in FORBIDDEN_AFTER_INFLATE)]
    assert loaded == []
    added = set(modules["after"]) - set(modules["before"])
    assert not {m for m in added if m.startswith("lift3d")}, sorted(added)


def test_every_kind_has_a_hook_and_a_registry(registries):
    from lift3d.plugins import KINDS

    assert set(registries) == set(KINDS)


def test_the_readme_names_every_kind(registries):
    text = _section((ROOT / "README.md").read_text(), "## Data and plugins")
    listed = re.search(r"registry that plugins add to: (.*?)\.", " ".join(text.split())).group(1)
    kinds = [k.strip() for k in re.split(r",| and ", listed) if k.strip()]
    assert sorted(kinds) == sorted(r.kind.replace("_", " ") for r in registries.values())


def test_the_plugins_page_lists_every_kind_and_its_builtins(registries):
    rows = _table(_section((ROOT / "docs" / "pages" / "plugins.md").read_text(), "Every kind of extension"))
    table = {_ticked(row[0])[0]: row for row in rows}
    assert sorted(table) == sorted(registries)
    manager = PluginManager(autoload=False)  # the built-ins only: lift3d's own entry points and decorators
    for kind, (_, builtins, _, hook) in table.items():
        assert sorted(_ticked(builtins)) == manager.registry(kind).names(), kind
        assert _ticked(hook) == [f"lift3d_register_{kind}(registry)"]


def test_the_glossary_defines_every_kind_once(registries):
    rows = _table(_section(ARCHITECTURE.read_text(), "## Glossary"))
    terms = [row[0] for row in rows]
    assert len(terms) == len(set(terms))
    assert set(terms) == {r.noun for r in registries.values()}
    assert all(row[1] and _ticked(row[2]) for row in rows)


def test_the_where_it_goes_table_names_each_registry_and_where_its_builtins_live(registries):
    rows = [row for row in _table(_section(ARCHITECTURE.read_text(), "## Where a new piece goes")) if _ticked(row[0])]
    table = {_ticked(row[0])[0]: row for row in rows}
    assert sorted(table) == sorted(registries)
    manager = PluginManager(autoload=False)
    for kind, (_, goes_in, registry_cell) in table.items():
        registry = registries[kind]
        name, path = _ticked(registry_cell)
        module = sys.modules[registry.module]
        assert getattr(module, name) is registry and Path(module.__file__) == ROOT / path, kind
        pattern = re.escape(_ticked(goes_in)[0]).replace(re.escape("<name>"), r"[a-z0-9_]+") + "$"
        for entry in manager.registry(kind).entries():
            where = Path(sys.modules[entry.plugin].__file__).relative_to(ROOT).as_posix()
            assert re.match(pattern, where), f"{kind} {entry.name!r} lives in {where}, not in {_ticked(goes_in)[0]}"
