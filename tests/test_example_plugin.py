"""The third-party plugin in examples/lift3d-example-plugin, really installed (no network).

It is pip-installed into a temporary folder; a subprocess with that folder on PYTHONPATH checks
that lift3d discovers its entry point, builds and uses its dataset and sampler, and lists them.
"""

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "lift3d-example-plugin"
PACKAGE = "lift3d-example-plugin"

PROBE = textwrap.dedent(
    """
    import contextlib, io, json, sys
    import torch
    import lift3d
    from lift3d.cli.main import main
    from lift3d.plugins import PluginManager, create

    lift3d.inflate(torch.nn.Conv2d(2, 2, 3))  # a built-in layer kind: found without loading any plugin
    result = {"loaded_before_asked": "lift3d_example_plugin" in sys.modules}
    manager = PluginManager()
    result.update({kind: manager.registry(kind).names() for kind in ("datasets", "autoencoders", "timestep_samplers")})
    if "spheres" in manager.datasets:
        entry = manager.datasets.entry("spheres")
        result["spheres_provider"] = [entry.package, entry.plugin]
        dataset = create("datasets", "spheres", num_subjects=2, num_slices=4, size=16)
        slices = dataset.slices()
        items = [slices[i] for i in range(len(slices))]
        result["num_slices"] = len(items)
        result["slice_shape"] = list(items[0]["source"].shape)
        values = torch.stack([it[key] for it in items for key in ("source", "target")])
        result["value_range"] = [values.min().item(), values.max().item()]
        result["volume_shape"] = list(dataset[1].source.shape)
        sampler = create("timestep_samplers", "low-noise-volume", max_fraction=0.25)
        t = sampler(8, 4, 1000, generator=torch.Generator().manual_seed(0))
        result["t"] = {"shape": list(t.shape), "dtype": str(t.dtype), "max": t.max().item(),
                       "shared": bool((t == t[:, :1]).all()), "per_volume": sampler.per_volume}
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        result["cli_code"] = main(["plugins"])
    result["cli"] = out.getvalue()
    print(json.dumps(result))
    """
)


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """The example plugin installed with pip into its own folder, from a copy (pip builds in-tree)."""
    root = tmp_path_factory.mktemp("example-plugin")
    source = shutil.copytree(EXAMPLE, root / "src", ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    target = root / "site"
    done = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--no-index",
         "--disable-pip-version-check", "--target", str(target), str(source)],
        capture_output=True, text=True, timeout=300,
    )
    if done.returncode:
        pytest.fail(f"pip could not install the example plugin (needs setuptools>=70.1):\n{done.stderr}")
    return target


def _probe(site, **env):
    environ = {k: v for k, v in os.environ.items() if k != "LIFT3D_DISABLE_PLUGIN_AUTOLOAD"}
    environ.update(env, PYTHONPATH=os.pathsep.join(filter(None, [str(site), environ.get("PYTHONPATH")])))
    done = subprocess.run(
        [sys.executable, "-c", PROBE], env=environ, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def _cli_rows(text):
    return [line.split() for line in text.splitlines() if line.startswith("  ")]


def test_installed_plugin_is_found_and_used(site):
    result = _probe(site)
    assert result["loaded_before_asked"] is False
    assert "spheres" in result["datasets"]
    assert "low-noise-volume" in result["timestep_samplers"]
    assert result["spheres_provider"] == [PACKAGE, "lift3d_example_plugin.datasets"]
    assert result["num_slices"] == 2 * 4
    assert result["slice_shape"] == [1, 16, 16] and result["volume_shape"] == [1, 4, 16, 16]
    assert result["value_range"] == [-1.0, 1.0]
    assert result["t"] == {"shape": [8, 4], "dtype": "torch.int64", "max": result["t"]["max"], "shared": True, "per_volume": True}
    assert 0 <= result["t"]["max"] < 250
    assert result["cli_code"] == 0
    rows = _cli_rows(result["cli"])
    assert ["spheres", PACKAGE, "lift3d_example_plugin.datasets"] in rows
    assert ["low-noise-volume", PACKAGE, "lift3d_example_plugin.timestep_samplers"] in rows
    assert ["make-a-volume", "lift3d", "lift3d_plugins.timestep_samplers"] in rows


def test_disable_autoload_hides_it_keeps_builtins(site):
    result = _probe(site, LIFT3D_DISABLE_PLUGIN_AUTOLOAD="1")
    assert "spheres" not in result["datasets"]
    assert "low-noise-volume" not in result["timestep_samplers"]
    assert {"make-a-volume", "uniform-slice", "uniform-volume"} <= set(result["timestep_samplers"])
    assert {"identity", "kl"} <= set(result["autoencoders"])
    assert PACKAGE not in result["cli"] and "make-a-volume" in result["cli"]
