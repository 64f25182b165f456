"""Tests for lift3d/plugins (the registry, the manager, entry-point loading per kind) and ``lift3d plugins``."""

import importlib.metadata
import importlib.util
import sys
import types

import pytest

from lift3d import hookimpl
from lift3d.cli import main as cli_main
from lift3d.layers import registry as layer_kinds
from lift3d.plugins import AUTOLOAD_ENV, KINDS, PluginError, PluginManager, Registry, using_plugins
from lift3d.plugins import manager as manager_module
from lift3d.plugins import registry as registry_module
from lift3d.plugins.registries import DATASETS, TIMESTEP_SAMPLERS

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


def _fake_distribution(monkeypatch, name, entry_points):
    """An installed distribution ``name`` with ``entry_points`` ({entry-point name: module object})."""
    registry_module._module_distributions()  # fill the real cache before distributions() is faked
    eps = []
    for ep_name, module in entry_points.items():
        monkeypatch.setitem(sys.modules, module.__name__, module)
        eps.append(importlib.metadata.EntryPoint(name=ep_name, value=module.__name__, group="lift3d"))
    dist = types.SimpleNamespace(metadata={"Name": name}, entry_points=eps)
    real = importlib.metadata.distributions
    monkeypatch.setattr(importlib.metadata, "distributions", lambda: [*real(), dist])
    monkeypatch.delenv(AUTOLOAD_ENV, raising=False)
    return dist


@pytest.fixture
def fake_distribution(monkeypatch):
    """An installed distribution whose entry point is called ``datasets``, as lift3d's own is."""
    module = types.ModuleType("fake_lift3d_plugin")
    third_party = _ThirdParty()
    module.lift3d_register_datasets = third_party.lift3d_register_datasets
    module.lift3d_register_timestep_samplers = third_party.lift3d_register_timestep_samplers
    return _fake_distribution(monkeypatch, "fake-dist", {"datasets": module})


@pytest.mark.parametrize("kind", sorted(BUILTINS))
def test_all_builtins_registered_by_lift3d(kind):
    registry = PluginManager(autoload=False).registry(kind)
    assert BUILTINS[kind] <= set(registry.names())
    for entry in registry.entries():
        if entry.name in BUILTINS[kind]:
            assert entry.package == "lift3d"
            assert entry.plugin == f"lift3d_plugins.{kind}"


def test_builtin_plugins_are_listed_once_as_entry_points_named_after_their_kind():
    """The built-ins of plugins/ are lift3d's own entry points, one per kind, and nothing else lists them."""
    eps = {ep.name: ep.value for ep in importlib.metadata.distribution("lift3d").entry_points if ep.group == "lift3d"}
    assert eps == {"autoencoders": "lift3d_plugins.autoencoders", "datasets": "lift3d_plugins.datasets",
                   "timestep_samplers": "lift3d_plugins.timestep_samplers"}
    assert set(eps) <= set(KINDS)
    assert not hasattr(manager_module, "BUILTIN_PLUGINS") and not hasattr(layer_kinds, "BUILTIN")


def test_every_kind_has_a_hook():
    assert {"datasets", "autoencoders", "timestep_samplers", "layer_kinds", "objectives", "segmenters", "solvers",
            "stages"} == set(KINDS)


def test_the_decorator_registers_and_returns_its_argument():
    widgets = Registry("widgets", catalogue=False)

    @widgets.register("round")
    class Round:
        def __init__(self, *, radius=1):
            self.radius = radius

    assert widgets.get("round") is Round and widgets.create("round", radius=2).radius == 2
    assert widgets.entry("round").plugin == __name__ and widgets.names() == ["round"] and "round" in widgets
    instance = widgets.register("square")(object())  # an already-built object registers as it is
    assert widgets.get("square") is instance and len(widgets) == 2


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


def test_a_second_registry_of_a_kind_is_refused():
    with pytest.raises(PluginError, match=r"a registry of layer_kinds already exists, in lift3d.layers.registry"):
        Registry("layer_kinds")


