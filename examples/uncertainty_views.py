"""Draw a synthesis with its uncertainty map: orthogonal views of source, prediction (the mean of K
samples), target, |error| and std.

Run ``lift3d-synthesize --samples K`` first; it writes the mean of K samples as
``<out>/<name>_synth.nii.gz`` and their per-voxel std as ``<out>/std/<name>_std.nii.gz``:

    lift3d-synthesize --model runs/stage2/model --source sub-01/T1.nii.gz --out synth --solver dpm --samples 8
    python examples/uncertainty_views.py --pred synth/T1_synth.nii.gz --std synth/std/T1_std.nii.gz \
        --target sub-01/T2.nii.gz --source sub-01/T1.nii.gz --out T1_views.png

All volumes must lie on the same grid (lift3d-synthesize writes on the source's).
"""

from __future__ import annotations

import argparse

import nibabel as nib

from lift3d.data.nifti import load_image
from lift3d.data.orientation import SLICE_AXES, to_slices
from lift3d.evaluation.figures import save_orthogonal_views

PLANES = {"axial": ("axial", "coronal", "sagittal"), "coronal": ("coronal", "axial", "sagittal"),
          "sagittal": ("sagittal", "axial", "coronal")}


def slices(path: str, slice_axis: str):
    """The volume as ``(n, h, w)`` slices of its closest canonical orientation, and its voxel size."""
    image = nib.as_closest_canonical(load_image(path))
    zooms = image.header.get_zooms()[:3]
    return to_slices(image, slice_axis), tuple(float(zooms[axis]) for axis in SLICE_AXES[slice_axis])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pred", required=True, help="the mean volume, <name>_synth.nii.gz")
    parser.add_argument("--std", required=True, help="its std map, std/<name>_std.nii.gz")
    parser.add_argument("--target", required=True, help="the real target volume")
    parser.add_argument("--source", help="the source volume (optional, shown as the first row)")
    parser.add_argument("--slice-axis", choices=tuple(PLANES), default="axial")
    parser.add_argument("--title")
    parser.add_argument("--out", required=True, help="PNG to write")
    args = parser.parse_args()
    volumes = {}
    if args.source:
        volumes["source"] = slices(args.source, args.slice_axis)[0]
    volumes["prediction"] = slices(args.pred, args.slice_axis)[0]
    volumes["target"], spacing = slices(args.target, args.slice_axis)
    save_orthogonal_views(args.out, volumes, title=args.title, error_of=("prediction", "target"),
                          uncertainty={"prediction": slices(args.std, args.slice_axis)[0]}, spacing=spacing,
                          plane_names=PLANES[args.slice_axis])
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
