"""The low-rank layer's rank floor, r = max(rank_min, C/8) (at most C), and its fixed-down backward that keeps
no full-width tensor."""

from __future__ import annotations

import pytest
import torch

import lift3d
from lift3d.layers.low_rank import RANK_MIN, LowRankVolumetricConv, rank_for
from tests.conftest import tiny_unet2d


def test_the_floor_lifts_narrow_layers_only():
    assert rank_for(64, rank_min=16) == 16 and rank_for(128, rank_min=16) == 16 and rank_for(256, rank_min=16) == 32
    assert rank_for(8, rank_min=16) == 8  # never wider than the layer
    assert rank_for(64, rank=4, rank_min=16) == 4  # an explicit rank is what was asked for
    assert rank_for(64, rank_ratio=0.5, rank_min=16) == 32
    assert rank_for(64) == 8  # the function's own default: no floor (slice attention sizes itself with it)
    assert [LowRankVolumetricConv(c).rank for c in (16, 64, 512)] == [min(c, max(RANK_MIN, c // 8)) for c in (16, 64, 512)]
    assert LowRankVolumetricConv(64, rank_min=1).rank == 8


@pytest.mark.parametrize("bad", [0, -3, True, 2.0, "16"])
def test_a_bad_floor_names_itself(bad):
    with pytest.raises(ValueError, match=f"rank_min must be a positive integer, got {bad!r}"):
        LowRankVolumetricConv(32, rank_min=bad)


def test_inflate_takes_the_floor_and_a_saved_model_keeps_it(tmp_path):
    floored = lift3d.inflate(tiny_unet2d(), "low-rank")
    assert {c: layer.rank for _, layer in lift3d.volumetric_layers(floored) for c in [layer.channels]} == {
        16: min(16, RANK_MIN), 32: min(32, max(RANK_MIN, 4))}
    unfloored = lift3d.inflate(tiny_unet2d(), "low-rank", rank_min=1)
    assert {layer.rank for _, layer in lift3d.volumetric_layers(unfloored)} == {2, 4}
    x, t = torch.randn(1, 2, 3, 16, 16), torch.tensor([5])
    with torch.no_grad():
        assert torch.equal(floored(x, t).sample, unfloored(x, t).sample)  # identity either way
    lift3d.save_lifted(unfloored, tmp_path / "model")
    loaded = lift3d.load_lifted(tmp_path / "model")
    assert {layer.rank for _, layer in lift3d.volumetric_layers(loaded)} == {2, 4}


@pytest.mark.parametrize("padding_mode", ["zeros", "replicate"])
def test_fixed_down_gradients_equal_the_reference_and_keep_no_full_width_tensor(padding_mode):
    """train_down=False: the input's gradient comes from the fixed weight alone, so the layer's input (the host
    conv's output, C channels) is not saved for backward; the gradients equal autograd's through the
    einops reference."""
    layer = LowRankVolumetricConv(32, train_down=False, padding_mode=padding_mode)
    layer.init_random_(generator=torch.Generator().manual_seed(0))
    x = torch.randn(3 * 4, 32, 5, 5, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = layer(x, 4)
    assert not [t for t in saved if t.dim() == 4 and t.shape[1] == 32]  # only r-channel tensors and weights
    grad = torch.randn_like(out)
    out.backward(grad)
    ours = [x.grad.clone()] + [p.grad.clone() for p in layer.parameters()]
    x.grad = None
    layer.zero_grad()
    reference = layer.forward_reference(x, 4)
    reference.backward(grad)
    torch.testing.assert_close(out, reference, atol=1e-5, rtol=1e-5)
    for mine, theirs in zip(ours, [x.grad] + [p.grad for p in layer.parameters()]):
        torch.testing.assert_close(mine, theirs, atol=1e-4, rtol=1e-4)


def test_fixed_down_under_bf16_autocast_gives_gradients_in_the_input_dtype():
    layer = LowRankVolumetricConv(16, train_down=False)
    layer.init_random_()
    x = torch.randn(4, 16, 3, 3, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = torch.nn.functional.conv2d(x, torch.eye(16)[:, :, None, None])  # a bf16 host output
        out = layer(y, 2)
    assert out.dtype == torch.bfloat16
    out.float().square().sum().backward()
    assert x.grad.dtype == torch.float32 and torch.isfinite(x.grad).all() and layer.up_weight.grad is not None


def test_a_low_rank_export_from_before_the_floor_still_loads(tmp_path):
    """Lift settings without rank or rank_min were written before the floor: they load with the plain C/8 rank;
    new exports record the floor they were built with."""
    import json

    import lift3d
    from lift3d.lifting.checkpoint import load_lifted, save_lifted
    from tests.conftest import tiny_unet2d

    old = tiny_unet2d()
    lift3d.inflate(old, "low-rank", rank_min=1)
    save_lifted(old, tmp_path / "old")
    settings = json.loads((tmp_path / "old" / "lift3d.json").read_text())
    settings["lift"]["options"].pop("rank_min")  # as written before the floor existed
    (tmp_path / "old" / "lift3d.json").write_text(json.dumps(settings))
    loaded = load_lifted(tmp_path / "old")
    for (name, a), (_, b) in zip(old.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name

    new = tiny_unet2d()
    lift3d.inflate(new, "low-rank")
    save_lifted(new, tmp_path / "new")
    assert json.loads((tmp_path / "new" / "lift3d.json").read_text())["lift"]["options"] == {"rank_min": 16}
    load_lifted(tmp_path / "new")
