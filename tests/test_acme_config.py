"""The [acme] tables of config.toml: off by default, and every bad setting named."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from trustmesh.acme import load_acme_config
from trustmesh.authority import CertificateAuthority
from trustmesh.errors import ConfigError


def _with(ca: CertificateAuthority, text: str) -> Path:
    path = ca.home / "config.toml"
    path.write_text(path.read_text() + text)
    return path


def test_no_acme_table_means_no_provisioners(ca: CertificateAuthority) -> None:
    """Without [acme] nothing is served under /acme."""
    assert load_acme_config(ca.home / "config.toml", ca.config).provisioners == {}


def test_defaults_are_secure(ca: CertificateAuthority) -> None:
    """A provisioner with no settings requires EAB and offers http-01 and tls-alpn-01."""
    config = load_acme_config(_with(ca, "\n[acme.provisioners.web]\n"), ca.config)
    web = config.provisioner("web")
    assert web.eab_required is True
    assert web.challenges == ("http-01", "tls-alpn-01")
    assert (web.http01_port, web.tlsalpn01_port) == (80, 443)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ('challenges = ["dns-01"]', "challenges lists dns-01 but dns_resolvers is empty"),
        ('dns_resolvers = ["ns.example.internal"]', "must be IP addresses"),
        ('dns_resolvers = ["127.0.0.1:0"]', "dns_resolvers entries"),
        ('dns_resolvers = ["[::1"]', "dns_resolvers entries"),
        ('dns_resolvers = "127.0.0.1"', "dns_resolvers must be a list"),
        ('challenges = ["dns-02"]', "challenges must be a non-empty list"),
        ('profile = "nope"', "Unknown profile 'nope'"),
        ("http01_port = 0", "http01_port must be a port"),
        ("eab_required = 1", "eab_required must be true or false"),
        ("colour = 1", "unknown setting"),
    ],
)
def test_bad_settings_are_named(ca: CertificateAuthority, settings: str, message: str) -> None:
    """Each bad provisioner setting fails with a message naming it."""
    path = _with(ca, f"\n[acme.provisioners.web]\n{settings}\n")
    with pytest.raises(ConfigError, match=message):
        load_acme_config(path, ca.config)


def test_dns_resolvers_enable_dns01(ca: CertificateAuthority) -> None:
    """dns_resolvers adds dns-01 to the default challenges; ports default to 53 and
    IPv6 addresses take brackets."""
    text = '\n[acme.provisioners.web]\ndns_resolvers = ["10.0.0.53", "[::1]:5353"]\n'
    web = load_acme_config(_with(ca, text), ca.config).provisioner("web")
    assert web.challenges == ("http-01", "tls-alpn-01", "dns-01")
    assert web.dns_resolvers == (("10.0.0.53", 53), ("::1", 5353))


def test_profile_without_server_eku_or_acme_ids_is_refused(ca: CertificateAuthority) -> None:
    """A profile that cannot certify ACME certificates (client-only EKU, or IDs outside
    /acme/NAME) is refused at start, with the fix."""
    path = _with(
        ca,
        '\n[profiles.clients]\nspiffe_ids = ["spiffe://example.org/**"]\neku = ["client"]\n'
        '\n[profiles.narrow]\nspiffe_ids = ["spiffe://example.org/svc/*"]\n'
        '\n[acme.provisioners.web]\nprofile = "clients"\n',
    )
    reloaded = CertificateAuthority.open(ca.home)
    try:
        with pytest.raises(ConfigError, match="needs 'server'"):
            load_acme_config(path, reloaded.config)
        path.write_text(path.read_text().replace('profile = "clients"', 'profile = "narrow"'))
        with pytest.raises(ConfigError, match=re.escape("spiffe://example.org/acme/web/*")):
            load_acme_config(path, reloaded.config)
    finally:
        reloaded.close()
