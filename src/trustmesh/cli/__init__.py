"""The ``trustmesh`` command line: one module per command group.

Exit codes: 0 success, 1 the operation failed, 2 bad usage or bad input.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence

import click

from trustmesh import __version__
from trustmesh.errors import ConfigError, NotFoundError, PKIError, TrustmeshError
from trustmesh.logs import announce, reset_logging_format

from .acme import acme_group
from .agent import agent_command
from .audit import audit_group
from .ca import ca_group
from .certs import crl_command, issue_command, list_command, revoke_command, sign_command
from .entry import entry_group
from .export import export_group
from .gateway import gateway_group
from .idp import idp_group
from .inspection import inspect_command
from .policy import policy_group
from .proxy import proxy_group
from .run import run_command
from .token import token_group
from .workload import workload_agent_command

__all__ = ["cli", "main"]

#: Errors caused by what the user gave us: exit code 2.
_INPUT_ERRORS = (ConfigError, PKIError, NotFoundError)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="trustmesh")
def cli() -> None:
    """trustmesh: short-lived SPIFFE identities and mutual TLS for microservices."""


cli.add_command(ca_group)
cli.add_command(issue_command)
cli.add_command(sign_command)
cli.add_command(revoke_command)
cli.add_command(list_command)
cli.add_command(crl_command)
cli.add_command(inspect_command)
cli.add_command(export_group)
cli.add_command(audit_group)
cli.add_command(token_group)
cli.add_command(entry_group)
cli.add_command(idp_group)
cli.add_command(agent_command)
cli.add_command(workload_agent_command)
cli.add_command(policy_group)
cli.add_command(run_command)
cli.add_command(gateway_group)
cli.add_command(proxy_group)
cli.add_command(acme_group)


def _error(message: str) -> None:
    # A server that set up JSON logs before failing closes with a JSON line too.
    announce(f"error: {message}", event="exit_error", level=logging.ERROR)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI and return its exit code (does not call :func:`sys.exit`)."""
    reset_logging_format()
    try:
        result = cli.main(
            args=list(argv) if argv is not None else None,
            prog_name="trustmesh",
            standalone_mode=False,
        )
    except click.exceptions.Exit as exc:
        return int(exc.exit_code)
    except click.exceptions.Abort:
        click.echo("Aborted.", err=True)
        return 1
    except click.UsageError as exc:
        # One line like every other refusal (click's own form is usage + hint + error).
        where = f" See '{exc.ctx.command_path} --help'." if exc.ctx is not None else ""
        _error(f"{exc.format_message()}{where}")
        return 2
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except _INPUT_ERRORS as exc:
        _error(exc.message)
        return 2
    except TrustmeshError as exc:
        _error(exc.message)
        return 1
    except SystemExit as exc:
        return int(exc.code or 0) if not isinstance(exc.code, str) else 1
    except KeyboardInterrupt:
        return 130
    # Without standalone mode click returns ctx.exit(n)'s code instead of raising.
    return result if isinstance(result, int) else 0


def entrypoint() -> None:
    """Console-script entry point."""
    sys.exit(main())
