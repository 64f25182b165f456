"""Tests for lift3d/plugins (registry, manager, entry-point loading) and the ``lift3d plugins`` command."""

import importlib.metadata
import sys
import types

import pytest

from lift3d.layers import registry as layer_kinds

from lift3d import hookimpl
from lift3d.cli import main as cli_main
from lift3d.plugins import AUTOLOAD_ENV, PluginError, PluginManager, Registry
from lift3d.plugins import manager as manager_module

BUILTINS = {
    "autoencoders": {"identity", "kl"},
    "timestep_samplers": {"make-a-volume", "uniform-slice", "uniform-volume"},
}


class _Sampler:
    per_volume = True


class _ThirdParty:
    """A plugin object that adds one dataset and one timestep sampler."""

    @hookimpl
    def lift3d_register_datasets(self, registry):
        registry.add("fake-dataset", list)

    @hookimpl
    def lift3d_register_timestep_samplers(self, registry):
        registry.add("fake-sampler", _Sampler)


@pytest.fixture
def fake_distribution(monkeypatch):
    """An installed distribution whose entry point is called ``datasets``, as lift3d's own is."""
    manager_module._module_distributions()  # fill the real cache before distributions() is faked
    module = types.ModuleType("fake_lift3d_plugin")
    third_party = _ThirdParty()
    module.lift3d_register_datasets = third_party.lift3d_register_datasets
    module.lift3d_register_timestep_samplers = third_party.lift3d_register_timestep_samplers
    monkeypatch.setitem(sys.modules, "fake_lift3d_plugin", module)
    ep = importlib.metadata.EntryPoint(name="datasets", value="fake_lift3d_plugin", group="lift3d")
    dist = types.SimpleNamespace(metadata={"Name": "fake-dist"}, entry_points=[ep])
    real = importlib.metadata.distributions
    monkeypatch.setattr(importlib.metadata, "distributions", lambda: [*real(), dist])
    monkeypatch.delenv(AUTOLOAD_ENV, raising=False)
    return dist


@pytest.mark.parametrize("kind", sorted(BUILTINS))
def test_all_builtins_registered_by_lift3d(kind):
    registry = PluginManager(autoload=False).registry(kind)
    assert BUILTINS[kind] <= set(registry.names())
    for entry in registry.entries():
        if entry.name in BUILTINS[kind]:
            assert entry.package == "lift3d"
            assert entry.plugin == f"lift3d_plugins.{kind}"


def test_builtins_register_through_entry_points():
    names = {ep.value for ep in importlib.metadata.entry_points(group="lift3d")}
    assert set(manager_module.BUILTIN_PLUGINS) <= names


def test_duplicate_name_names_both_plugins():
    class Clash:
        @hookimpl
        def lift3d_register_timestep_samplers(self, registry):
            registry.add("make-a-volume", _Sampler)

    with pytest.raises(PluginError) as info:
        PluginManager(autoload=False, extra_plugins=(Clash(),))
    message = str(info.value)
    assert "timestep sampler 'make-a-volume' is registered twice" in message
    assert "lift3d_plugins.timestep_samplers (lift3d)" in message
    assert f"{__name__} ({__name__})" in message  # the clashing plugin: its module and package


def test_unknown_name_lists_available():
    manager = PluginManager(autoload=False)
    with pytest.raises(PluginError, match=r"Unknown timestep sampler 'make-a-volum'; available: make-a-volume, uniform-slice, uniform-volume$"):
        manager.timestep_samplers.create("make-a-volum")
    with pytest.raises(PluginError, match=r"Unknown autoencoder 'vae'; available: identity, kl$"):
        manager.registry("autoencoders").get("vae")
    with pytest.raises(PluginError, match=r"Unknown plugin kind 'samplers'; available: datasets, autoencoders, timestep_samplers"):
        manager.registry("samplers")


def test_misspelt_option_lists_the_valid_ones():
    manager = PluginManager(autoload=False)
    with pytest.raises(PluginError, match=r"dataset 'phantom' has no option 'num_subject'; valid: .*num_subjects"):
        manager.registry("datasets").create("phantom", split="train", num_subject=3)
    with pytest.raises(PluginError, match=r"autoencoder 'kl' has no option 'pth'; valid: path, config"):
        manager.registry("autoencoders").create("kl", pth="vae")
    assert manager.registry("datasets").create("phantom", split="train", num_subjects=3, size=16, num_slices=4)


def test_bad_names_rejected():
    with pytest.raises(PluginError, match="non-empty strings, got ''"):
        Registry("datasets").add("", list)


