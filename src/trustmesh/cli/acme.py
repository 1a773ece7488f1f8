"""``trustmesh acme``: external account binding keys for the CA's ACME provisioners."""

from __future__ import annotations

from pathlib import Path

import click

from trustmesh.acme import create_eab_key, load_acme_config
from trustmesh.authority import default_actor
from trustmesh.config import CONFIG_NAME
from trustmesh.errors import ConfigError

from ._common import home_option, json_option, open_ca, passphrase_option, print_json


@click.group("acme")
def acme_group() -> None:
    """ACME (RFC 8555) provisioners of 'ca serve': external account binding keys."""


@acme_group.group("eab")
def eab_group() -> None:
    """External account binding (RFC 8555 7.3.4) keys."""


@eab_group.command("create")
@click.argument("provisioner")
@json_option
@home_option
@passphrase_option
def eab_create_command(
    provisioner: str, as_json: bool, home: Path | None, passphrase_file: Path | None
) -> None:
    """Make an EAB key for PROVISIONER and print its kid and HMAC key (shown once).

    Pass them to the ACME client: certbot --eab-kid KID --eab-hmac-key KEY, lego
    --eab --kid KID --hmac KEY. The key binds one account; it is stored sealed with a
    key derived from the CA's signing key, so the passphrase is needed.
    """
    with open_ca(home, passphrase_file, sign=True) as ca:
        acme = load_acme_config(ca.home / CONFIG_NAME, ca.config)
        if provisioner not in acme.provisioners:
            raise ConfigError(
                f"No ACME provisioner {provisioner!r}: config.toml defines "
                f"{sorted(acme.provisioners) or 'none'}. Add [acme.provisioners.{provisioner}] "
                f"first (docs/acme.md).",
                field="provisioner",
            )
        kid, key = create_eab_key(ca, provisioner, actor=default_actor())
    if as_json:
        print_json({"provisioner": provisioner, "kid": kid, "hmac_key": key})
        return
    click.echo(f"kid: {kid}")
    click.echo(f"hmac_key: {key}")
    click.echo(
        "The HMAC key is shown only now; it binds one ACME account. "
        f"certbot: --eab-kid {kid} --eab-hmac-key {key}",
        err=True,
    )
