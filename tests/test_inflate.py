import copy
import logging
import weakref

import pytest
import torch
from einops import rearrange
from torch import nn

import lift3d
from lift3d.layers import registry as layer_kinds
from tests.conftest import tiny_unet2d

KINDS = [(kind, {}) for kind in layer_kinds.names()] + [("low-rank", {"train_down": False}), ("full", {"groups": 4})]
"""Every registered kind with its defaults, plus the non-default options the trade table measures."""
KIND_IDS = [kind + "".join(f"-{k}={v}" for k, v in options.items()) for kind, options in KINDS]


def randomise(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    for _, layer in lift3d.volumetric_layers(model):
        layer.init_random_(std=0.2, generator=g)


def slices(x):
    return rearrange(x, "b c n h w -> (b n) c h w")


@pytest.mark.parametrize("n", [1, 7, 35, 100])
def test_lifted_output_equals_2d_output_exactly(unet2d, n):
    x = torch.randn(2, 2, n, 16, 16)
    t = torch.tensor([3, 900])
    with torch.no_grad():
        expected = unet2d(slices(x), t.repeat_interleave(n)).sample
        lift3d.inflate(unet2d)
        out = unet2d(x, t).sample
    assert out.shape == (2, 1, n, 16, 16)
    assert torch.equal(slices(out), expected)


@pytest.mark.parametrize("kind, options", KINDS, ids=KIND_IDS)
@pytest.mark.parametrize("b, n", [(1, 1), (2, 1), (1, 2), (3, 5)])
def test_every_kind_is_the_identity_at_init_for_any_batch(kind, options, b, n):
    # b = 1, n = 1 used to differ by 9e-7: the layer's output came back with other strides (of
    # size-1 dims) than its host's, and GroupNorm after the attention block took another kernel.
    unet = tiny_unet2d()
    x = torch.randn(b, 2, n, 16, 16)
    t = torch.arange(b) * 300 + 3
    with torch.no_grad():
        expected = unet(slices(x), t.repeat_interleave(n)).sample
        lift3d.inflate(unet, kind, **options)
        out = unet(x, t).sample
    assert torch.equal(slices(out), expected)


def test_one_slice_batch_of_one_is_bit_exact_on_a_unet_with_attention():
    """Issue 11: b = 1 and N = 1 on a UNet2DModel with attention differed by 5.7e-7."""
    unet = tiny_unet2d()
    x, t = torch.randn(1, 2, 1, 16, 16), torch.tensor([3])
    with torch.no_grad():
        expected = unet(x[:, :, 0], t).sample
        lift3d.inflate(unet, "full")
        assert torch.equal(unet(x, t).sample[:, :, 0], expected)


def test_plain_4d_batch_runs_as_the_2d_model(unet2d):
    lift3d.inflate(unet2d)
    randomise(unet2d)  # even with trained volumetric layers, a 4D batch is plain 2D
    x, t = torch.randn(6, 2, 16, 16), torch.full((6,), 10)
    with torch.no_grad():
        with lift3d.volumetric_disabled(unet2d):
            expected = unet2d(x, t).sample
        assert torch.equal(unet2d(x, t).sample, expected)


def test_per_slice_timesteps_and_flattened_batch_api(unet2d):
    lift3d.inflate(unet2d)
    randomise(unet2d)
    x = torch.randn(2, 2, 5, 16, 16)
    t = torch.randint(0, 1000, (2, 5))
    with torch.no_grad():
        volume_out = unet2d(x, t).sample
        with lift3d.volume_batch(unet2d, 5):
            flat_out = unet2d(slices(x), t.flatten()).sample
    assert torch.equal(slices(volume_out), flat_out)


@pytest.mark.parametrize("kind, options", KINDS, ids=KIND_IDS)
def test_volumes_stay_separate_and_neighbouring_slices_interact(unet2d, kind, options):
    lift3d.inflate(unet2d, kind, **options)
    randomise(unet2d)
    x = torch.randn(2, 2, 9, 16, 16)
    t = torch.tensor([50, 50])
    with torch.no_grad():
        base = unet2d(x, t).sample
        other = x.clone()
        other[1] += torch.randn_like(other[1])
        assert torch.equal(unet2d(other, t).sample[0], base[0])
        k = 4
        poked = x.clone()
        poked[0, :, k] += 1.0
        changed = unet2d(poked, t).sample
    diff = (changed - base).abs().amax(dim=(1, 3, 4))[0]  # per slice of volume 0
    assert diff[k - 1] > 0 and diff[k + 1] > 0
    assert torch.equal(changed[1], base[1])


def test_receptive_field_of_one_layer_is_one_slice_each_side():
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1))
    lift3d.inflate(model, where="spatial")
    randomise(model)
    x = torch.randn(1, 1, 7, 8, 8)
    with torch.no_grad():
        base = model(x)
        poked = x.clone()
        poked[:, :, 3] += 1
        diff = (model(poked) - base).abs().amax(dim=(0, 1, 3, 4))
    assert diff[2] > 0 and diff[3] > 0 and diff[4] > 0
    assert diff[0] == 0 and diff[1] == 0 and diff[5] == 0 and diff[6] == 0


