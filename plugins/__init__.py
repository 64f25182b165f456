"""lift3d's built-in plugins, installed as ``lift3d_plugins``.

They register through the entry-point group ``lift3d`` exactly as a third-party plugin does.
"""
