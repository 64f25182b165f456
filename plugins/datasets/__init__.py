"""Built-in dataset plugins (placeholder, being written)."""

from lift3d.plugins import hookimpl