def test_condition_model_broadcasts_encoder_hidden_states(unet2d_condition):
    x = torch.randn(2, 4, 5, 16, 16)
    t = torch.tensor([10, 700])
    context = torch.randn(2, 3, 8)
    with torch.no_grad():
        expected = unet2d_condition(slices(x), t.repeat_interleave(5),
                                    encoder_hidden_states=context.repeat_interleave(5, dim=0)).sample
        lift3d.inflate(unet2d_condition)
        out = unet2d_condition(x, t, encoder_hidden_states=context).sample
    assert torch.equal(slices(out), expected)


def test_timm_convnet():
    timm = pytest.importorskip("timm")
    model = timm.create_model("resnet10t", pretrained=False, num_classes=5).eval()
    x = torch.randn(2, 3, 4, 32, 32)
    with torch.no_grad():
        expected = model(slices(x))
        lift3d.inflate(model)
        out = model(x)
    assert out.shape == (2, 4, 5)
    assert torch.equal(rearrange(out, "b n k -> (b n) k"), expected)
    hosts = [h for h, _ in lift3d.volumetric_layers(model)]
    assert hosts and all(h.startswith("layer") for h in hosts)  # inside residual blocks, not the stem


class ResBlock(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(c, c, 3, padding=1), nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return x + self.conv2(torch.relu(self.conv1(x)))


class PlainNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1)
        self.block = ResBlock(8)
        self.head = nn.Conv2d(8, 1, 1)

    def forward(self, x):
        return self.head(self.block(self.stem(x)))


def test_plain_module_default_and_presets(caplog):
    model = PlainNet()
    x = torch.randn(1, 1, 6, 8, 8)
    expected = model(slices(x))
    with caplog.at_level(logging.INFO, logger="lift3d"):
        lift3d.inflate(model)
    assert "at resnet (auto: the spatial convs of residual blocks)" in caplog.text
    assert [h for h, _ in lift3d.volumetric_layers(model)] == ["block.conv1", "block.conv2"]
    assert torch.equal(slices(model(x)), expected)
    assert [h for h, _ in lift3d.volumetric_layers(lift3d.inflate(PlainNet(), where="spatial"))] == [
        "stem", "block.conv1", "block.conv2"]
    assert [h for h, _ in lift3d.volumetric_layers(lift3d.inflate(PlainNet(), where="block-output"))] == ["block"]
    picked = lift3d.inflate(PlainNet(), where=lambda name, m: name == "head")
    assert [h for h, _ in lift3d.volumetric_layers(picked)] == ["head"]


def test_default_placement_falls_back_to_every_spatial_conv_and_says_so(caplog):
    """Issue 11: inflate(model) refused a plain network without residual blocks."""
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 1), nn.Conv2d(8, 1, 3, padding=1))
    x = torch.randn(2, 1, 4, 8, 8)
    expected = model(slices(x))
    with caplog.at_level(logging.WARNING, logger="lift3d"):
        lift3d.inflate(model)
    assert [h for h, _ in lift3d.volumetric_layers(model)] == ["0", "3"]
    assert "spatial (auto: no residual blocks found, so every spatial conv)" in caplog.text
    assert "spatial (auto" in str(lift3d.report(model))
    assert torch.equal(slices(model(x)), expected)


