"""Command-line entry points: ``lift3d``, ``lift3d-finetune``, ``lift3d-synthesize``, ``lift3d-evaluate``."""
