"""The CA's ``config.toml``: trust domain, database, key type and profiles."""

from __future__ import annotations

import json
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

from trustmesh.errors import ConfigError
from trustmesh.files import atomic_write
from trustmesh.pki import (
    BACKDATE,
    DEFAULT_CRL_LIFETIME,
    KeyType,
    Profile,
    default_profile,
    format_duration,
    parse_backdate,
    parse_duration,
)

__all__ = [
    "CONFIG_NAME",
    "DEFAULT_MIN_OVERLAP",
    "DEFAULT_ROOT_CRL_LIFETIME",
    "URL_KEYS",
    "CAConfig",
    "check_urls",
]

CONFIG_NAME = "config.toml"
#: Lifetime of the root-signed CRL of the intermediates (re-signed at half of it).
DEFAULT_ROOT_CRL_LIFETIME = timedelta(days=30)
#: How long a prepared issuer's bundle is published before it may sign (rotation).
DEFAULT_MIN_OVERLAP = timedelta(hours=1)


def _fraction(data: Mapping[str, object], key: str, default: float, path: Path) -> float:
    raw = data.get(key, default)
    if isinstance(raw, bool) or not isinstance(raw, int | float) or not 0 < raw < 1:
        raise ConfigError(
            f"{path}: {key} = {raw!r} must be a fraction of the intermediate's lifetime "
            f"between 0 and 1 (default {default:g}).",
            field=key,
        )
    return float(raw)


#: Config keys holding public URLs, and what each is for (in error messages).
URL_KEYS = {
    "crl_urls": "the leaf CRL (e.g. http://ca.internal:8080/crl)",
    "ocsp_urls": "the OCSP responder (e.g. http://ca.internal:8080/)",
    "root_crl_urls": "the root-signed CRL (e.g. http://ca.internal:8080/crl/root)",
}


def check_urls(key: str, values: object, *, source: str) -> tuple[str, ...]:
    """Return the URLs of config key ``key`` after checking each is an http(s) URL.

    Raises:
        ConfigError: Not a list of http:// or https:// URLs with a host.
    """
    if isinstance(values, str):
        values = [values]
    if not isinstance(values, list | tuple):
        raise ConfigError(f"{source}: {key} must be a list of URLs of {URL_KEYS[key]}.")
    out = []
    for value in values:
        text = str(value)
        scheme, sep, rest = text.partition("://")
        if not sep or scheme not in ("http", "https") or not rest.split("/")[0]:
            raise ConfigError(
                f"{source}: {key} holds {text!r}, which is not an http:// or https:// URL; "
                f"give the public URL of {URL_KEYS[key]}.",
                field=key,
            )
        out.append(text)
    return tuple(out)


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} to TOML")


