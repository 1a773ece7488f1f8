"""trustmesh: short-lived SPIFFE identities, mutual TLS and token checks."""

__version__ = "0.1.0.dev0"