def test_third_party_entry_point_loads_even_if_named_like_a_builtin(fake_distribution):
    manager = PluginManager()
    assert "fake-dataset" in manager.datasets
    assert manager.timestep_samplers.create("fake-sampler").per_volume
    assert BUILTINS["timestep_samplers"] <= set(manager.timestep_samplers.names())
    assert manager.pm.has_plugin("fake-dist:datasets")


@pytest.mark.parametrize("switch", ["env", "argument"])
def test_autoload_switched_off_hides_third_party_keeps_builtins(fake_distribution, monkeypatch, switch):
    if switch == "env":
        monkeypatch.setenv(AUTOLOAD_ENV, "1")
        manager = PluginManager()
    else:
        manager = PluginManager(autoload=False)
    assert "fake-dataset" not in manager.datasets
    assert "fake-sampler" not in manager.timestep_samplers
    for kind, names in BUILTINS.items():
        assert names <= set(manager.registry(kind).names())


def test_broken_plugin_import_names_the_plugin(monkeypatch):
    manager_module._module_distributions()
    ep = importlib.metadata.EntryPoint(name="broken", value="no_such_module_xyz", group="lift3d")
    dist = types.SimpleNamespace(metadata={"Name": "broken-dist"}, entry_points=[ep])
    monkeypatch.setattr(importlib.metadata, "distributions", lambda: [dist])
    monkeypatch.delenv(AUTOLOAD_ENV, raising=False)
    with pytest.raises(PluginError, match=r"lift3d plugin broken-dist:broken \(no_such_module_xyz\) failed to import"):
        PluginManager()


def _run_cli(monkeypatch, capsys, argv, manager):
    monkeypatch.setattr(cli_main, "get_plugin_manager", lambda: manager)
    code = cli_main.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_plugins_command_lists_every_kind(monkeypatch, capsys):
    manager = PluginManager(autoload=False, extra_plugins=(_ThirdParty(),))
    code, out, _ = _run_cli(monkeypatch, capsys, ["plugins"], manager)
    assert code == 0
    sections = {}
    for line in out.splitlines():
        if line and not line.startswith(" "):
            kind = line.rstrip(":")
            sections[kind] = []
        elif line.strip():
            sections[kind].append(line.split())
    assert list(sections) == ["datasets", "autoencoders", "timestep_samplers", "objectives", "segmenters", "layer_kinds"]
    assert ["kl", "lift3d", "lift3d_plugins.autoencoders"] in sections["autoencoders"]
    assert ["make-a-volume", "lift3d", "lift3d_plugins.timestep_samplers"] in sections["timestep_samplers"]
    assert ["fake-sampler", __name__, __name__] in sections["timestep_samplers"]
    listed = {kind: {row[0] for row in rows} for kind, rows in sections.items()}
    for kind in ("datasets", "autoencoders", "timestep_samplers"):
        assert listed[kind] == set(manager.registry(kind).names())
    assert listed["layer_kinds"] == set(layer_kinds.build_registry(manager.pm).names())
    assert {"full", "low-rank", "depthwise", "slice-attention"} <= listed["layer_kinds"]


def test_plugins_command_kind_filter_and_empty_kind(monkeypatch, capsys):
    code, out, _ = _run_cli(monkeypatch, capsys, ["plugins", "--kind", "datasets"], PluginManager(autoload=False))
    # The built-in datasets module may or may not register anything yet; either way only one section.
    assert code == 0 and out.startswith("datasets:\n") and "autoencoders" not in out


def test_plugins_command_bad_kind_and_no_command(monkeypatch, capsys):
    with pytest.raises(SystemExit) as info:
        _run_cli(monkeypatch, capsys, ["plugins", "--kind", "vaes"], PluginManager(autoload=False))
    assert info.value.code == 2
    assert "invalid choice: 'vaes'" in capsys.readouterr().err
    code, out, err = _run_cli(monkeypatch, capsys, [], PluginManager(autoload=False))
    assert code == 2 and "plugins" in err and "usage: lift3d" in err


def test_plugin_errors_become_one_line(monkeypatch, capsys):
    def broken():
        raise PluginError("Unknown dataset 'x'; available: none")

    monkeypatch.setattr(cli_main, "get_plugin_manager", broken)
    assert cli_main.main(["plugins"]) == 2
    err = capsys.readouterr().err
    assert err.strip().endswith("error: Unknown dataset 'x'; available: none") and len(err.strip().splitlines()) == 1
