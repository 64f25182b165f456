"""Built-in autoencoders (placeholder, being written)."""

from lift3d.plugins import hookimpl
