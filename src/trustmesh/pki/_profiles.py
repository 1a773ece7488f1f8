"""Certificate profiles: which names, keys, usages and lifetimes a request may get."""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta

from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from trustmesh.errors import ConfigError, PolicyError

from ._durations import format_duration, parse_duration
from ._keys import KeyType, describe_key, key_type_of
from ._spiffe import SpiffeID, glob_match, match_spiffe_pattern

__all__ = [
    "DEFAULT_DNS_PATTERNS",
    "DEFAULT_IP_RANGES",
    "DEFAULT_LEAF_LIFETIME",
    "DEFAULT_MAX_LIFETIME",
    "EKU_NAMES",
    "Profile",
    "default_profile",
]

DEFAULT_LEAF_LIFETIME = timedelta(hours=24)
DEFAULT_MAX_LIFETIME = timedelta(days=7)
#: DNS names a default profile allows: internal names only, never public ones.
DEFAULT_DNS_PATTERNS = (
    "localhost",
    "*.localhost",
    "**.local",
    "**.internal",
    "**.svc",
    "**.svc.cluster.local",
)
#: IP ranges a default profile allows: loopback and private ranges.
DEFAULT_IP_RANGES = (
    "127.0.0.0/8",
    "::1/128",
    "10.0.0.0/8",
    "172.16.0.0/12",
    "192.168.0.0/16",
    "fc00::/7",
)
EKU_NAMES = ("client", "server")
_MAX_RSA_BITS = 8192
_KEY_CLASSES = (
    ec.EllipticCurvePublicKey,
    ec.EllipticCurvePrivateKey,
    ed25519.Ed25519PublicKey,
    ed25519.Ed25519PrivateKey,
)


