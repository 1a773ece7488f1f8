"""The ``[acme]`` tables of the CA's ``config.toml``: provisioners and their rules.

No ``[acme]`` table, no ACME: ``ca serve`` answers nothing under ``/acme`` until an
operator names a provisioner. Each provisioner maps onto trustmesh profiles (the
same DNS/IP SAN, key and lifetime rules as every other certificate), requires
external account binding unless told otherwise, and lists its challenge types.
"""

from __future__ import annotations

import ipaddress
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

from trustmesh.config import CAConfig
from trustmesh.errors import ConfigError
from trustmesh.pki import SpiffeID, parse_duration

__all__ = [
    "CHALLENGE_TYPES",
    "ACMEConfig",
    "Provisioner",
    "acme_spiffe_id",
    "load_acme_config",
]

#: Challenge types this server validates. dns-01 is offered only by a provisioner that
#: names the resolver(s) to ask for TXT records (``dns_resolvers``, see docs/acme.md).
CHALLENGE_TYPES = ("http-01", "tls-alpn-01", "dns-01")
_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,31}")
_KNOWN = {
    "profile",
    "profiles",
    "eab_required",
    "challenges",
    "http01_port",
    "tlsalpn01_port",
    "order_lifetime",
    "dns_resolvers",
}


def acme_spiffe_id(trust_domain: str, provisioner: str, account: str) -> SpiffeID:
    """The SPIFFE ID an ACME certificate carries: ``/acme/PROVISIONER/ACCOUNT``."""
    return SpiffeID.parse(f"spiffe://{trust_domain}/acme/{provisioner}/{account}")


@dataclass(frozen=True)
class Provisioner:
    """One ACME endpoint, ``/acme/NAME/directory``.

    Args:
        name: The provisioner's name (in the URL).
        profile: The trustmesh profile of orders that name none.
        profiles: The trustmesh profiles orders may ask for (RFC draft
            ``profiles`` extension, advertised in the directory); includes ``profile``.
        eab_required: Accounts need an external account binding (default True).
        challenges: Challenge types offered.
        http01_port: The port http-01 fetches from (80 by RFC 8555).
        tlsalpn01_port: The port tls-alpn-01 connects to (443 by RFC 8737).
        order_lifetime: How long a pending order and its authorizations live.
        dns_resolvers: ``(address, port)`` of the DNS server(s) dns-01 asks for
            ``_acme-challenge`` TXT records (empty: no dns-01).
    """

    name: str
    profile: str
    profiles: tuple[str, ...]
    eab_required: bool = True
    challenges: tuple[str, ...] = CHALLENGE_TYPES[:2]
    http01_port: int = 80
    tlsalpn01_port: int = 443
    order_lifetime: timedelta = timedelta(hours=1)
    dns_resolvers: tuple[tuple[str, int], ...] = ()


@dataclass(frozen=True)
class ACMEConfig:
    """Every ACME provisioner of a CA (empty: ACME is off)."""

    provisioners: Mapping[str, Provisioner] = field(default_factory=dict)
    nonce_lifetime: timedelta = timedelta(hours=1)
    cleanup_interval: float = 60.0

    def provisioner(self, name: str) -> Provisioner:
        """Return a provisioner by name.

        Raises:
            ConfigError: No such provisioner.
        """
        try:
            return self.provisioners[name]
        except KeyError:
            raise ConfigError(
                f"Unknown ACME provisioner {name!r}: config.toml defines "
                f"{sorted(self.provisioners) or 'none'}. Add [acme.provisioners.{name}] "
                f"(see docs/acme.md).",
                field="acme.provisioners",
            ) from None


