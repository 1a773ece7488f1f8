"""Shared CLI plumbing: the home directory, passphrases, output."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

from trustmesh.errors import ConfigError

if TYPE_CHECKING:
    from rich.console import Console
    from rich.text import Text

    from trustmesh.authority import CertificateAuthority

# rich and the CA (its store, SQLAlchemy) load on first use: commands that need neither
# (the sidecars, the agents) stay small.

F = TypeVar("F", bound=Callable[..., Any])

# Pipes and CI logs get wide tables instead of 80 columns of wrapped cells. Everything
# printed here is data (fingerprints, SPIFFE IDs, names chosen by users): no emoji codes
# (":ab:" inside a SHA-256 fingerprint became an emoji), no console markup ("[red]" in a
# client name) and no highlighting. Issue 14, item 5.
_console: Console | None = None


def get_console() -> Console:
    """The console tables are printed on (made on first use)."""
    global _console
    if _console is None:
        from rich.console import Console

        _console = Console(
            highlight=False,
            emoji=False,
            markup=False,
            width=None if sys.stdout.isatty() else 160,
        )
    return _console


def __getattr__(name: str) -> object:
    if name == "console":
        return get_console()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _text(value: object) -> Text:
    """A table cell or title shown verbatim (Text is never parsed for markup or emoji)."""
    from rich.text import Text

    return Text("" if value is None else str(value))


def home_option(func: F) -> F:
    """Add ``--home`` (default ``$TRUSTMESH_HOME`` or ``~/.trustmesh``)."""
    return click.option(
        "--home",
        type=click.Path(file_okay=False, path_type=Path),
        default=None,
        help="CA directory (default: $TRUSTMESH_HOME or ~/.trustmesh).",
    )(func)


def passphrase_option(func: F) -> F:
    """Add ``--passphrase-file``."""
    return click.option(
        "--passphrase-file",
        type=click.Path(dir_okay=False, path_type=Path),
        default=None,
        help="File holding the CA key passphrase (default: $TRUSTMESH_CA_PASSPHRASE, "
        "or a prompt on a terminal).",
    )(func)


def json_option(func: F) -> F:
    """Add ``--json``."""
    return click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")(func)


def force_option(func: F) -> F:
    """Add ``--force`` (replace the files ``--out`` names)."""
    return click.option(
        "--force",
        is_flag=True,
        help="Replace existing files (atomically; without it the command refuses).",
    )(func)


def refuse_overwrite(paths: Sequence[Path], *, force: bool, option: str = "--out") -> None:
    """Refuse to write over existing files unless ``force`` (``--force``) is set.

    Raises:
        ConfigError: One of ``paths`` exists and ``force`` is False.
    """
    existing = [p for p in paths if p.exists() or p.is_symlink()]
    if existing and not force:
        names = ", ".join(str(p) for p in existing)
        raise ConfigError(
            f"Refusing to overwrite {names}: pass --force to replace "
            f"{'it' if len(existing) == 1 else 'them'}, or give another {option}.",
            path=str(existing[0]),
        )


def resolve_home(home: Path | None) -> Path:
    """Return the CA directory to use."""
    from trustmesh.authority import default_home

    return home if home is not None else default_home()


def read_secret(
    path: Path | None, env: str, *, what: str, option: str, confirm: bool = False
) -> bytes:
    """Return a secret from a file, an environment variable, or a TTY prompt.

    Raises:
        ConfigError: None of them is available, or the file cannot be read.
    """
    if path is not None:
        try:
            value = path.read_text().rstrip("\r\n")
        except OSError as exc:
            raise ConfigError(
                f"Cannot read {what} from {path}: {exc.strerror}.", path=str(path)
            ) from None
        if not value:
            raise ConfigError(f"{path} is empty: put the {what} in it.", path=str(path))
        return value.encode()
    if os.environ.get(env):
        return os.environ[env].encode()
    if sys.stdin.isatty():
        value = click.prompt(what.capitalize(), hide_input=True, confirmation_prompt=confirm)
        if value:
            return str(value).encode()
    raise ConfigError(f"No {what}: set {env}, pass {option}, or run on a terminal.")


def ca_passphrase(path: Path | None, *, confirm: bool = False) -> bytes:
    """Return the CA key passphrase."""
    return read_secret(
        path,
        "TRUSTMESH_CA_PASSPHRASE",
        what="CA passphrase",
        option="--passphrase-file",
        confirm=confirm,
    )


def open_ca(
    home: Path | None, passphrase_file: Path | None = None, *, sign: bool = False
) -> CertificateAuthority:
    """Open the CA, unlocking its key when ``sign`` is True.

    A CA whose signing key is in a PKCS#11 token needs no passphrase (the token PIN
    comes from the URI's pin-source); one given is still used for stored keys.
    """
    from trustmesh.authority import CertificateAuthority
    from trustmesh.hsm import is_pkcs11_ref

    ca = CertificateAuthority.open(resolve_home(home))
    if sign:
        try:
            in_token = is_pkcs11_ref(ca.issuers.active("intermediate").key_ref)
            if in_token and passphrase_file is None:
                ca.unlock(os.environ.get("TRUSTMESH_CA_PASSPHRASE", "").encode() or None)
            else:
                ca.unlock(ca_passphrase(passphrase_file))
        except BaseException:
            ca.close()
            raise
        try:
            _ = ca.signing_key  # fail now on a wrong passphrase, before any work
        except BaseException:
            ca.close()
            raise
    return ca


def print_json(data: object) -> None:
    """Print JSON to stdout."""
    click.echo(json.dumps(data, indent=2, sort_keys=True, default=str))


def print_table(
    title: str | None, columns: Sequence[str], rows: Sequence[Sequence[object]]
) -> None:
    """Print a Rich table for people."""
    from rich.table import Table

    table = Table(
        title=None if title is None else _text(title), show_lines=False, header_style="bold"
    )
    for column in columns:
        table.add_column(_text(column), overflow="fold")
    for row in rows:
        table.add_row(*(_text(v) for v in row))
    get_console().print(table)


def print_fields(title: str, fields: Sequence[tuple[str, object]]) -> None:
    """Print a two-column key/value table."""
    from rich.table import Table

    table = Table(title=_text(title), show_header=False, header_style="bold")
    table.add_column("field", style="bold")
    table.add_column("value", overflow="fold")
    for key, value in fields:
        table.add_row(_text(key), _text(value))
    get_console().print(table)
