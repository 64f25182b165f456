"""Built-in timestep_samplers (placeholder, being written)."""

from lift3d.plugins import hookimpl
