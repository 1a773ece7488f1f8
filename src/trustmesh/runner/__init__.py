"""``trustmesh run``: an ASGI app on uvicorn over mTLS, with the identity middleware,
the policy, the revocation feed and rotating credentials wired in."""

from ._run import RunSettings, load_app, run

__all__ = ["RunSettings", "load_app", "run"]
