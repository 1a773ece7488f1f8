"""``python -m trustmesh``."""

from trustmesh.cli import entrypoint

entrypoint()
