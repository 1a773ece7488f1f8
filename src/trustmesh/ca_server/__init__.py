"""The CA as a service: HTTPS API for enrollment, renewal, revocation, CRL and OCSP."""

from ._app import MAX_BODY, ServerSettings, create_app
from ._serve import CA_SERVER_PATH, parse_listen, serve

__all__ = ["CA_SERVER_PATH", "MAX_BODY", "ServerSettings", "create_app", "parse_listen", "serve"]
