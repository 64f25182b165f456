"""Lift a 2D diffusers U-Net and run a volume through it (a tiny model, so it runs on any CPU).

    python examples/lift_a_unet.py
"""

import torch
from diffusers import UNet2DModel
from einops import rearrange

import lift3d

unet = UNet2DModel(sample_size=32, in_channels=2, out_channels=1, block_out_channels=(16, 32),
                   layers_per_block=1, norm_num_groups=8,
                   down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"))
volume = torch.randn(1, 2, 35, 32, 32)  # (b, c, n, h, w): one volume of 35 slices
t = torch.tensor([500])  # one timestep per volume

with torch.no_grad():
    slice_wise = unet(rearrange(volume, "b c n h w -> (b n) c h w"), t.repeat(35)).sample
    lift3d.inflate(unet, verbose=True)  # identity-initialised volumetric 1D convs
    lifted = unet(volume, t).sample  # (1, 1, 35, 32, 32)

print("output", tuple(lifted.shape))
print("identical to the 2D model at initialisation:", torch.equal(rearrange(lifted, "b c n h w -> (b n) c h w"), slice_wise))
lift3d.set_trainable(unet, "volumetric")
print("trainable parameters:", sum(p.numel() for p in unet.parameters() if p.requires_grad))
