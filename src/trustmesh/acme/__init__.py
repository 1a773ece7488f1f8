"""ACME (RFC 8555) for DNS-named server certificates, with EAB, ARI and profiles.

``ca serve`` mounts :class:`ACMEServer` at ``/acme`` when ``config.toml`` names a
provisioner (``[acme.provisioners.NAME]``); see docs/acme.md.
"""

from ._config import CHALLENGE_TYPES, ACMEConfig, Provisioner, acme_spiffe_id, load_acme_config
from ._eab import create_eab_key, sealing_key
from ._problems import ACME_ERROR, ACMEProblem
from ._server import ACMEServer, cert_id

__all__ = [
    "ACME_ERROR",
    "CHALLENGE_TYPES",
    "ACMEConfig",
    "ACMEProblem",
    "ACMEServer",
    "Provisioner",
    "acme_spiffe_id",
    "cert_id",
    "create_eab_key",
    "load_acme_config",
    "sealing_key",
]