@dataclass(frozen=True)
class CAConfig:
    """Settings of one CA, as stored in ``TRUSTMESH_HOME/config.toml``.

    Args:
        trust_domain: The SPIFFE trust domain.
        db: The database URL.
        key_type: Key type of the CA keys and the default for ``issue``.
        crl_lifetime: ``nextUpdate`` - ``thisUpdate`` of CRLs.
        crl_urls: CRL distribution points written into leaves (where the
            intermediate's CRL is published, e.g. ``http://ca.internal:8080/crl``).
        ocsp_urls: OCSP responders written into leaves (AIA), e.g.
            ``http://ca.internal:8080/``.
        root_crl_urls: CRL distribution points written into the intermediate at
            ``ca init`` (where the root-signed CRL is published).
        root_crl_lifetime: ``nextUpdate`` - ``thisUpdate`` of the root-signed CRL;
            it is re-signed once half of it has passed.
        profiles: Certificate profiles by name.
        default_profile: The profile used when none is named.
        admins: SPIFFE IDs (or globs) that may revoke any certificate over the API.
        backdate: How far ``notBefore`` of every certificate lies before the CA's clock
            (0 to 10 minutes), to absorb clock skew between hosts.
        rotation_min_overlap: How long a prepared issuer's bundle must have been
            published before ``ca rotate ... activate`` lets it sign.
        rotation_auto: ``ca serve`` prepares, activates and retires intermediate
            rotations by itself (see docs/rotation.md).
        rotation_prepare_at, rotation_activate_at: Fractions of the active
            intermediate's lifetime at which ``ca serve`` prepares and activates.
        intermediate_lifetime, root_lifetime: Lifetimes of the CA certificates a
            rotation creates.
        pkcs11: The PKCS#11 token URI (RFC 7512, no PIN) where ``ca init --pkcs11``
            put the CA keys; rotations create their new keys there too. Empty: keys
            are files or in the store.
    """

    trust_domain: str
    db: str
    key_type: KeyType = KeyType.EC_P256
    crl_lifetime: timedelta = DEFAULT_CRL_LIFETIME
    crl_urls: tuple[str, ...] = ()
    ocsp_urls: tuple[str, ...] = ()
    root_crl_urls: tuple[str, ...] = ()
    root_crl_lifetime: timedelta = DEFAULT_ROOT_CRL_LIFETIME
    profiles: Mapping[str, Profile] = field(default_factory=dict)
    default_profile: str = "service"
    admins: tuple[str, ...] = ()
    backdate: timedelta = BACKDATE
    rotation_min_overlap: timedelta = DEFAULT_MIN_OVERLAP
    rotation_auto: bool = True
    rotation_prepare_at: float = 0.5
    rotation_activate_at: float = 2 / 3
    intermediate_lifetime: timedelta = timedelta(days=365)
    root_lifetime: timedelta = timedelta(days=3650)
    pkcs11: str = ""

    @classmethod
    def new(
        cls,
        trust_domain: str,
        db: str,
        key_type: KeyType,
        *,
        crl_urls: tuple[str, ...] = (),
        ocsp_urls: tuple[str, ...] = (),
        root_crl_urls: tuple[str, ...] = (),
        backdate: timedelta = BACKDATE,
        pkcs11: str = "",
    ) -> CAConfig:
        """Return the configuration ``ca init`` writes.

        Raises:
            ConfigError: A URL is not an http(s) URL.
        """
        profile = default_profile(trust_domain)
        return cls(
            trust_domain,
            db,
            key_type,
            crl_urls=check_urls("crl_urls", crl_urls, source="--crl-url"),
            ocsp_urls=check_urls("ocsp_urls", ocsp_urls, source="--ocsp-url"),
            root_crl_urls=check_urls("root_crl_urls", root_crl_urls, source="--root-crl-url"),
            profiles={profile.name: profile},
            backdate=backdate,
            pkcs11=pkcs11,
        )

    def profile(self, name: str | None) -> Profile:
        """Return a profile by name (the default one for None).

        Raises:
            ConfigError: No profile has that name.
        """
        wanted = name or self.default_profile
        try:
            return self.profiles[wanted]
        except KeyError:
            raise ConfigError(
                f"Unknown profile {wanted!r}: config.toml defines "
                f"{sorted(self.profiles)}. Use one of them or add [profiles.{wanted}].",
                field="profile",
            ) from None

    @classmethod
    def load(cls, path: Path) -> CAConfig:
        """Read a ``config.toml``.

        Raises:
            ConfigError: Missing, unparsable or invalid.
        """
        try:
            data = tomllib.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(
                f"No CA in {path.parent}: {path.name} is missing. Run 'trustmesh ca init "
                f"--trust-domain example.org' or set TRUSTMESH_HOME.",
                path=str(path),
            ) from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path} is not valid TOML: {exc}.", path=str(path)) from None
        try:
            trust_domain = str(data["trust_domain"])
            db = str(data["db"])
        except KeyError as exc:
            raise ConfigError(f"{path}: setting {exc.args[0]} is missing.") from None
        raw_profiles = data.get("profiles", {})
        if not isinstance(raw_profiles, dict) or not raw_profiles:
            raise ConfigError(f"{path}: define at least one [profiles.NAME] table.")
        profiles = {name: Profile.from_mapping(name, body) for name, body in raw_profiles.items()}
        default = str(data.get("default_profile", "service"))
        if default not in profiles:
            raise ConfigError(
                f"{path}: default_profile {default!r} is not one of {sorted(profiles)}."
            )
        prepare_at = _fraction(data, "rotation_prepare_at", 0.5, path)
        activate_at = _fraction(data, "rotation_activate_at", 2 / 3, path)
        if activate_at <= prepare_at:
            raise ConfigError(
                f"{path}: rotation_activate_at ({activate_at:g}) must come after "
                f"rotation_prepare_at ({prepare_at:g}).",
                field="rotation_activate_at",
            )
        auto = data.get("rotation_auto", True)
        if not isinstance(auto, bool):
            raise ConfigError(
                f"{path}: rotation_auto must be true or false.", field="rotation_auto"
            )
        return cls(
            rotation_min_overlap=parse_duration(
                str(data.get("rotation_min_overlap", format_duration(DEFAULT_MIN_OVERLAP))),
                field=f"{path}: rotation_min_overlap",
            ),
            rotation_auto=auto,
            rotation_prepare_at=prepare_at,
            rotation_activate_at=activate_at,
            intermediate_lifetime=parse_duration(
                str(data.get("intermediate_lifetime", "365d")),
                field=f"{path}: intermediate_lifetime",
            ),
            root_lifetime=parse_duration(
                str(data.get("root_lifetime", "3650d")), field=f"{path}: root_lifetime"
            ),
            trust_domain=trust_domain,
            db=db,
            key_type=KeyType.parse(str(data.get("key_type", "ec-p256"))),
            crl_lifetime=parse_duration(str(data.get("crl_lifetime", "24h")), field="crl_lifetime"),
            crl_urls=check_urls("crl_urls", data.get("crl_urls", []), source=str(path)),
            ocsp_urls=check_urls("ocsp_urls", data.get("ocsp_urls", []), source=str(path)),
            root_crl_urls=check_urls(
                "root_crl_urls", data.get("root_crl_urls", []), source=str(path)
            ),
            root_crl_lifetime=parse_duration(
                str(data.get("root_crl_lifetime", "30d")), field="root_crl_lifetime"
            ),
            profiles=profiles,
            default_profile=default,
            admins=tuple(str(a) for a in data.get("admins", [])),
            backdate=parse_backdate(
                str(data.get("backdate", format_duration(BACKDATE))),
                field=f"{path}: backdate",
            ),
            pkcs11=str(data.get("pkcs11", "")),
        )

    def dumps(self) -> str:
        """Return the TOML text of this configuration."""
        lines = [
            "# trustmesh CA configuration, written by 'trustmesh ca init'.",
            "# Profiles say what a certificate may contain; see docs/profiles.md.",
            f"trust_domain = {_toml_value(self.trust_domain)}",
            f"db = {_toml_value(self.db)}",
            f"key_type = {_toml_value(self.key_type.value)}",
            f"crl_lifetime = {_toml_value(format_duration(self.crl_lifetime))}",
            "# notBefore lies this far before the CA's clock, for hosts whose clocks are a",
            "# little behind (0s to 10m; keep clocks right with NTP, see docs/operations.md).",
            f"backdate = {_toml_value(format_duration(self.backdate))}",
            "# Public URLs written into new leaves (CDP, AIA-OCSP); see docs/revocation.md.",
            f"crl_urls = {_toml_value(list(self.crl_urls))}",
            f"ocsp_urls = {_toml_value(list(self.ocsp_urls))}",
            "# Where the root-signed CRL is published; written into the intermediate at init.",
            f"root_crl_urls = {_toml_value(list(self.root_crl_urls))}",
            f"root_crl_lifetime = {_toml_value(format_duration(self.root_crl_lifetime))}",
            f"default_profile = {_toml_value(self.default_profile)}",
            "# SPIFFE IDs (or globs) allowed to revoke any certificate through 'ca serve'.",
            f"admins = {_toml_value(list(self.admins))}",
            "# Staged rotation of the intermediate and the root; see docs/rotation.md.",
            "# A prepared issuer's bundle is published this long before it may sign:",
            f"rotation_min_overlap = {_toml_value(format_duration(self.rotation_min_overlap))}",
            "# 'ca serve' rotates the intermediate by itself at these fractions of its life.",
            f"rotation_auto = {_toml_value(self.rotation_auto)}",
            f"rotation_prepare_at = {self.rotation_prepare_at:.4g}",
            f"rotation_activate_at = {self.rotation_activate_at:.4g}",
            f"intermediate_lifetime = {_toml_value(format_duration(self.intermediate_lifetime))}",
            f"root_lifetime = {_toml_value(format_duration(self.root_lifetime))}",
        ]
        if self.pkcs11:
            lines += [
                "# The PKCS#11 token holding the CA keys; rotations create new keys there",
                "# (docs/hsm.md). The PIN comes from pin-source or TRUSTMESH_PKCS11_PIN.",
                f"pkcs11 = {_toml_value(self.pkcs11)}",
            ]
        for name, profile in self.profiles.items():
            lines += ["", f"[profiles.{name}]"]
            lines += [f"{k} = {_toml_value(v)}" for k, v in profile.to_mapping().items()]
        return "\n".join(lines) + "\n"

    def save(self, path: Path) -> None:
        """Write atomically."""
        atomic_write(path, self.dumps().encode(), mode=0o644)
