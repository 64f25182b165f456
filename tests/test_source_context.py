"""2.5D source context (lift3d/data/context.py): stage 1 trains with neighbouring source slices on
channels, stage 2 and synthesis inherit it, and a volume's slice k sees what training item k saw."""

from __future__ import annotations

import json

import pytest
import torch

from lift3d.plugins import create
from lift3d.data.context import centre_with_context, context_indices, padded_indices, with_source_context
from lift3d.sampling.synthesis import load_synthesis_model, synthesize
from lift3d.data.dataset import stack_items as stack
from lift3d.training.data_order import LatentEncoder
from lift3d.training.loop import train
from test_training import tiny_cfg


def test_each_slice_gets_its_neighbours_offset_major_with_the_edges_repeated():
    x = torch.randn(2, 3, 5, 4, 4)
    y = with_source_context(x, 1)
    assert y.shape == (2, 9, 5, 4, 4)
    for k in range(5):
        below, above = max(k - 1, 0), min(k + 1, 4)
        assert torch.equal(y[:, :, k], torch.cat([x[:, :, below], x[:, :, k], x[:, :, above]], dim=1))
    assert with_source_context(x, 0) is x
    assert context_indices(0, 5, 2).tolist() == [0, 0, 0, 1, 2]


def test_a_stage1_item_sees_what_slice_k_of_its_volume_sees():
    dataset = create("datasets", "phantom", split="train", size=16, num_slices=6, num_subjects=2)
    view = dataset.slices(context=1)
    item = view[3]  # subject 0, slice 3
    assert item["source"].shape == (1, 3, 16, 16) and item["target"].shape == (1, 16, 16)
    identity = create("autoencoders", "identity")
    encoder = LatentEncoder(identity, cache=True, context=1)
    batch = {"source": item["source"][None], "target": item["target"][None], "index": [3]}
    _, per_slice = encoder(batch, torch.device("cpu"))
    volume = dataset[0]
    whole = with_source_context(volume.source[None], 1)
    assert torch.equal(per_slice[:, :, 0], whole[:, :, 3])
    assert torch.equal(centre_with_context(item["source"][None], 1)[:, :, 0], whole[:, :, 3])


@pytest.mark.parametrize("start", [0, 2, 4])
def test_a_stage2_window_keeps_the_real_neighbours_of_its_edge_slices(start):
    """A window of slices [start, start + 2) carries the whole volume's context, not its own edge repeated."""
    dataset = create("datasets", "phantom", split="train", size=16, num_slices=6, num_subjects=2)
    view = dataset.volumes(window=2, stride=2, context=1)
    item = view[start // 2]
    assert view.starts == [0, 2, 4] and item["start"] == start
    assert item["source"].shape == (1, 4, 16, 16) and item["target"].shape == (1, 2, 16, 16)
    assert padded_indices(start, 2, 6, 1).tolist() == [max(start - 1, 0), start, start + 1, min(start + 2, 5)]
    encoder = LatentEncoder(create("autoencoders", "identity"), cache=False, context=1)
    batch = {"source": item["source"][None], "target": item["target"][None], "index": [0], "start": [start]}
    _, windowed = encoder(batch, torch.device("cpu"))
    whole = with_source_context(dataset[0].source[None], 1)
    assert torch.equal(windowed, whole[:, :, start:start + 2])
    # the whole volume, padded or not, gives the same channels
    padded = dataset.volumes(context=1)[0]
    assert torch.equal(encoder({**stack([padded]), "index": [0]}, torch.device("cpu"))[1], whole)
    assert torch.equal(encoder({"source": dataset[0].source[None], "target": dataset[0].target[None], "index": [0]},
                               torch.device("cpu"))[1], whole)


def test_stage2_and_synthesis_inherit_the_context(tmp_path):
    stage1 = train(tiny_cfg(tmp_path / "s1", model={"source_context": 1}, run={"max_steps": 2}))
    settings = json.loads((stage1 / "lift3d_training.json").read_text())
    assert settings["source_context"] == 1
    unet_config = json.loads((stage1 / "config.json").read_text())
    assert unet_config["in_channels"] == 1 + 3  # noisy target + three source slices (pixel space)

    stage2 = train(tiny_cfg(tmp_path / "s2", stage="volumes", model={"pretrained": str(stage1)},
                            data={"batch_size": 1}, run={"max_steps": 1}))
    assert json.loads((stage2 / "lift3d_training.json").read_text())["source_context"] == 1
    model = load_synthesis_model(stage2, device="cpu")
    source = create("datasets", "phantom", split="train", size=16, num_slices=4, num_subjects=5)[0].source[None]
    out = synthesize(model, source, scheduler="ddim", steps=2, seed=0, progress=False)
    assert out.shape == source.shape and torch.isfinite(out).all()

    # With its volumetric layers switched off, the stage-2 model is the stage-1 model (only the
    # volumetric layers trained), context and all.
    a = synthesize(load_synthesis_model(stage1, device="cpu"), source, scheduler="ddim", steps=2, seed=0, progress=False)
    b = synthesize(model, source, scheduler="ddim", steps=2, seed=0, slice_wise=True, progress=False)
    assert (a - b).abs().max() < 1e-4, (a - b).abs().max()


def test_a_stage2_context_that_contradicts_stage1_is_one_line(tmp_path):
    stage1 = train(tiny_cfg(tmp_path / "s1", model={"source_context": 1}, run={"max_steps": 1}))
    with pytest.raises(ValueError, match=r"trained with source_context 1, but this run says 2"):
        train(tiny_cfg(tmp_path / "s2", stage="volumes", model={"pretrained": str(stage1), "source_context": 2},
                       data={"batch_size": 1}))
    assert not (tmp_path / "s2").exists()


def test_the_icbm_example_configs_run_the_winning_recipe(tmp_path):
    """examples/configs/icbm-stage{1,2}.toml, shortened: 2.5D stage 1, then a stage 2 that inherits it and
    exports its best validation step."""
    from pathlib import Path

    from lift3d.cli.finetune import main as finetune

    configs = Path(__file__).resolve().parents[1] / "examples" / "configs"
    small = ["--data.options", "{size = 16, num_slices = 8, num_train = 2, num_val = 1, num_test = 1, voxel_mm = 8}",
             "--run.checkpoint_every", "0"]
    assert finetune(["--config", str(configs / "icbm-stage1.toml"), "--run.output_dir", str(tmp_path / "s1"),
                     "--run.max_steps", "2", "--data.batch_size", "4", *small]) == 0
    assert json.loads((tmp_path / "s1" / "model" / "lift3d_training.json").read_text())["source_context"] == 1
    assert finetune(["--config", str(configs / "icbm-stage2.toml"), "--run.output_dir", str(tmp_path / "s2"),
                     "--model.pretrained", str(tmp_path / "s1" / "model"), "--run.max_steps", "2",
                     "--run.validate_every", "1", "--run.validate_steps", "2", "--data.val_volumes", "1", *small]) == 0
    settings = json.loads((tmp_path / "s2" / "model" / "lift3d_training.json").read_text())
    assert settings["source_context"] == 1 and settings["stage"] == "volumes"