def test_coarse_placement_skips_the_finest_level(unet2d):
    lift3d.inflate(unet2d, where="resnet-coarse")
    assert {c for _, c in lift3d.report(unet2d).hosts} == {32}
    assert lift3d.report(unet2d).num_layers == 10  # down 1 (2 convs), mid (4), up 0 (4); not the 16-ch level


def test_block_output_on_diffusers(unet2d):
    lift3d.inflate(unet2d, where="block-output")
    hosts = [h for h, _ in lift3d.volumetric_layers(unet2d)]
    assert hosts and all(h.split(".")[-2] == "resnets" for h in hosts)
    x = torch.randn(1, 2, 3, 16, 16)
    assert unet2d(x, torch.tensor([1])).sample.shape == (1, 1, 3, 16, 16)


def test_errors():
    model = PlainNet()
    with pytest.raises(ValueError, match="Unknown placement where='everywhere'; available: auto, resnet, spatial, "
                                         "block-output, resnet-coarse"):
        lift3d.inflate(model, where="everywhere")
    with pytest.raises(ValueError, match="matched no module"):
        lift3d.inflate(nn.Sequential(nn.Conv2d(1, 1, 1)))
    with pytest.raises(ValueError, match="Unknown layer kind 'fancy'; available: depthwise, full, low-rank, slice-attention"):
        lift3d.inflate(model, "fancy")
    with pytest.raises(ValueError, match="layer kind 'low-rank' has no option 'groups'; valid: .*rank"):
        lift3d.inflate(model, "low-rank", groups=2)
    assert not lift3d.is_lifted(model)
    lift3d.inflate(model)
    with pytest.raises(ValueError, match="already lifted"):
        lift3d.inflate(model)
    with pytest.raises(ValueError, match="not lifted"):
        lift3d.set_trainable(PlainNet())
    with pytest.raises(ValueError, match="available: volumetric, all"):
        lift3d.set_trainable(model, "head")


def test_report_counts_layers_and_overhead(unet2d):
    base = sum(p.numel() for p in unet2d.parameters())
    lift3d.inflate(unet2d, "full")
    rep = lift3d.report(unet2d)
    layers = list(lift3d.volumetric_layers(unet2d))
    assert rep.num_layers == len(layers) == 16
    assert rep.base_parameters == base
    assert rep.volumetric_parameters == sum(c * c * 3 + c for _, c in rep.hosts)
    assert rep.overhead == pytest.approx(rep.volumetric_parameters / base)
    assert "16 volumetric layers of kind 'full'" in str(rep)


@pytest.mark.parametrize("train_down", [True, False])
def test_low_rank_report_counts_its_fixed_projection_too(train_down):
    unet = tiny_unet2d()
    lift3d.inflate(unet, "low-rank", train_down=train_down, rank_min=1)  # r = C/8, below the default floor
    rep = lift3d.report(unet)
    r = {16: 2, 32: 4}
    assert rep.volumetric_parameters == sum(2 * r[c] * c + r[c] + r[c] * r[c] * 3 + c for _, c in rep.hosts)
    trainable = lift3d.set_trainable(unet, "volumetric")
    assert any(n.endswith("down_weight") for n in trainable) == train_down


@pytest.mark.parametrize("kind, options", KINDS, ids=KIND_IDS)
def test_parameter_names_unchanged_and_recognisable(unet2d, kind, options):
    before = [n for n, _ in unet2d.named_parameters()]
    state_2d = {k: v.clone() for k, v in unet2d.state_dict().items()}
    lift3d.inflate(unet2d, kind, **options)
    after = [n for n, _ in unet2d.named_parameters()]
    assert [n for n in after if not lift3d.is_volumetric_parameter(n)] == before
    assert all(".volumetric." in n for n in after if n not in before)
    unet2d.load_state_dict(state_2d)  # a 2D state dict still loads strictly
    partial = dict(unet2d.state_dict())
    partial.pop(next(k for k in partial if lift3d.is_volumetric_parameter(k)))
    with pytest.raises(RuntimeError, match="Missing key"):
        unet2d.load_state_dict(partial)


