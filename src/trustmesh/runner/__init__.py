"""``trustmesh run``: an ASGI app on uvicorn over mTLS, with the identity middleware,
the policy, the revocation feed and rotating credentials wired in."""

from ._run import Keeper, RunSettings, load_app, run, validate

__all__ = ["Keeper", "RunSettings", "load_app", "run", "validate"]