def test_unknown_name_lists_available():
    manager = PluginManager(autoload=False)
    with pytest.raises(PluginError, match=r"Unknown timestep sampler 'make-a-volum'; available: make-a-volume, uniform-slice, uniform-volume$"):
        manager.timestep_samplers.create("make-a-volum")
    with pytest.raises(PluginError, match=r"Unknown autoencoder 'vae'; available: identity, kl$"):
        manager.registry("autoencoders").get("vae")
    with pytest.raises(PluginError, match=r"Unknown plugin kind 'samplers'; available: autoencoders, datasets, .*timestep_samplers"):
        manager.registry("samplers")
    with pytest.raises(PluginError, match=r"Unknown layer kind 'ful'; available: depthwise, full, low-rank, slice-attention"):
        layer_kinds.create("ful", 4, kernel_size=3, padding_mode="zeros")


def test_misspelt_option_lists_the_valid_ones():
    manager = PluginManager(autoload=False)
    with pytest.raises(PluginError, match=r"dataset 'phantom' has no option 'num_subject'; valid: .*num_subjects"):
        manager.registry("datasets").create("phantom", split="train", num_subject=3)
    with pytest.raises(PluginError, match=r"autoencoder 'kl' has no option 'pth'; valid: path, config"):
        manager.registry("autoencoders").create("kl", pth="vae")
    assert manager.registry("datasets").create("phantom", split="train", num_subjects=3, size=16, num_slices=4)


def test_bad_names_rejected():
    with pytest.raises(PluginError, match="non-empty strings, got ''"):
        Registry("widgets", catalogue=False).add("", list)
    with pytest.raises(PluginError, match="a registry kind must be a snake_case name, got 'layer-kinds'"):
        Registry("layer-kinds", catalogue=False)


def test_third_party_entry_point_loads_even_if_named_like_a_builtin(fake_distribution):
    manager = PluginManager()
    assert "fake-dataset" in manager.datasets
    # Named "datasets", the entry point fills the datasets only: its timestep-sampler hook is not called.
    assert "fake-sampler" not in manager.timestep_samplers
    assert BUILTINS["timestep_samplers"] <= set(manager.timestep_samplers.names())
    assert manager.pm.has_plugin("fake-dist:datasets")


def test_a_generic_entry_point_fills_every_kind(monkeypatch):
    module = types.ModuleType("fake_generic_plugin")
    third_party = _ThirdParty()
    module.lift3d_register_datasets = third_party.lift3d_register_datasets
    module.lift3d_register_timestep_samplers = third_party.lift3d_register_timestep_samplers
    _fake_distribution(monkeypatch, "generic-dist", {"anything": module})
    manager = PluginManager()
    assert "fake-dataset" in manager.datasets and "fake-sampler" in manager.timestep_samplers


@pytest.mark.parametrize("switch", ["env", "argument"])
def test_autoload_switched_off_hides_third_party_keeps_builtins(fake_distribution, monkeypatch, switch):
    if switch == "env":
        monkeypatch.setenv(AUTOLOAD_ENV, "1")
        manager = PluginManager()
    else:
        manager = PluginManager(autoload=False)
    assert "fake-dataset" not in manager.datasets
    for kind, names in BUILTINS.items():
        assert names <= set(manager.registry(kind).names())


def test_broken_plugin_import_names_the_plugin(monkeypatch):
    registry_module._module_distributions()
    ep = importlib.metadata.EntryPoint(name="broken", value="no_such_module_xyz", group="lift3d")
    dist = types.SimpleNamespace(metadata={"Name": "broken-dist"}, entry_points=[ep])
    monkeypatch.setattr(importlib.metadata, "distributions", lambda: [dist])
    monkeypatch.delenv(AUTOLOAD_ENV, raising=False)
    with pytest.raises(PluginError, match=r"lift3d plugin broken-dist:broken \(no_such_module_xyz\) failed to import"):
        PluginManager()


def test_process_wide_registries_load_their_kinds_plugins_once_and_only_on_a_miss(monkeypatch):
    """A built-in name is found without loading anything; a miss loads this kind's plugins once."""
    calls = []
    monkeypatch.setattr(registry_module, "_plugin_loader", calls.append)
    widgets = Registry("widgets_under_test", catalogue=False)
    widgets._loaded = False  # as a catalogued registry starts
    widgets.add("own", list)
    assert widgets.get("own") is list and calls == []
    assert "other" not in widgets and calls == [widgets]
    with pytest.raises(PluginError, match="Unknown widgets under test 'other'; available: own"):
        widgets.get("other")
    assert widgets.names() == ["own"] and calls == [widgets]