def test_layers_follow_host_dtype(unet2d):
    unet2d.to(torch.bfloat16)
    lift3d.inflate(unet2d)
    assert {layer.weight.dtype for _, layer in lift3d.volumetric_layers(unet2d)} == {torch.bfloat16}
    out = unet2d(torch.randn(1, 2, 3, 16, 16, dtype=torch.bfloat16), torch.tensor([5])).sample
    assert out.dtype == torch.bfloat16


@pytest.mark.parametrize("kind, options", KINDS, ids=KIND_IDS)
@pytest.mark.parametrize("saving", ["checkpointing", "recompute", "both"])
def test_gradient_checkpointing_and_recompute_give_the_same_gradients(kind, options, saving):
    grads = []
    for on in (False, True):
        model = tiny_unet2d().train()
        lift3d.inflate(model, kind, **options)
        randomise(model)
        if on and saving != "recompute":
            model.enable_gradient_checkpointing()
        if on and saving != "checkpointing":
            lift3d.set_recompute(model)
        torch.manual_seed(1)
        x = torch.randn(2, 2, 4, 16, 16)
        model(x, torch.tensor([3, 30])).sample.square().mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if lift3d.is_volumetric_parameter(n)})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("which", ["volumetric", "all"])
def test_set_trainable(unet2d, which):
    lift3d.inflate(unet2d)
    names = lift3d.set_trainable(unet2d, which)
    all_names = [n for n, _ in unet2d.named_parameters()]
    if which == "all":
        assert names == all_names
    else:
        assert names and all(lift3d.is_volumetric_parameter(n) for n in names)
    unet2d(torch.randn(1, 2, 3, 16, 16), torch.tensor([5])).sample.mean().backward()
    with_grad = [n for n, p in unet2d.named_parameters() if p.grad is not None]
    assert set(with_grad) <= set(names)
    assert any(lift3d.is_volumetric_parameter(n) for n in with_grad)


@pytest.mark.parametrize("recompute", [False, True])
def test_recompute_does_not_keep_the_host_output(recompute):
    """The layer's input (the host conv's output) is freed after forward when recomputing."""
    model = nn.Sequential(nn.Conv2d(2, 8, 3, padding=1), nn.GroupNorm(2, 8))
    outputs = []
    model[0].register_forward_hook(lambda m, a, out: outputs.append(weakref.ref(out)))  # runs before the lift's hook
    lift3d.inflate(model, "full", where="spatial", recompute=recompute)
    randomise(model)
    loss = model(torch.randn(1, 2, 4, 6, 6, requires_grad=True)).square().sum()
    assert (outputs[0]() is None) == recompute
    loss.backward()
    assert model[0].volumetric.weight.grad.abs().sum() > 0


def test_a_deep_copy_is_lifted_on_its_own(unet2d):
    lift3d.inflate(unet2d)
    randomise(unet2d)
    twin = copy.deepcopy(unet2d)
    x, t = torch.randn(1, 2, 3, 16, 16), torch.tensor([5])
    with torch.no_grad(), lift3d.volumetric_disabled(twin):
        assert torch.equal(twin(x, t).sample, lift3d.inflate(tiny_unet2d())(x, t).sample)
        assert not torch.equal(unet2d(x, t).sample, twin(x, t).sample)


def test_depthwise_groups_follow_each_layer(unet2d):
    lift3d.inflate(unet2d, groups="depthwise")
    layers = [layer for _, layer in lift3d.volumetric_layers(unet2d)]
    assert {layer.channels for layer in layers} == {16, 32}
    assert all(layer.groups == layer.channels for layer in layers)
    assert unet2d(torch.randn(1, 2, 3, 16, 16), torch.tensor([5])).sample.shape == (1, 1, 3, 16, 16)
    with pytest.raises(ValueError, match="use an int or 'depthwise'"):
        lift3d.inflate(tiny_unet2d(), groups="deep")
