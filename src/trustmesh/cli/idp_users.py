"""``trustmesh idp user``: end-user accounts of the identity server."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import click

from trustmesh.authority import default_actor
from trustmesh.config import CONFIG_NAME, CAConfig
from trustmesh.errors import ConfigError
from trustmesh.idp import UserStore
from trustmesh.store import Store, open_store

from ._common import home_option, json_option, print_fields, print_json, print_table, resolve_home

__all__ = ["user_group"]

F = TypeVar("F", bound=Callable[..., Any])

#: Environment variable ``idp user add`` reads the password from when no file is given.
PASSWORD_ENV = "TRUSTMESH_IDP_USER_PASSWORD"  # noqa: S105 - a variable name


def _read_password(path: str | None) -> str:
    """Return the new password from a file, ``-`` (stdin), the environment or a prompt."""
    if path == "-":
        value = sys.stdin.readline().rstrip("\r\n")
        source = "standard input"
    elif path is not None:
        try:
            value = Path(path).read_text().rstrip("\r\n")
        except OSError as exc:
            raise ConfigError(
                f"Cannot read the password from {path}: {exc.strerror}. Pass a readable "
                f"file, or '-' to read it from standard input.",
                path=path,
            ) from None
        source = path
    elif os.environ.get(PASSWORD_ENV):
        return os.environ[PASSWORD_ENV]
    elif sys.stdin.isatty():
        return str(click.prompt("Password", hide_input=True, confirmation_prompt=True))
    else:
        raise ConfigError(
            f"No password: pass --password-file FILE (or '-' for standard input), or set "
            f"{PASSWORD_ENV}."
        )
    if not value:
        raise ConfigError(
            f"The password from {source} is empty: put the password in it (at least 8 characters).",
            field="password",
        )
    return value


def _db_option(func: F) -> F:
    """Add ``--db`` (default: the CA's database from config.toml)."""
    return click.option(
        "--db",
        "db_url",
        default=None,
        help="Database URL (default: the CA's, from config.toml in the home).",
    )(func)


@contextlib.contextmanager
def _users(home: Path | None, db_url: str | None) -> Iterator[UserStore]:
    """The user store of the CA's database (or ``--db``); no passphrase needed."""
    config = CAConfig.load(resolve_home(home) / CONFIG_NAME)
    store: Store = open_store(db_url or config.db)
    try:
        yield UserStore(store)
    finally:
        store.close()


@click.group("user")
def user_group() -> None:
    """Manage the people who sign in on the login page."""


@user_group.command("add")
@click.argument("name")
@click.option("--role", "roles", multiple=True, help="Role for the tokens' roles claim (repeat).")
@click.option("--scope", "scopes", multiple=True, help="Scope the user may grant (repeat).")
@click.option("--email", default=None, help="E-mail address, returned by userinfo.")
@click.option(
    "--password-file",
    default=None,
    metavar="FILE",
    help=f"File holding the password, or '-' for standard input (default: ${PASSWORD_ENV}, "
    "or a prompt on a terminal).",
)
@_db_option
@home_option
@json_option
def add_command(
    name: str,
    roles: tuple[str, ...],
    scopes: tuple[str, ...],
    email: str | None,
    password_file: str | None,
    db_url: str | None,
    home: Path | None,
    as_json: bool,
) -> None:
    """Create the account NAME with a password (stored as an argon2id hash)."""
    password = _read_password(password_file)
    with _users(home, db_url) as users:
        user = users.add(
            name, password, roles=roles, scopes=scopes, email=email, actor=default_actor()
        )
    if as_json:
        print_json(user.to_json())
        return
    print_fields(
        "user added",
        [
            ("username", user.username),
            ("user id (sub)", user.user_id),
            ("roles", " ".join(user.roles) or "-"),
            ("scopes", " ".join(user.scopes) or "-"),
            ("email", user.email or "-"),
        ],
    )


@user_group.command("list")
@_db_option
@home_option
@json_option
def list_command(db_url: str | None, home: Path | None, as_json: bool) -> None:
    """List accounts: roles, scopes, and whether each is disabled or locked out."""
    now = datetime.now(UTC)
    with _users(home, db_url) as users:
        accounts = users.all()
        locks = users.locks(now=now)
    if as_json:
        print_json([u.to_json(locked_until=locks.get(u.username)) for u in accounts])
        return
    rows = []
    for user in accounts:
        until = locks.get(user.username)
        rows.append(
            (
                user.username,
                " ".join(user.roles) or "-",
                " ".join(user.scopes) or "-",
                "yes" if user.disabled else "no",
                f"until {until.strftime('%H:%M:%SZ')}" if until else "no",
                user.email or "-",
                user.user_id,
            )
        )
    print_table(
        f"{len(rows)} user(s)",
        ["name", "roles", "scopes", "disabled", "locked", "email", "user id"],
        rows,
    )


@user_group.command("disable")
@click.argument("name")
@_db_option
@home_option
@json_option
def disable_command(name: str, db_url: str | None, home: Path | None, as_json: bool) -> None:
    """Disable the account NAME: no more sign-ins, and its refresh tokens are revoked."""
    with _users(home, db_url) as users:
        user = users.disable(name, actor=default_actor())
    if as_json:
        print_json(user.to_json())
    else:
        click.echo(f"disabled {user.username} ({user.user_id}); its refresh tokens are revoked")


@user_group.command("unlock")
@click.argument("name")
@_db_option
@home_option
def unlock_command(name: str, db_url: str | None, home: Path | None) -> None:
    """Clear the failed sign-in lock of NAME (after checking who was guessing)."""
    with _users(home, db_url) as users:
        cleared = users.unlock(name, actor=default_actor())
    click.echo(f"unlocked {name}" if cleared else f"{name} was not locked")