def test_a_failed_plugin_load_leaves_nothing_half_registered(monkeypatch):
    def half(registry):
        registry.add("half", list)
        raise PluginError("lift3d plugin x:y (m) failed to import: boom")

    monkeypatch.setattr(registry_module, "_plugin_loader", half)
    widgets = Registry("widgets_under_test", catalogue=False)
    widgets._loaded = False
    for _ in range(2):  # the same error each time, not "registered twice" the second time
        with pytest.raises(PluginError, match="failed to import: boom"):
            widgets.names()
    assert "half" not in widgets._entries


def test_using_plugins_adds_for_a_block_then_removes():
    with using_plugins(_ThirdParty()):
        assert "fake-dataset" in DATASETS and TIMESTEP_SAMPLERS.create("fake-sampler").per_volume
    assert "fake-dataset" not in DATASETS and "fake-sampler" not in TIMESTEP_SAMPLERS.names()


def _run_cli(monkeypatch, capsys, argv, manager):
    monkeypatch.setattr(cli_main, "get_plugin_manager", lambda: manager)
    code = cli_main.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def _sections(out):
    sections = {}
    for line in out.splitlines():
        if line and not line.startswith(" "):
            kind = line.rstrip(":")
            sections[kind] = []
        elif line.strip():
            sections[kind].append(line.split())
    return sections


def test_plugins_command_lists_every_kind(monkeypatch, capsys):
    cli_main.import_registries()
    manager = PluginManager(autoload=False, extra_plugins=(_ThirdParty(),))
    code, out, _ = _run_cli(monkeypatch, capsys, ["plugins"], manager)
    assert code == 0
    sections = _sections(out)
    assert list(sections) == sorted(registry_module.all_registries())
    assert {"datasets", "autoencoders", "timestep_samplers", "objectives", "segmenters", "layer_kinds"} <= set(sections)
    assert ["kl", "lift3d", "lift3d_plugins.autoencoders"] in sections["autoencoders"]
    assert ["make-a-volume", "lift3d", "lift3d_plugins.timestep_samplers"] in sections["timestep_samplers"]
    assert ["fake-sampler", __name__, __name__] in sections["timestep_samplers"]
    assert ["low-rank", "lift3d", "lift3d.layers.low_rank"] in sections["layer_kinds"]
    assert ["tissue-unet", "lift3d", "lift3d.evaluation.tissue_unet"] in sections["segmenters"]
    for kind, rows in sections.items():
        assert {row[0] for row in rows} - {"(none)"} == set(manager.registry(kind).names())


def test_plugins_command_lists_solvers_and_stages(capsys):
    """The real command: it imports every registry module itself, the solvers' and the stages' included."""
    assert cli_main.main(["plugins"]) == 0
    sections = _sections(capsys.readouterr().out)
    for kind, package in (("solvers", "lift3d.sampling.solvers"), ("stages", "lift3d.training.stages")):
        if importlib.util.find_spec(f"{package}.registry") is None:
            pytest.skip(f"{package} has no registry yet")
        assert sections[kind] and sections[kind] != [["(none)"]]


def test_plugins_command_kind_filter(monkeypatch, capsys):
    code, out, _ = _run_cli(monkeypatch, capsys, ["plugins", "--kind", "layer_kinds"], PluginManager(autoload=False))
    assert code == 0 and out.startswith("layer_kinds:\n") and "datasets" not in out
    assert {line.split()[0] for line in out.splitlines()[1:]} == set(layer_kinds.names())


def test_plugins_command_bad_kind_and_no_command(monkeypatch, capsys):
    code, _, err = _run_cli(monkeypatch, capsys, ["plugins", "--kind", "vaes"], PluginManager(autoload=False))
    assert code == 2 and "error: Unknown plugin kind 'vaes'; available: autoencoders, datasets, " in err
    assert len(err.strip().splitlines()) == 1 and "layer_kinds" in err
    code, out, err = _run_cli(monkeypatch, capsys, [], PluginManager(autoload=False))
    assert code == 2 and "plugins" in err and "usage: lift3d" in err


def test_plugin_errors_become_one_line(monkeypatch, capsys):
    def broken():
        raise PluginError("Unknown dataset 'x'; available: none")

    monkeypatch.setattr(cli_main, "get_plugin_manager", broken)
    assert cli_main.main(["plugins"]) == 2
    err = capsys.readouterr().err
    assert err.strip().endswith("error: Unknown dataset 'x'; available: none") and len(err.strip().splitlines()) == 1
