"""What training and sampling share, written once: the export settings, the conditioning rule, one
U-Net call on a volume, the noise schedules. The network knows nothing of either side (as in MONAI's
``DiffusionInferer``)."""