@dataclass(frozen=True)
class Profile:
    """What one kind of certificate may contain.

    Args:
        name: The profile's name in ``config.toml`` (``[profiles.NAME]``).
        spiffe_ids: Glob patterns of SPIFFE IDs the profile may certify.
        dns: Glob patterns of DNS names allowed as SANs (``*`` within a label,
            ``**`` across labels).
        ips: CIDR ranges IP SANs must fall in.
        key_types: Key types a subject key may have.
        min_rsa_bits: Smallest RSA modulus accepted.
        default_ttl: Lifetime when none is asked for.
        max_ttl: Longest lifetime that may be asked for.
        eku: Extended key usages: ``client``, ``server`` or both.

    .. versionadded:: 0.1
    """

    name: str
    spiffe_ids: tuple[str, ...]
    dns: tuple[str, ...] = DEFAULT_DNS_PATTERNS
    ips: tuple[str, ...] = DEFAULT_IP_RANGES
    key_types: tuple[KeyType, ...] = tuple(KeyType)
    min_rsa_bits: int = 2048
    default_ttl: timedelta = DEFAULT_LEAF_LIFETIME
    max_ttl: timedelta = DEFAULT_MAX_LIFETIME
    eku: tuple[str, ...] = EKU_NAMES
    _networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = field(
        init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        if self.default_ttl > self.max_ttl:
            raise ConfigError(
                f"Profile {self.name!r}: default_ttl {format_duration(self.default_ttl)} "
                f"is longer than max_ttl {format_duration(self.max_ttl)}; lower "
                f"default_ttl or raise max_ttl.",
                profile=self.name,
                field="default_ttl",
            )
        unknown = [e for e in self.eku if e not in EKU_NAMES]
        if unknown or not self.eku:
            raise ConfigError(
                f"Profile {self.name!r}: eku must be a non-empty subset of "
                f"{list(EKU_NAMES)}, got {list(self.eku)}.",
                profile=self.name,
                field="eku",
            )
        networks = []
        for cidr in self.ips:
            try:
                networks.append(ipaddress.ip_network(cidr, strict=False))
            except ValueError:
                raise ConfigError(
                    f"Profile {self.name!r}: {cidr!r} in ips is not a CIDR range such "
                    f"as '10.0.0.0/8'.",
                    profile=self.name,
                    field="ips",
                ) from None
        object.__setattr__(self, "_networks", tuple(networks))

    @classmethod
    def from_mapping(cls, name: str, data: Mapping[str, object]) -> Profile:
        """Build a profile from a ``[profiles.NAME]`` table of ``config.toml``.

        Raises:
            ConfigError: A key is unknown or a value has the wrong type.
        """
        known = {
            "spiffe_ids",
            "dns",
            "ips",
            "key_types",
            "min_rsa_bits",
            "default_ttl",
            "max_ttl",
            "eku",
        }
        extra = sorted(set(data) - known)
        if extra:
            raise ConfigError(
                f"Profile {name!r}: unknown setting(s) {extra}; expected some of {sorted(known)}.",
                profile=name,
            )

        def strings(key: str, default: Sequence[str]) -> tuple[str, ...]:
            value = data.get(key, list(default))
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise ConfigError(
                    f"Profile {name!r}: {key} must be a list of strings.",
                    profile=name,
                    field=key,
                )
            return tuple(value)

        spiffe_ids = strings("spiffe_ids", ())
        if not spiffe_ids:
            raise ConfigError(
                f"Profile {name!r}: spiffe_ids is missing or empty; list the ID "
                f"patterns it may certify, e.g. ['spiffe://example.org/**'].",
                profile=name,
                field="spiffe_ids",
            )
        min_rsa = data.get("min_rsa_bits", 2048)
        if not isinstance(min_rsa, int) or min_rsa < 2048:
            raise ConfigError(
                f"Profile {name!r}: min_rsa_bits must be an integer of at least 2048.",
                profile=name,
                field="min_rsa_bits",
            )

        def duration(key: str, default: timedelta) -> timedelta:
            value = data.get(key)
            if value is None:
                return default
            if not isinstance(value, str):
                raise ConfigError(
                    f"Profile {name!r}: {key} must be a duration string such as '24h'.",
                    profile=name,
                    field=key,
                )
            return parse_duration(value, field=f"profiles.{name}.{key}")

        return cls(
            name=name,
            spiffe_ids=spiffe_ids,
            dns=strings("dns", DEFAULT_DNS_PATTERNS),
            ips=strings("ips", DEFAULT_IP_RANGES),
            key_types=tuple(
                KeyType.parse(k) for k in strings("key_types", [k.value for k in KeyType])
            ),
            min_rsa_bits=min_rsa,
            default_ttl=duration("default_ttl", DEFAULT_LEAF_LIFETIME),
            max_ttl=duration("max_ttl", DEFAULT_MAX_LIFETIME),
            eku=strings("eku", EKU_NAMES),
        )

    def to_mapping(self) -> dict[str, object]:
        """Return the profile as a ``config.toml`` table."""
        return {
            "spiffe_ids": list(self.spiffe_ids),
            "dns": list(self.dns),
            "ips": list(self.ips),
            "key_types": [k.value for k in self.key_types],
            "min_rsa_bits": self.min_rsa_bits,
            "default_ttl": format_duration(self.default_ttl),
            "max_ttl": format_duration(self.max_ttl),
            "eku": list(self.eku),
        }

    def check_spiffe_id(self, spiffe_id: SpiffeID) -> None:
        """Refuse an ID that none of the profile's patterns allows.

        Raises:
            PolicyError: The ID is not allowed.
        """
        if not any(match_spiffe_pattern(spiffe_id, p) for p in self.spiffe_ids):
            raise PolicyError(
                f"Refusing {spiffe_id}: profile {self.name!r} allows SPIFFE IDs "
                f"matching {list(self.spiffe_ids)} only. Request an ID under one of "
                f"them or use a profile that permits it.",
                profile=self.name,
                field="spiffe_id",
            )

    def check_dns(self, name: str) -> None:
        """Refuse a DNS SAN the profile does not allow.

        Raises:
            PolicyError: The name is not allowed.
        """
        lowered = name.lower().rstrip(".")
        if not lowered or any(not label for label in lowered.split(".")):
            raise PolicyError(
                f"Refusing DNS name {name!r}: it is not a valid host name.",
                profile=self.name,
                field="dns",
                reason="bad_san",
                san=f"DNS:{name}",
            )
        if not any(glob_match(lowered, p.lower(), sep=".") for p in self.dns):
            raise PolicyError(
                f"Refusing DNS name {name!r}: profile {self.name!r} allows DNS names "
                f"matching {list(self.dns)} only. Use an internal name or add a "
                f"pattern to the profile's dns list ([profiles.{self.name}] in the "
                f"CA's config.toml).",
                profile=self.name,
                field="dns",
                reason="san_not_allowed",
                san=f"DNS:{name}",
            )

    def check_ip(self, address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> None:
        """Refuse an IP SAN outside the profile's ranges.

        Raises:
            PolicyError: The address is not allowed.
        """
        if not any(address in net for net in self._networks):
            raise PolicyError(
                f"Refusing IP address {address}: profile {self.name!r} allows "
                f"addresses in {list(self.ips)} only. Use one of those or add the "
                f"range to the profile's ips list ([profiles.{self.name}] in the CA's "
                f"config.toml).",
                profile=self.name,
                field="ip",
                reason="san_not_allowed",
                san=f"IP:{address}",
            )

    def check_key(self, key: object) -> None:
        """Refuse a subject key whose type or size the profile does not allow.

        Raises:
            PolicyError: The key is weak or of a type not allowed.
        """
        if isinstance(key, rsa.RSAPublicKey | rsa.RSAPrivateKey):
            ok = (
                any(k.value.startswith("rsa") for k in self.key_types)
                and self.min_rsa_bits <= key.key_size <= _MAX_RSA_BITS
            )
        elif isinstance(key, _KEY_CLASSES):
            ok = key_type_of(key) in self.key_types
        else:
            ok = False
        if not ok:
            allowed = [k.value for k in self.key_types]
            raise PolicyError(
                f"Refusing a {describe_key(key)} key: profile {self.name!r} allows "
                f"{allowed} (RSA of {self.min_rsa_bits} bits or more). Generate an "
                f"allowed key, e.g. with --key-type ec-p256.",
                profile=self.name,
                field="key",
            )

    def resolve_ttl(self, requested: timedelta | None) -> timedelta:
        """Return the lifetime to issue for: the request, or the profile's default.

        Raises:
            PolicyError: The requested lifetime is over the profile's maximum.
        """
        if requested is None:
            return self.default_ttl
        if requested <= timedelta(0):
            raise PolicyError(
                "Refusing a lifetime of zero or less: ask for a positive --ttl.",
                profile=self.name,
                field="ttl",
            )
        if requested > self.max_ttl:
            raise PolicyError(
                f"Refusing a lifetime of {format_duration(requested)}: profile "
                f"{self.name!r} allows at most {format_duration(self.max_ttl)}. Ask "
                f"for a shorter --ttl or raise max_ttl in the profile.",
                profile=self.name,
                field="ttl",
            )
        return requested


def default_profile(trust_domain: str) -> Profile:
    """Return the ``service`` profile ``ca init`` writes: client+server auth,
    any ID in the trust domain, 24 h default and 7 d maximum lifetime."""
    return Profile(name="service", spiffe_ids=(f"spiffe://{trust_domain}/**",))