def _port(value: object, key: str, where: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 65535:
        raise ConfigError(f"{where}: {key} must be a port number from 1 to 65535.", field=key)
    return value


def _resolver(value: object, where: str) -> tuple[str, int]:
    """``"ADDRESS"``, ``"ADDRESS:PORT"`` or ``"[IPv6]:PORT"`` as (address, port)."""
    fix = (
        f"{where}: dns_resolvers entries must be IP addresses with an optional port, such "
        f"as '10.0.0.53', '127.0.0.1:5353' or '[::1]:53' (no host names: the CA would "
        f"have to resolve them), got {value!r}."
    )
    if not isinstance(value, str):
        raise ConfigError(fix, field="dns_resolvers")
    host, port = value.strip(), "53"
    if host.startswith("["):
        host, sep, rest = host[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ConfigError(fix, field="dns_resolvers")
        port = rest[1:] if rest else port
    elif host.count(":") == 1:
        host, port = host.split(":")
    try:
        address = ipaddress.ip_address(host)
        number = int(port)
    except ValueError:
        raise ConfigError(fix, field="dns_resolvers") from None
    if not 1 <= number <= 65535:
        raise ConfigError(fix, field="dns_resolvers")
    return str(address), number


def _provisioner(name: str, body: object, ca: CAConfig, where: str) -> Provisioner:
    if not _NAME.fullmatch(name):
        raise ConfigError(
            f"{where}: provisioner name {name!r} must be 1-32 lower-case letters, digits, "
            f"'-' or '_' (it is part of the URL).",
            field="acme.provisioners",
        )
    if not isinstance(body, dict):
        raise ConfigError(f"{where}: must be a table.", field="acme.provisioners")
    extra = sorted(set(body) - _KNOWN)
    if extra:
        raise ConfigError(
            f"{where}: unknown setting(s) {extra}; expected some of {sorted(_KNOWN)}.",
            field="acme.provisioners",
        )
    default = body.get("profile", ca.default_profile)
    if not isinstance(default, str):
        raise ConfigError(f"{where}: profile must be a profile name.", field="profile")
    listed = body.get("profiles", [default])
    if not isinstance(listed, list) or not all(isinstance(p, str) for p in listed):
        raise ConfigError(f"{where}: profiles must be a list of profile names.", field="profiles")
    profiles = tuple(dict.fromkeys([default, *listed]))
    sample = acme_spiffe_id(ca.trust_domain, name, "account")
    for profile_name in profiles:
        try:
            profile = ca.profile(profile_name)
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc.message}", field="profile") from None
        if "server" not in profile.eku:
            raise ConfigError(
                f"{where}: profile {profile_name!r} has eku {list(profile.eku)}; ACME "
                f"issues server certificates, so it needs 'server'.",
                field="profile",
            )
        try:
            profile.check_spiffe_id(sample)
        except Exception:
            raise ConfigError(
                f"{where}: profile {profile_name!r} does not allow the IDs ACME "
                f"certificates carry (spiffe://{ca.trust_domain}/acme/{name}/ACCOUNT); add "
                f"'spiffe://{ca.trust_domain}/acme/{name}/*' to its spiffe_ids.",
                field="profile",
            ) from None
    eab = body.get("eab_required", True)
    if not isinstance(eab, bool):
        raise ConfigError(f"{where}: eab_required must be true or false.", field="eab_required")
    raw_resolvers = body.get("dns_resolvers", [])
    if not isinstance(raw_resolvers, list):
        raise ConfigError(
            f'{where}: dns_resolvers must be a list such as ["127.0.0.1:5353"].',
            field="dns_resolvers",
        )
    resolvers = tuple(dict.fromkeys(_resolver(r, where) for r in raw_resolvers))
    offered = CHALLENGE_TYPES if resolvers else CHALLENGE_TYPES[:2]
    challenges = body.get("challenges", list(offered))
    if (
        not isinstance(challenges, list)
        or not challenges
        or any(c not in CHALLENGE_TYPES for c in challenges)
    ):
        raise ConfigError(
            f"{where}: challenges must be a non-empty list of {list(CHALLENGE_TYPES)}, "
            f"got {challenges!r}.",
            field="challenges",
        )
    if "dns-01" in challenges and not resolvers:
        raise ConfigError(
            f"{where}: challenges lists dns-01 but dns_resolvers is empty: name the DNS "
            f'server(s) to ask for TXT records, e.g. dns_resolvers = ["10.0.0.53:53"].',
            field="dns_resolvers",
        )
    lifetime = body.get("order_lifetime", "1h")
    if not isinstance(lifetime, str):
        raise ConfigError(f"{where}: order_lifetime must be a duration such as '1h'.")
    return Provisioner(
        name=name,
        profile=default,
        profiles=profiles,
        eab_required=eab,
        challenges=tuple(dict.fromkeys(challenges)),
        http01_port=_port(body.get("http01_port", 80), "http01_port", where),
        tlsalpn01_port=_port(body.get("tlsalpn01_port", 443), "tlsalpn01_port", where),
        order_lifetime=parse_duration(lifetime, field="order_lifetime"),
        dns_resolvers=resolvers,
    )


def load_acme_config(path: Path, ca: CAConfig) -> ACMEConfig:
    """Read the ``[acme]`` tables of ``config.toml`` (none: ACME is off).

    Raises:
        ConfigError: A setting is unknown or invalid, or a provisioner's profile
            cannot certify ACME certificates.
    """
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"Cannot read {path}: {exc}.", path=str(path)) from None
    acme = data.get("acme")
    if acme is None:
        return ACMEConfig()
    if not isinstance(acme, dict):
        raise ConfigError(f"{path}: [acme] must be a table.", field="acme")
    unknown = sorted(set(acme) - {"provisioners", "nonce_lifetime", "cleanup_interval"})
    if unknown:
        raise ConfigError(
            f"{path}: unknown [acme] setting(s) {unknown}; expected provisioners, "
            f"nonce_lifetime, cleanup_interval.",
            field="acme",
        )
    raw = acme.get("provisioners", {})
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: [acme.provisioners] must be a table.", field="acme")
    provisioners = {
        name: _provisioner(name, body, ca, f"{path} [acme.provisioners.{name}]")
        for name, body in raw.items()
    }
    interval = acme.get("cleanup_interval", 60)
    if not isinstance(interval, int | float) or isinstance(interval, bool) or interval <= 0:
        raise ConfigError(f"{path}: acme.cleanup_interval must be a positive number of seconds.")
    return ACMEConfig(
        provisioners=provisioners,
        nonce_lifetime=parse_duration(
            str(acme.get("nonce_lifetime", "1h")), field="acme.nonce_lifetime"
        ),
        cleanup_interval=float(interval),
    )
